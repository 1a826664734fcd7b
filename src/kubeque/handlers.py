"""The handler registry: names to functions, their settings and payload schemas."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import ConfigError, PayloadValidationError, UnknownHandlerError

_NO_SCHEMA = (inspect.Parameter.empty, Any, dict, dict[str, Any], typing.Dict)  # noqa: UP006


@dataclass
class Handler:
    """A registered handler and the options it sets for its tasks (None: use the queue's)."""

    name: str
    fn: Callable[..., Any]
    max_retries: int | None = None
    max_processing_time: int | None = None
    retry_backoff_ms: int | None = None
    schema: Any = None
    skip_on_payload_error: bool = False
    is_async: bool = False
    wants_task: bool = False
    _adapter: TypeAdapter[Any] | None = field(default=None, repr=False)

    def validate(self, payload: Any) -> dict[str, Any]:
        """Check the payload against the schema; return its JSON form for storage."""
        if self._adapter is None:
            if isinstance(payload, BaseModel):
                return payload.model_dump(mode="json")
            return payload  # type: ignore[no-any-return]
        try:
            value = self._adapter.validate_python(payload)
        except ValidationError as exc:
            raise PayloadValidationError(_describe(self.name, exc)) from None
        dumped = self._adapter.dump_python(value, mode="json")
        if not isinstance(dumped, dict):
            raise ConfigError(f"the schema of handler {self.name!r} must describe a JSON object")
        return dumped

    def decode(self, payload: dict[str, Any]) -> Any:
        """The argument the handler receives: its declared type, or the dict."""
        if self._adapter is None:
            return payload
        return self._adapter.validate_python(payload)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "function": f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', '?')}",
            "async": self.is_async,
            "max_retries": self.max_retries,
            "max_processing_time": self.max_processing_time,
            "retry_backoff_ms": self.retry_backoff_ms,
            "schema": _schema_name(self.schema),
            "skip_on_payload_error": self.skip_on_payload_error,
        }


def describe_validation(handler: str, exc: Exception) -> str:
    """A payload validation failure in one line, naming the fields."""
    if isinstance(exc, ValidationError):
        return _describe(handler, exc)
    return " ".join(str(exc).split())


def _describe(handler: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"field '{loc}': {err['msg']}")
    return f"payload for handler {handler!r} is invalid: " + "; ".join(parts)


def _schema_name(schema: Any) -> str | None:
    if schema is None:
        return None
    return getattr(schema, "__name__", None) or repr(schema)


def _positional_params(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    sig = inspect.signature(fn)
    return [
        p
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]


def _declared_schema(fn: Callable[..., Any]) -> Any:
    params = _positional_params(fn)
    if not params:
        raise ConfigError(f"handler {getattr(fn, '__name__', fn)!r} must accept the payload as its first argument")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    ann = hints.get(params[0].name, params[0].annotation)
    if isinstance(ann, str):
        if ann in ("dict", "Any", "typing.Any", "dict[str, Any]", "dict[str, typing.Any]"):
            return None
        raise ConfigError(
            f"cannot resolve the annotation {ann!r} of handler {getattr(fn, '__name__', fn)!r}: define the "
            "type at module level, or pass schema= to register"
        )
    if ann in _NO_SCHEMA or typing.get_origin(ann) is dict:
        return None
    return ann


class HandlerRegistry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        max_retries: int | None = None,
        max_processing_time: int | None = None,
        retry_backoff_ms: int | None = None,
        schema: Any = None,
        skip_on_payload_error: bool = False,
    ) -> Handler:
        if not isinstance(name, str) or not name or len(name) > 255:
            raise ConfigError(f"handler name must be a non-empty string of at most 255 characters, not {name!r}")
        if not callable(fn):
            raise ConfigError(f"handler {name!r} must be callable, not {type(fn).__name__}")
        declared = schema if schema is not None else _declared_schema(fn)
        adapter = None
        if declared is not None:
            try:
                adapter = TypeAdapter(declared)
            except Exception as exc:
                raise ConfigError(f"handler {name!r}: cannot use {declared!r} as a payload schema: {exc}") from None
        params = _positional_params(fn)
        handler = Handler(
            name=name,
            fn=fn,
            max_retries=max_retries,
            max_processing_time=max_processing_time,
            retry_backoff_ms=retry_backoff_ms,
            schema=declared,
            skip_on_payload_error=skip_on_payload_error,
            is_async=inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__),
            wants_task=len(params) >= 2,
            _adapter=adapter,
        )
        self._handlers[name] = handler
        return handler

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def require(self, name: str) -> Handler:
        h = self._handlers.get(name)
        if h is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            raise UnknownHandlerError(f"no handler named {name!r} is registered (registered: {known})")
        return h

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __len__(self) -> int:
        return len(self._handlers)

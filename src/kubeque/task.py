"""The task record, its states, and the rules every backend applies to payloads."""

from __future__ import annotations

import enum
import json
import math
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidTaskError, PayloadError

DEFAULT_MAX_RETRIES = 3
DEFAULT_MAX_PROCESSING_TIME_MS = 10 * 60 * 1000
DEFAULT_RETRY_BACKOFF_MS = 1000
MAX_RETRY_BACKOFF_MS = 60 * 60 * 1000
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_ERROR_CHARS = 4000


class TaskStatus(enum.StrEnum):
    """Where a task is in its life. ``deleted`` is soft removal."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    DELETED = "deleted"

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.DELETED})


def utcnow() -> datetime:
    return datetime.now(UTC)


class Task(BaseModel):
    """One unit of work as the store holds it.

    ``attempt`` counts starts and fences every state change: a write only lands
    if the stored attempt is still the one the writer holds. ``retry_count``
    counts failed attempts that were retried.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    id: str = Field(min_length=1, max_length=255)
    handler: str = Field(min_length=1, max_length=255)
    payload: dict[str, Any]
    status: TaskStatus
    log: list[dict[str, Any]] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    # None: not set when the task was added; the handler's setting (else the
    # queue's default) applies when it runs.
    max_retries: int | None = Field(default=None, ge=0)
    max_processing_time: int | None = Field(default=None, gt=0)
    retry_count: int = Field(default=0, ge=0)
    priority: int = 0
    run_at: datetime
    attempt: int = Field(default=0, ge=0)
    worker: str | None = None
    lease_expires_at: datetime | None = None
    result: Any = None
    retry_backoff_ms: int | None = Field(default=None, ge=0)
    seq: int = 0
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("created_at", "updated_at", "run_at", "lease_expires_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            return v.replace(tzinfo=UTC)
        return v

    @classmethod
    def parse(cls, data: Any, *, source: str = "store") -> Task:
        """Validate a task coming from a store; a malformed one raises InvalidTaskError."""
        if isinstance(data, Task):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "task"
            tid = data.get("id") if isinstance(data, dict) else None
            raise InvalidTaskError(
                f"{source} returned a malformed task {tid!r}: field '{where}': {first['msg']}"
            ) from None

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class NewTask:
    """A validated task about to be stored. The store sets times from its own clock."""

    handler: str
    payload: dict[str, Any]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    priority: int = 0
    max_retries: int | None = DEFAULT_MAX_RETRIES
    max_processing_time: int | None = DEFAULT_MAX_PROCESSING_TIME_MS
    retry_backoff_ms: int | None = DEFAULT_RETRY_BACKOFF_MS
    run_at: datetime | None = None
    delay_ms: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def materialise(self, now: datetime, seq: int) -> Task:
        """The stored form, for stores that build rows in Python."""
        run_at = self.run_at or now + timedelta(milliseconds=self.delay_ms)
        return Task(
            id=self.id,
            handler=self.handler,
            payload=self.payload,
            status=TaskStatus.PENDING,
            log=[],
            created_at=now,
            updated_at=now,
            max_retries=self.max_retries,
            max_processing_time=self.max_processing_time,
            retry_count=0,
            priority=self.priority,
            run_at=run_at,
            retry_backoff_ms=self.retry_backoff_ms,
            seq=seq,
            extra=self.extra,
        )


@dataclass(frozen=True)
class Lease:
    """The attempt a worker holds on a task."""

    id: str
    attempt: int


@dataclass(frozen=True)
class Completion:
    id: str
    attempt: int
    result: Any = None


@dataclass(frozen=True)
class Failure:
    """A failed attempt. The store retries it (pending, retry_count + 1, run_at =
    now + retry_delay_ms) while retry_count < the task's max_retries (or, when
    the task stores none, this failure's), else marks it failed."""

    id: str
    attempt: int
    error: str
    retry_delay_ms: int
    outcome: str = "error"  # error | timeout | lost | unknown_handler
    only_if_expired: bool = False  # reclaim: land only if the lease has run out
    final: bool = False  # no retry whatever the count (e.g. unknown handler)
    # The limit when the task stores none (added where its handler was unknown).
    max_retries: int = DEFAULT_MAX_RETRIES

    def __post_init__(self) -> None:
        # Sanitised here, once, so that no store can fail to record a failure.
        object.__setattr__(self, "error", sanitise_error(self.error))


class FailOutcome(enum.StrEnum):
    RETRIED = "retried"
    FAILED = "failed"


@dataclass(frozen=True)
class QueueStats:
    counts: dict[str, int]
    oldest_pending_age_s: float | None  # of tasks already due; None when none are

    def as_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "oldest_pending_age_s": self.oldest_pending_age_s}


@dataclass(frozen=True)
class QueueDepth:
    """The waiting and running work, cheap enough to read every few seconds."""

    pending: int
    processing: int
    oldest_pending_age_s: float | None  # of tasks already due; None when none are

    @classmethod
    def from_stats(cls, stats: QueueStats) -> QueueDepth:
        return cls(
            pending=stats.counts.get(TaskStatus.PENDING.value, 0),
            processing=stats.counts.get(TaskStatus.PROCESSING.value, 0),
            oldest_pending_age_s=stats.oldest_pending_age_s,
        )


# --- payload rules -----------------------------------------------------------

# Floats this large are integral, and PostgreSQL's jsonb gives them back as
# integers: every store keeps them as integers so all give back the same.
_INTEGRAL_FLOAT = 1e16


def encode_json(value: Any, *, what: str = "payload", max_bytes: int | None = None) -> str:
    """Serialise to the one JSON text every backend stores, or raise PayloadError.

    Refuses what some store would refuse or silently change: NaN/Infinity, NUL
    characters, lone surrogates, non-JSON types, non-string keys, over-size.
    """
    try:
        normal = _normalise(value, what)
        text = json.dumps(normal, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except ValueError as exc:
        if "Out of range float" in str(exc):
            raise PayloadError(f"{what} contains NaN or Infinity, which JSON cannot hold") from None
        raise PayloadError(f"{what} is not JSON: {exc}") from None
    except TypeError as exc:
        raise PayloadError(
            f"{what} is not JSON: {exc}; convert it first, or declare a pydantic model "
            "for the handler so kubeque knows how to encode it"
        ) from None
    except RecursionError:
        raise PayloadError(f"{what} is nested too deeply to be stored as JSON") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise PayloadError(f"{what} contains a lone surrogate character, which is not valid UTF-8") from None
    if max_bytes is not None and size > max_bytes:
        raise PayloadError(f"{what} is {size} bytes of JSON, over the limit of {max_bytes} bytes")
    return text


def _normalise(value: Any, what: str) -> Any:
    """The value as every store gives it back: string keys only (json.dumps would
    turn others into strings silently), no NUL in any string, large floats as
    integers. Anything else non-JSON is left for json.dumps to refuse."""
    if isinstance(value, str):
        if "\x00" in value:
            raise PayloadError(f"{what} contains a NUL character (\\u0000), which PostgreSQL cannot store")
        return value
    if isinstance(value, dict):
        out = {}
        for k, item in value.items():
            if not isinstance(k, str):
                raise PayloadError(f"{what} has a non-string key {k!r}; JSON keys must be strings")
            out[_normalise(k, what)] = _normalise(item, what)
        return out
    if isinstance(value, (list, tuple)):
        return [_normalise(item, what) for item in value]
    if isinstance(value, float) and math.isfinite(value) and abs(value) >= _INTEGRAL_FLOAT:
        return int(value)
    return value


def check_payload(payload: Any, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """Return the payload as stored JSON would give it back, or raise PayloadError."""
    if not isinstance(payload, dict):
        raise PayloadError(f"payload must be a JSON object (a dict), not {type(payload).__name__}")
    text = encode_json(payload, what="payload", max_bytes=max_bytes)
    result: dict[str, Any] = json.loads(text)
    return result


def sanitise_error(text: object) -> str:
    """Error text safe for any store: no NUL, valid UTF-8, bounded length."""
    try:
        s = str(text)
    except Exception:  # a broken __str__ must not break failure recording
        s = f"<unprintable {type(text).__name__}>"
    s = s.replace("\x00", "\\0")
    s = s.encode("utf-8", "replace").decode("utf-8")
    if len(s) > MAX_ERROR_CHARS:
        s = s[: MAX_ERROR_CHARS - 15] + "... [truncated]"
    return s


def backoff_ms(base_ms: int, retry_count: int, *, cap_ms: int = MAX_RETRY_BACKOFF_MS) -> int:
    """Exponential backoff with jitter: base * 2^retry_count, capped, scaled by [0.5, 1]."""
    if base_ms <= 0:
        return 0
    raw = min(cap_ms, base_ms * (2 ** min(retry_count, 40)))
    return int(raw * (0.5 + random.random() / 2))


def start_entry(attempt: int, worker: str, now: datetime) -> dict[str, Any]:
    return {"attempt": attempt, "worker": worker, "started_at": now.isoformat()}


def end_fields(now: datetime, outcome: str, error: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"ended_at": now.isoformat(), "outcome": outcome}
    if error is not None:
        out["error"] = error
    return out

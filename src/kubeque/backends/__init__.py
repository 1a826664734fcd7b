"""Backends: one Repository protocol, one module per store."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .base import Repository

__all__ = ["Repository", "make_repository"]


def make_repository(config: Mapping[str, Any] | Repository) -> Repository:
    """Build a store from a config mapping as in queue-manager, or pass one through.

    ``{"type": "memory"}``, ``{"type": "file", "path": ...}``,
    ``{"type": "postgres", "dsn": ..., "schema": ...}``, ``{"type": "redis", "url": ..., "queue": ...}``,
    ``{"type": "custom", "repository": {"load_tasks": ..., "save_tasks": ..., "dequeue": ...}}``.
    """
    if not isinstance(config, Mapping):
        if isinstance(config, Repository):
            return config
        missing = sorted(m for m in _PROTOCOL_METHODS if not callable(getattr(config, m, None)))
        raise ConfigError(
            f"backend must be a config mapping or a Repository, not {type(config).__name__}"
            + (f" (it lacks {', '.join(missing)})" if missing else "")
        )
    opts = dict(config)
    kind = opts.pop("type", None)
    if kind == "memory":
        from .memory import MemoryRepository

        _no_extra(kind, opts)
        return MemoryRepository()
    if kind == "file":
        from .file import FileRepository

        if "path" not in opts:
            raise ConfigError("the file backend needs a 'path': {'type': 'file', 'path': 'tasks.json'}")
        return FileRepository(**opts)
    if kind == "postgres":
        from .postgres import PostgresRepository

        if not opts.get("dsn"):
            raise ConfigError("the postgres backend needs a 'dsn': {'type': 'postgres', 'dsn': 'postgresql://...'}")
        return PostgresRepository(**opts)
    if kind == "redis":
        from .redis import RedisRepository

        return RedisRepository(**opts)
    if kind == "custom":
        from .custom import CustomRepository

        repo = opts.pop("repository", None)
        _no_extra(kind, opts)
        if repo is None:
            raise ConfigError(
                "the custom backend needs a 'repository' with load_tasks, save_tasks and dequeue callables"
            )
        return CustomRepository.from_config(repo)
    raise ConfigError(f"unknown backend type {kind!r}: use one of memory, file, postgres, redis, custom")


_PROTOCOL_METHODS = [name for name, value in vars(Repository).items() if callable(value) and not name.startswith("_")]


def _no_extra(kind: str, opts: Mapping[str, Any]) -> None:
    if opts:
        raise ConfigError(f"the {kind} backend takes no options {sorted(opts)}")

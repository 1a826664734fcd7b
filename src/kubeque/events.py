"""Task lifecycle events: the seam that metrics, logging and users hook into."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .errors import ConfigError
from .task import Task

EventName = Literal[
    "task_added",
    "task_started",
    "task_completed",
    "task_failed",
    "task_retried",
    "task_removed",
    "task_stuck",
    "tasks_purged",
]
EVENT_NAMES: frozenset[str] = frozenset(get_args(EventName))


@dataclass(frozen=True)
class TaskEvent:
    """What a listener receives.

    ``task`` is the task as the store holds it after the change (for
    ``task_started`` the taken task); ``error`` is set for failed, retried and
    stuck; ``result`` for completed; ``count`` for ``tasks_purged``;
    ``duration_s`` for the end of an attempt; ``wait_s`` for ``task_started``.
    """

    name: str
    task: Task | None = None
    task_id: str | None = None
    error: str | None = None
    result: Any = None
    count: int | None = None
    duration_s: float | None = None
    wait_s: float | None = None
    outcome: str | None = None


Listener = Callable[[TaskEvent], Awaitable[None] | None]


class EventBus:
    """Calls listeners in order; a listener's error is logged, never propagated."""

    def __init__(self, logger: logging.Logger) -> None:
        self._listeners: dict[str, list[Listener]] = {name: [] for name in EVENT_NAMES}
        self._logger = logger

    def on(self, name: str, listener: Listener) -> None:
        if name not in EVENT_NAMES:
            raise ConfigError(f"unknown event {name!r}: use one of {', '.join(sorted(EVENT_NAMES))}")
        if not callable(listener):
            raise ConfigError(f"listener for {name!r} must be callable")
        self._listeners[name].append(listener)

    def off(self, name: str, listener: Listener) -> None:
        if name in self._listeners and listener in self._listeners[name]:
            self._listeners[name].remove(listener)

    def has_listeners(self, name: str) -> bool:
        return bool(self._listeners.get(name))

    async def emit(self, event: TaskEvent) -> None:
        for listener in list(self._listeners[event.name]):
            try:
                out = listener(event)
                if inspect.isawaitable(out):
                    await out
            except Exception:
                self._logger.exception("listener for %s raised; the queue goes on", event.name)

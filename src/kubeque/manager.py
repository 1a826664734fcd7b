"""QueueManager: the public face of kubeque.

Every operation is a coroutine (``await qm.add_task(...)``). Synchronous code
(a Flask or Django view, a script) uses ``qm.sync``, which runs the same
coroutines on a private event loop thread: ``qm.sync.add_task(...)``.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from .backends import make_repository
from .backends.base import UPDATABLE_FIELDS, Repository
from .errors import (
    ConfigError,
    KubequeError,
    PayloadError,
    TaskBusyError,
    TaskNotFoundError,
    UnknownHandlerError,
)
from .events import EventBus, Listener, TaskEvent
from .handlers import Handler, HandlerRegistry
from .task import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_PROCESSING_TIME_MS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_RETRY_BACKOFF_MS,
    NewTask,
    QueueDepth,
    QueueStats,
    Task,
    TaskStatus,
    check_payload,
)

if TYPE_CHECKING:
    from .sync import SyncQueueManager
    from .worker.runtime import Worker

F = TypeVar("F", bound=Callable[..., Any])
ProcessType = Literal["single", "multi-atomic"]
_TASK_OPTIONS = frozenset(
    {"priority", "max_retries", "max_processing_time", "retry_backoff_ms", "run_at", "delay", "id"}
)


# Durations past this are mistakes (a timestamp passed as a delay, say), and
# some stores could not hold the times they lead to.
MAX_DURATION_MS = 10 * 365 * 24 * 3600 * 1000
MAX_RETRIES_LIMIT = 2**31 - 1


def to_ms(
    value: int | float | timedelta | None, what: str, *, allow_zero: bool = False, scale: float = 1.0
) -> int | None:
    """Milliseconds from a number (of ms, or of seconds with scale=1000) or a
    timedelta; refuse nonsense clearly."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        raw = value.total_seconds() * 1000
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        raw = value * scale
    else:
        unit = "seconds" if scale == 1000 else "milliseconds (int)"
        raise ConfigError(f"{what} must be {unit} or a timedelta, not {type(value).__name__}")
    if not math.isfinite(raw) or abs(raw) > MAX_DURATION_MS:
        raise ConfigError(f"{what} must be at most 10 years, got {value!r}")
    ms = int(raw)
    if ms < 0 or (ms == 0 and not allow_zero):
        raise ConfigError(f"{what} must be {'>= 0' if allow_zero else '> 0'} ms, got {ms}")
    return ms


@dataclass(frozen=True)
class Defaults:
    max_retries: int = DEFAULT_MAX_RETRIES
    max_processing_time: int = DEFAULT_MAX_PROCESSING_TIME_MS
    retry_backoff_ms: int = DEFAULT_RETRY_BACKOFF_MS


class QueueManager:
    """Register handlers, add tasks, run workers, watch events, inspect the queue."""

    _instance: ClassVar[QueueManager | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        backend: Mapping[str, Any] | Repository | None = None,
        *,
        name: str = "default",
        process_type: ProcessType = "single",
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_processing_time: int | timedelta = DEFAULT_MAX_PROCESSING_TIME_MS,
        retry_backoff_ms: int | timedelta = DEFAULT_RETRY_BACKOFF_MS,
        poll_interval: float = 1.0,
        lease_ms: int | timedelta = 30_000,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        crash_on_worker_error: bool = False,
        validate_handlers: bool = True,
        retention: int | timedelta | None = None,
        prune_interval: float = 60.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if process_type not in ("single", "multi-atomic"):
            raise ConfigError(f"process_type must be 'single' or 'multi-atomic', not {process_type!r}")
        self.repository: Repository = make_repository(backend if backend is not None else {"type": "memory"})
        if process_type == "multi-atomic" and not self.repository.multi_process:
            raise ConfigError(
                f"the {self.repository.name} backend cannot be shared between processes, so it cannot run "
                "'multi-atomic'; use the postgres, redis or file backend, or process_type='single'"
            )
        _max_retries(max_retries)
        if poll_interval <= 0:
            raise ConfigError("poll_interval must be > 0 seconds")
        self.name = name
        self.process_type = process_type
        self.defaults = Defaults(
            max_retries=max_retries,
            max_processing_time=to_ms(max_processing_time, "max_processing_time") or 0,
            retry_backoff_ms=to_ms(retry_backoff_ms, "retry_backoff_ms", allow_zero=True) or 0,
        )
        self.poll_interval = poll_interval
        self.lease_ms = to_ms(lease_ms, "lease_ms") or 0
        self.max_payload_bytes = max_payload_bytes
        self.crash_on_worker_error = crash_on_worker_error
        self.validate_handlers = validate_handlers
        # Workers prune finished tasks older than this (ms); None keeps them all.
        self.retention_ms = to_ms(retention, "retention", allow_zero=True)
        self.prune_interval = prune_interval
        self.logger = logger or logging.getLogger("kubeque")
        self.handlers = HandlerRegistry()
        self.events = EventBus(self.logger)
        self._opened_loop: asyncio.AbstractEventLoop | None = None
        self._open_lock: asyncio.Lock | None = None
        self._worker: Worker | None = None
        self._sync: SyncQueueManager | None = None

    def configure_backend(self, backend: Mapping[str, Any] | Repository) -> None:
        """Replace the store before first use (the worker CLI's --dsn does this)."""
        if self._opened_loop is not None:
            raise ConfigError("the backend cannot be changed after the QueueManager has been used")
        repo = make_repository(backend)
        if self.process_type == "multi-atomic" and not repo.multi_process:
            raise ConfigError(f"the {repo.name} backend cannot run 'multi-atomic'")
        self.repository = repo

    # --- singleton ---------------------------------------------------------

    @classmethod
    def get_instance(cls, *args: Any, **kwargs: Any) -> QueueManager:
        """The shared manager of this process, created by the first call's arguments."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls(*args, **kwargs)
            elif args or kwargs:
                cls._instance.logger.debug("get_instance: instance exists, arguments ignored")
            return cls._instance

    @classmethod
    def reset_instance(cls) -> None:
        with cls._instance_lock:
            cls._instance = None

    # --- handlers ----------------------------------------------------------

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        max_retries: int | None = None,
        max_processing_time: int | timedelta | None = None,
        retry_backoff_ms: int | timedelta | None = None,
        schema: Any = None,
        skip_on_payload_error: bool = False,
    ) -> Handler:
        """Register ``fn`` under ``name``. Its first argument's annotation (a pydantic
        model, dataclass, TypedDict...) or ``schema`` validates payloads at add time."""
        return self.handlers.register(
            name,
            fn,
            max_retries=None if max_retries is None else _max_retries(max_retries),
            max_processing_time=to_ms(max_processing_time, "max_processing_time"),
            retry_backoff_ms=to_ms(retry_backoff_ms, "retry_backoff_ms", allow_zero=True),
            schema=schema,
            skip_on_payload_error=skip_on_payload_error,
        )

    def handler(self, name: str | None = None, **options: Any) -> Callable[[F], F]:
        """Decorator form of :meth:`register`; the name defaults to the function's."""

        def wrap(fn: F) -> F:
            self.register(name or fn.__name__, fn, **options)
            return fn

        return wrap

    def inspect_handler(self, name: str) -> dict[str, Any]:
        """A handler's settings, with the queue's defaults filled in where it sets none."""
        h = self.handlers.require(name)
        info = h.info()
        info["effective"] = {
            "max_retries": _first(h.max_retries, self.defaults.max_retries),
            "max_processing_time": _first(h.max_processing_time, self.defaults.max_processing_time),
            "retry_backoff_ms": _first(h.retry_backoff_ms, self.defaults.retry_backoff_ms),
        }
        return info

    # --- events ------------------------------------------------------------

    def on(self, event: str, listener: Listener) -> None:
        """Call ``listener(TaskEvent)`` on ``event`` (task_added, task_started, task_completed,
        task_failed, task_retried, task_removed, task_stuck, tasks_purged)."""
        self.events.on(event, listener)

    def off(self, event: str, listener: Listener) -> None:
        self.events.off(event, listener)

    # --- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Connect the store (done lazily by every operation)."""
        loop = asyncio.get_running_loop()
        if self._opened_loop is loop:
            return
        if self._opened_loop is not None and not self._opened_loop.is_closed():
            raise ConfigError(
                "this QueueManager is already bound to another event loop; use it from one loop, "
                "or from synchronous code through qm.sync"
            )
        if self._open_lock is None or self._opened_loop is not None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._opened_loop is loop:
                return
            await self.repository.open()
            self._opened_loop = loop

    async def close(self) -> None:
        """Stop the worker if running and release the store's connections."""
        if self._worker is not None:
            await self.stop_worker()
        if self._opened_loop is not None:
            await self.repository.close()
            self._opened_loop = None

    async def __aenter__(self) -> QueueManager:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def sync(self) -> SyncQueueManager:
        """The same API for synchronous code, e.g. ``qm.sync.add_task("email", {...})``."""
        if self._sync is None:
            from .sync import SyncQueueManager

            self._sync = SyncQueueManager(self)
        return self._sync

    # --- adding tasks ------------------------------------------------------

    def _new_task(self, handler: str, payload: Any, options: Mapping[str, Any]) -> NewTask | None:
        opts = dict(options)
        extra = _extra_fields(opts)
        h = self.handlers.get(handler)
        if h is None and self.validate_handlers:
            if not isinstance(handler, str):
                raise UnknownHandlerError(f"handler must be a string name, not {type(handler).__name__}")
            known = ", ".join(self.handlers.names()) or "none"
            raise UnknownHandlerError(
                f"no handler named {handler!r} is registered (registered: {known}); "
                "register it first, or create the QueueManager with validate_handlers=False in a process "
                "that only adds tasks"
            )
        if not isinstance(handler, str) or not handler:
            raise UnknownHandlerError(f"handler must be a non-empty string, not {handler!r}")
        try:
            data = h.validate(payload) if h is not None else payload
            if hasattr(data, "model_dump"):
                data = data.model_dump(mode="json")
            stored = check_payload(data, max_bytes=self.max_payload_bytes)
        except PayloadError as exc:
            if h is not None and h.skip_on_payload_error:
                self.logger.warning("skipped a task for handler %r: %s", handler, exc)
                return None
            raise
        if extra:
            try:
                extra = check_payload(extra, max_bytes=self.max_payload_bytes)
            except PayloadError as exc:
                raise PayloadError(f"extra task fields: {exc}") from None

        priority = _priority(opts.get("priority", 0))
        given = (
            None if opts.get("max_retries") is None else _max_retries(opts["max_retries"]),
            to_ms(opts.get("max_processing_time"), "max_processing_time"),
            to_ms(opts.get("retry_backoff_ms"), "retry_backoff_ms", allow_zero=True),
        )
        # Where the handler is unknown (a producer-only process), options not
        # given stay unset so the worker applies the handler's own settings.
        max_retries, mpt, backoff = self._resolve(h, *given) if h is not None else given
        run_at = opts.get("run_at")
        delay = opts.get("delay")
        if run_at is not None and delay is not None:
            raise ConfigError("give run_at or delay, not both")
        if run_at is not None:
            run_at = _run_at(run_at)
        delay_ms = to_ms(delay, "delay", allow_zero=True, scale=1000) or 0
        task_id = opts.get("id")
        if task_id is None:
            task_id = str(uuid.uuid4())
        elif not isinstance(task_id, str) or not task_id or len(task_id) > 255 or "\x00" in task_id:
            raise ConfigError(f"task id must be a non-empty string of at most 255 characters, not {task_id!r}")
        return NewTask(
            handler=handler,
            payload=stored,
            id=task_id,
            priority=priority,
            max_retries=max_retries,
            max_processing_time=mpt,
            retry_backoff_ms=backoff,
            run_at=run_at,
            delay_ms=delay_ms,
            extra=extra,
        )

    def _resolve(
        self, h: Handler | None, max_retries: int | None, mpt: int | None, backoff: int | None
    ) -> tuple[int, int, int]:
        """Task option, else handler option, else the queue's default."""
        return (
            _first(max_retries, h.max_retries if h else None, self.defaults.max_retries),
            _first(mpt, h.max_processing_time if h else None, self.defaults.max_processing_time),
            _first(backoff, h.retry_backoff_ms if h else None, self.defaults.retry_backoff_ms),
        )

    def effective(self, task: Task) -> tuple[int, int, int]:
        """(max_retries, max_processing_time, retry_backoff_ms) that apply to ``task`` here."""
        h = self.handlers.get(task.handler)
        return self._resolve(h, task.max_retries, task.max_processing_time, task.retry_backoff_ms)

    async def add_task(
        self, handler: str, payload: Any = None, *, connection: Any = None, **options: Any
    ) -> Task | None:
        """Add one task. Options: priority, max_retries, max_processing_time (ms),
        retry_backoff_ms, run_at (aware datetime) or delay (seconds), id; extra=
        (a mapping) and any other keyword are stored as extra fields (a keyword
        that looks like a misspelt option is refused). ``connection`` joins a caller's
        Postgres transaction. Returns None if the payload was skipped."""
        new = self._new_task(handler, {} if payload is None else payload, options)
        if new is None:
            return None
        tasks = await self._store([new], connection)
        return tasks[0]

    async def add_tasks(self, tasks: Iterable[Mapping[str, Any]], *, connection: Any = None) -> list[Task]:
        """Add many tasks in one round trip, all or none. Each item is a mapping with
        ``handler``, ``payload`` and any add_task option."""
        news: list[NewTask] = []
        for i, spec in enumerate(tasks):
            if not isinstance(spec, Mapping) or "handler" not in spec:
                raise ConfigError(f"task #{i} must be a mapping with a 'handler' key")
            opts = {k: v for k, v in spec.items() if k not in ("handler", "payload")}
            try:
                new = self._new_task(spec["handler"], {} if spec.get("payload") is None else spec["payload"], opts)
            except KubequeError as exc:
                raise type(exc)(f"task #{i}: {exc}") from None
            if new is not None:
                news.append(new)
        if not news:
            return []
        return await self._store(news, connection)

    async def _store(self, news: list[NewTask], connection: Any) -> list[Task]:
        await self.open()
        stored = await self.repository.add(news, connection=connection)
        if self.events.has_listeners("task_added"):
            for t in stored:
                await self.events.emit(TaskEvent("task_added", task=t, task_id=t.id))
        return stored

    # --- workers -----------------------------------------------------------

    async def start_worker(self, concurrency: int = 1, **options: Any) -> Worker:
        """Start taking and running tasks in the background of this event loop."""
        from .worker.runtime import Worker

        if self._worker is not None and self._worker.running:
            raise ConfigError("a worker is already running on this QueueManager; stop it first")
        await self.open()
        self._worker = Worker(self, concurrency=concurrency, **options)
        await self._worker.start()
        return self._worker

    async def stop_worker(self, grace: float = 30.0) -> None:
        """Stop taking tasks, let running ones finish within ``grace`` seconds,
        return the rest to pending without spending an attempt."""
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await worker.stop(grace)

    @property
    def worker(self) -> Worker | None:
        return self._worker

    # --- inspection --------------------------------------------------------

    async def get_all_tasks(self, status: TaskStatus | str | None = None, limit: int | None = None) -> list[Task]:
        await self.open()
        return await self.repository.list(_status(status), limit)

    async def get_task(self, task_id: str) -> Task | None:
        await self.open()
        return await self.repository.get(task_id)

    async def update_task(self, task_id: str, **fields: Any) -> Task:
        """Change a task's payload, priority, max_retries, max_processing_time,
        run_at, retry_backoff_ms or extra; ``status="pending"`` retries a finished
        (or removed) task with a fresh retry count. Raises TaskBusyError while it runs."""
        await self.open()
        unknown = set(fields) - UPDATABLE_FIELDS - {"status"}
        if unknown:
            raise ConfigError(
                f"cannot update {sorted(unknown)}; updatable fields: {sorted(UPDATABLE_FIELDS | {'status'})}"
            )
        current = await self.repository.get(task_id)
        if current is None:
            raise TaskNotFoundError(f"no task with id {task_id!r}")
        clean: dict[str, Any] = {}
        if "status" in fields:
            st = _status(fields["status"])
            if st is not TaskStatus.PENDING:
                raise ConfigError("status can only be set to 'pending' (to retry); use remove_task to delete")
            if current.status is TaskStatus.PROCESSING:
                raise TaskBusyError(task_id)
            # A pending task is already waiting: re-sending the status could
            # re-queue it if it ran and finished meanwhile. The store refuses the
            # change if the task is taken between this read and the write.
            if current.status is not TaskStatus.PENDING:
                clean["status"] = TaskStatus.PENDING
                clean["retry_count"] = 0
        if "payload" in fields:
            new = self._new_task(current.handler, fields["payload"], {})
            if new is None:
                raise PayloadError("payload refused")
            clean["payload"] = new.payload
        if "priority" in fields:
            clean["priority"] = _priority(fields["priority"])
        if "max_retries" in fields:
            clean["max_retries"] = _max_retries(fields["max_retries"])
        if "max_processing_time" in fields:
            clean["max_processing_time"] = to_ms(fields["max_processing_time"], "max_processing_time")
        if "retry_backoff_ms" in fields:
            clean["retry_backoff_ms"] = to_ms(fields["retry_backoff_ms"], "retry_backoff_ms", allow_zero=True)
        if "run_at" in fields:
            clean["run_at"] = _run_at(fields["run_at"])
        if "extra" in fields:
            e = fields["extra"]
            clean["extra"] = check_payload(e, max_bytes=self.max_payload_bytes)
        return await self.repository.update(task_id, clean)

    async def remove_task(self, task_id: str, hard: bool = False) -> bool:
        """Soft removal marks the task ``deleted``; ``hard=True`` deletes it."""
        await self.open()
        removed = await self.repository.remove(task_id, hard)
        if removed:
            await self.events.emit(TaskEvent("task_removed", task_id=task_id, outcome="hard" if hard else "soft"))
        return removed

    async def stats(self) -> QueueStats:
        """Counts by status and the age of the oldest due pending task."""
        await self.open()
        return await self.repository.stats()

    async def depth(self) -> QueueDepth:
        """Pending and processing counts and the oldest due pending age; cheap on
        every store (finished tasks are not counted)."""
        await self.open()
        return await self.repository.depth()

    async def purge(
        self,
        older_than: int | timedelta = timedelta(days=7),
        statuses: Iterable[TaskStatus | str] = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.DELETED),
        batch_size: int = 1000,
    ) -> int:
        """Delete finished tasks not updated for ``older_than`` (ms or timedelta), in bounded batches."""
        await self.open()
        age = to_ms(older_than, "older_than", allow_zero=True) or 0
        sts = [s for s in (_status(x) for x in statuses) if s is not None]
        if TaskStatus.PENDING in sts or TaskStatus.PROCESSING in sts:
            raise ConfigError("purge only removes finished tasks (completed, failed, deleted)")
        total = 0
        while True:
            n = await self.repository.purge(age, sts, batch_size)
            total += n
            if n < batch_size:
                break
        await self.events.emit(TaskEvent("tasks_purged", count=total))
        return total


def _extra_fields(opts: dict[str, Any]) -> dict[str, Any]:
    """Pop the extra fields out of add_task's keywords: ``extra=`` plus any
    keyword that is not an option, unless it looks like a misspelt option."""
    explicit = opts.pop("extra", None) or {}
    if not isinstance(explicit, Mapping):
        raise ConfigError(f"extra must be a mapping of field names to JSON values, not {type(explicit).__name__}")
    extra = dict(explicit)
    for key in [k for k in opts if k not in _TASK_OPTIONS]:
        close = difflib.get_close_matches(key, _TASK_OPTIONS, n=1, cutoff=0.75)
        if close:
            raise ConfigError(
                f"unknown task option {key!r}; did you mean {close[0]!r}? "
                f"(to store an extra field named {key!r}, pass extra={{{key!r}: ...}})"
            )
        extra[key] = opts.pop(key)
    return extra


def _priority(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) > 2**31 - 1:
        raise ConfigError(f"priority must be an integer within 32 bits, not {value!r}")
    return value


def _max_retries(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_RETRIES_LIMIT:
        raise ConfigError(f"max_retries must be an integer from 0 to {MAX_RETRIES_LIMIT}, not {value!r}")
    return value


def _run_at(value: Any) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ConfigError("run_at must be a timezone-aware datetime (e.g. datetime.now(timezone.utc))")
    return value


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def _status(value: TaskStatus | str | None) -> TaskStatus | None:
    if value is None or isinstance(value, TaskStatus):
        return value
    try:
        return TaskStatus(value)
    except ValueError:
        raise ConfigError(f"unknown status {value!r}: use one of {', '.join(s.value for s in TaskStatus)}") from None

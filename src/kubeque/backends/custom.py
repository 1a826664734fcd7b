"""Custom backend: your own store behind three callables, as in queue-manager.

You supply, each either a plain function or a coroutine function:

``load_tasks() -> list[dict]``
    Every stored task, as dicts with the fields of :class:`~kubeque.task.Task`
    (datetimes may be ``datetime`` objects or ISO 8601 strings; naive ones are UTC).

``save_tasks(tasks: list[dict]) -> None``
    Upsert the given tasks (dicts from ``Task.to_json_dict()``, datetimes as ISO
    strings): insert the new ids, replace the stored ones. One call should store
    all of them or none. The return value is ignored.

``dequeue(worker: str, limit: int, lease_ms: int, handlers: list[str] | None = None) -> list[dict]``
    Atomically claim up to ``limit`` due pending tasks (``status == "pending"``
    and ``run_at <= now``) in queue order (``priority`` descending, then
    ``run_at``, then ``seq``), store them claimed and return them as stored
    after the claim. Claiming means, in the same atomic step::

        status = "processing"; attempt = attempt + 1; worker = worker
        lease_expires_at = now + lease_ms; updated_at = now
        log.append({"attempt": attempt, "worker": worker, "started_at": now.isoformat()})

    The ``handlers`` parameter is optional: accept it to serve workers that take
    only some handlers (``None`` means all). :func:`claim_due` does the whole
    claim over Python data, for stores that are not databases.

``delete_tasks(ids: list[str]) -> None`` (optional)
    Delete tasks for good. Without it, hard removal and purging raise
    ConfigError.

Why ``dequeue`` does the whole claim rather than only marking tasks taken: the
``attempt`` number fences every later state change (a stale worker's
completion for attempt 1 must not land once attempt 2 has started). Only if
the increment happens in the same atomic step as the claim can two claimers
never hold the same attempt, and only then is a claimed task never seen
half-claimed (processing without a lease) by another process. It also keeps
the user's side to one statement (see ``examples/custom_postgres.py``).

Every other operation loads all tasks, applies the change with the memory
store's state machine (:class:`~kubeque.backends.memory.TaskTable`) and saves
the tasks that changed; an ``asyncio.Lock`` serialises them (and dequeue)
within the process. Everything a callable returns is validated: a malformed
task raises InvalidTaskError naming the task and the field. Times are this
machine's UTC clock (``now()``); use the same clock in ``dequeue``.

Several processes (``atomic=True``, which sets ``multi_process``) need more
from your store: ``dequeue`` atomic across processes (e.g. ``UPDATE ... FOR
UPDATE SKIP LOCKED``), and ``save_tasks`` that never lets an older attempt
overwrite a newer one (upsert only where the stored ``attempt`` is not greater
than the saved one). Beyond that, load-then-save is last-writer-wins between
processes: two processes acting on the same attempt at the same moment (a
worker finishing just as another reclaims its expired lease) or adding the same
id at once may both think they won, so delivery is at least once.

Sync callables run in a worker thread so a blocking store does not stall the
event loop; pass ``threaded=False`` for callables bound to the loop's thread
(an ``sqlite3`` connection, say).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import suppress
from datetime import datetime
from typing import Any, TypeVar

from ..errors import BackendError, ConfigError, InvalidTaskError, KubequeError
from ..task import (
    Task,
    TaskStatus,
    utcnow,
)
from .table import Op, TableRepository, TaskTable

__all__ = ["CustomRepository", "claim_due"]

_R = TypeVar("_R")

_REQUIRED = ("load_tasks", "save_tasks", "dequeue")
_OPTIONS = ("delete_tasks", "atomic", "threaded")


def claim_due(
    tasks: Iterable[Mapping[str, Any] | Task],
    worker: str,
    limit: int,
    lease_ms: int,
    handlers: Collection[str] | None = None,
    *,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Claim up to ``limit`` due pending tasks in queue order, for a ``dequeue`` over Python data.

    Returns the claimed tasks as dicts; store them (replacing the originals) and
    return them from ``dequeue``. Not atomic by itself: hold your store's lock
    around reading, claiming and storing.
    """
    table = TaskTable({t.id: t for t in (Task.parse(d, source="claim_due input") for d in tasks)})
    claimed = table.dequeue(worker, limit, lease_ms, now or utcnow(), handlers)
    return [t.to_json_dict() for t in claimed]


class CustomRepository(TableRepository):
    """A store made of the user's ``load_tasks``, ``save_tasks`` and ``dequeue`` callables."""

    name = "custom"

    def __init__(
        self,
        load_tasks: Callable[..., Any],
        save_tasks: Callable[..., Any],
        dequeue: Callable[..., Any],
        delete_tasks: Callable[..., Any] | None = None,
        *,
        atomic: bool = False,
        threaded: bool = True,
    ) -> None:
        """See the module docstring for what each callable must do.

        ``atomic=True`` declares that the callables are safe for several processes
        at once (and sets ``multi_process``); ``threaded=False`` calls sync callables
        on the event loop's thread instead of a worker thread.
        """
        for key, fn in (("load_tasks", load_tasks), ("save_tasks", save_tasks), ("dequeue", dequeue)):
            _check_callable(key, fn)
        if delete_tasks is not None:
            _check_callable("delete_tasks", delete_tasks)
        self._load_tasks = load_tasks
        self._save_tasks = save_tasks
        self._dequeue = dequeue
        self._delete_tasks = delete_tasks
        self.multi_process = bool(atomic)
        self.threaded = threaded
        self._dequeue_takes_handlers = _accepts_keyword(dequeue, "handlers")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    @classmethod
    def from_config(
        cls,
        repo: Mapping[str, Any] | object,
        *,
        atomic: bool | None = None,
        threaded: bool | None = None,
    ) -> CustomRepository:
        """Build from a mapping or an object holding ``load_tasks``, ``save_tasks``, ``dequeue``
        and optionally ``delete_tasks``, ``atomic`` and ``threaded``. Keyword arguments win."""
        if isinstance(repo, CustomRepository):
            return repo
        found: dict[str, Any] = {}
        if isinstance(repo, Mapping):
            unknown = sorted(str(k) for k in repo if k not in _REQUIRED + _OPTIONS)
            if unknown:
                raise ConfigError(
                    f"the custom backend does not know {unknown}; it takes load_tasks, save_tasks, dequeue "
                    "and optionally delete_tasks, atomic, threaded (snake_case, e.g. load_tasks not loadTasks)"
                )
            found = {k: repo[k] for k in _REQUIRED + _OPTIONS if repo.get(k) is not None}
        else:
            for key in _REQUIRED + _OPTIONS:
                value = getattr(repo, key, None)
                if value is not None:
                    found[key] = value
        for key in _REQUIRED:
            if key not in found:
                raise ConfigError(
                    f"the custom backend needs a '{key}' callable; supply load_tasks, save_tasks and dequeue "
                    "(see kubeque.backends.custom)"
                )
        return cls(
            found["load_tasks"],
            found["save_tasks"],
            found["dequeue"],
            found.get("delete_tasks"),
            atomic=bool(found.get("atomic", False)) if atomic is None else atomic,
            threaded=bool(found.get("threaded", True)) if threaded is None else threaded,
        )

    def __repr__(self) -> str:
        return f"CustomRepository(atomic={self.multi_process})"

    # --- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        """Load the store once, so a broken store shows up at start, not at the first task."""
        async with self._locked():
            await self._load()

    # --- the Repository operations ------------------------------------------------

    async def dequeue(
        self, worker: str, limit: int, lease_ms: int, handlers: Collection[str] | None = None
    ) -> list[Task]:
        if limit <= 0 or (handlers is not None and not handlers):
            return []
        kwargs: dict[str, Any] = {}
        if self._dequeue_takes_handlers:
            kwargs["handlers"] = None if handlers is None else sorted(handlers)
        elif handlers is not None:
            raise ConfigError(
                "this worker takes only some handlers, but the custom dequeue has no 'handlers' parameter; "
                "add `handlers: list[str] | None = None` to it and claim only tasks of those handlers"
            )
        async with self._locked():
            raw = await self._call("dequeue", self._dequeue, worker, limit, lease_ms, **kwargs)
        tasks = _parse_tasks(raw, "dequeue")
        _check_claimed(tasks, worker, limit, handlers)
        tasks.sort(key=lambda t: (-t.priority, t.run_at, t.seq))
        return tasks

    async def remove(self, task_id: str, hard: bool) -> bool:
        if hard:
            self._need_delete("hard removal")
        return await super().remove(task_id, hard)

    async def purge(self, older_than_ms: int, statuses: Collection[TaskStatus], limit: int) -> int:
        self._need_delete("purging")
        return await super().purge(older_than_ms, statuses, limit)

    async def wait_for_work(self, timeout: float) -> None:
        """Wake on work added in this process; other processes are seen after ``timeout``."""
        event = self._event()
        with suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        event.clear()

    @property
    def can_delete(self) -> bool:
        """Whether hard removal and purging are available (a ``delete_tasks`` was given)."""
        return self._delete_tasks is not None

    # --- plumbing ----------------------------------------------------------------

    async def _apply(self, op: Op[_R]) -> _R:
        async with self._locked():
            table = await self._load()
            before = dict(table.tasks)
            result = op(table, utcnow())
            # TaskTable replaces a task object on every change, so identity shows what to save.
            removed = [tid for tid in before if tid not in table.tasks]
            changed = [t for tid, t in table.tasks.items() if before.get(tid) is not t]
            if removed:
                assert self._delete_tasks is not None  # checked by the callers that remove
                await self._call("delete_tasks", self._delete_tasks, removed)
            if changed:
                await self._call("save_tasks", self._save_tasks, [t.to_json_dict() for t in changed])
            return result

    async def _load(self) -> TaskTable:
        tasks = _parse_tasks(await self._call("load_tasks", self._load_tasks), "load_tasks")
        by_id: dict[str, Task] = {}
        for t in tasks:
            if t.id in by_id:
                raise InvalidTaskError(f"custom backend load_tasks returned task {t.id!r} twice; ids must be unique")
            by_id[t.id] = t
        return TaskTable(by_id)

    async def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            if self.threaded and not _is_async(fn):
                result = await asyncio.to_thread(fn, *args, **kwargs)
            else:
                result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except KubequeError:
            raise
        except Exception as exc:
            raise BackendError(f"custom backend {what} raised {type(exc).__name__}: {exc}") from exc
        return result

    def _need_delete(self, what: str) -> None:
        if self._delete_tasks is None:
            raise ConfigError(
                f"{what} deletes tasks, and this custom backend has no delete_tasks; "
                "supply delete_tasks(ids: list[str]) or use soft removal"
            )

    def _bind(self) -> None:
        # asyncio primitives belong to one loop; start afresh when used from another one.
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._lock = asyncio.Lock()
            self._wake = asyncio.Event()

    def _locked(self) -> asyncio.Lock:
        self._bind()
        return self._lock

    def _event(self) -> asyncio.Event:
        self._bind()
        return self._wake

    def _wake_up(self) -> None:
        self._event().set()


def _check_callable(key: str, fn: Any) -> None:
    if not callable(fn):
        raise ConfigError(f"the custom backend's '{key}' must be callable, not {type(fn).__name__}")


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


def _accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        (p.name == name and p.kind is not inspect.Parameter.POSITIONAL_ONLY) or p.kind is inspect.Parameter.VAR_KEYWORD
        for p in params
    )


def _parse_tasks(value: Any, what: str) -> list[Task]:
    """Validate what a callable returned: a list of task dicts."""
    if not isinstance(value, (list, tuple)):
        raise InvalidTaskError(
            f"custom backend {what} returned {type(value).__name__}, not a list of task dicts; "
            "return a list (an empty one when there are no tasks)"
        )
    out = []
    for i, item in enumerate(value):
        if isinstance(item, Mapping) and not isinstance(item, dict):
            item = dict(item)
        if not isinstance(item, (dict, Task)):
            raise InvalidTaskError(
                f"custom backend {what} returned {type(item).__name__} at index {i}, not a task dict"
            )
        out.append(Task.parse(item, source=f"custom backend {what}"))
    return out


def _check_claimed(tasks: list[Task], worker: str, limit: int, handlers: Collection[str] | None) -> None:
    """A dequeue must return only tasks it claimed for this worker, as the module docstring says."""
    if len(tasks) > limit:
        raise InvalidTaskError(f"custom backend dequeue returned {len(tasks)} tasks, more than the limit {limit}")
    seen: set[str] = set()
    for t in tasks:
        problem = None
        if t.id in seen:
            problem = "twice"
        elif t.status is not TaskStatus.PROCESSING:
            problem = f"with status '{t.status}'"
        elif t.worker != worker:
            problem = f"claimed by worker {t.worker!r}, not {worker!r}"
        elif t.attempt < 1:
            problem = f"with attempt {t.attempt}"
        elif t.lease_expires_at is None:
            problem = "without lease_expires_at"
        elif not t.log or t.log[-1].get("attempt") != t.attempt:
            problem = f"without a start entry for attempt {t.attempt} at the end of its log"
        elif handlers is not None and t.handler not in handlers:
            problem = f"of handler {t.handler!r}, which this worker did not ask for"
        if problem is not None:
            raise InvalidTaskError(
                f"custom backend dequeue returned task {t.id!r} {problem}; dequeue must claim each task it "
                "returns (status 'processing', attempt + 1, worker, lease_expires_at, a log start entry) and "
                "return it as stored: see kubeque.backends.custom"
            )
        seen.add(t.id)

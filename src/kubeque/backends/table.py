"""The task state machine over a dict of tasks, and the Repository built on it.

The memory, file and custom stores keep tasks as Python objects; they differ
only in where the dict lives and how a change is made durable. ``TaskTable``
applies every operation; ``TableRepository`` maps the protocol onto it through
one ``_apply`` that each store defines.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from ..errors import DuplicateTaskError, TaskBusyError, TaskNotFoundError
from ..task import (
    Completion,
    FailOutcome,
    Failure,
    Lease,
    NewTask,
    QueueDepth,
    QueueStats,
    Task,
    TaskStatus,
    end_fields,
    start_entry,
    utcnow,
)

_R = TypeVar("_R")
Op = Callable[["TaskTable", datetime], _R]


class TaskTable:
    """The state machine over a dict of tasks, shared by the memory and file stores.

    Ready tasks sit in a heap keyed by queue order; tasks due later sit in a
    heap keyed by run_at and move over when due. Heap entries are checked
    against the task on pop (lazy deletion) instead of being removed.
    """

    def __init__(self, tasks: Mapping[str, Task] | None = None, next_seq: int = 1) -> None:
        self.tasks: dict[str, Task] = dict(tasks or {})
        self.next_seq = max([next_seq, *(t.seq + 1 for t in self.tasks.values())])
        self._ready: list[tuple[int, datetime, int, str]] = []
        self._later: list[tuple[datetime, int, str]] = []
        for t in self.tasks.values():
            if t.status is TaskStatus.PENDING:
                heapq.heappush(self._later, (t.run_at, t.seq, t.id))

    def _schedule(self, t: Task) -> None:
        heapq.heappush(self._later, (t.run_at, t.seq, t.id))

    def add(self, new: Sequence[NewTask], now: datetime) -> list[Task]:
        ids = [n.id for n in new]
        seen: set[str] = set()
        for i in ids:
            if i in self.tasks or i in seen:
                raise DuplicateTaskError(f"a task with id {i!r} already exists; nothing was stored")
            seen.add(i)
        out = []
        for n in new:
            t = n.materialise(now, self.next_seq)
            self.next_seq += 1
            self.tasks[t.id] = t
            self._schedule(t)
            out.append(t)
        return [t.model_copy(deep=True) for t in out]

    def next_due(self) -> datetime | None:
        """When the earliest delayed task falls due (may be stale: an upper bound on sleep)."""
        return self._later[0][0] if self._later else None

    def _promote(self, now: datetime) -> None:
        while self._later and self._later[0][0] <= now:
            run_at, seq, tid = heapq.heappop(self._later)
            t = self.tasks.get(tid)
            if t is not None and t.status is TaskStatus.PENDING and t.run_at == run_at and t.seq == seq:
                heapq.heappush(self._ready, (-t.priority, t.run_at, t.seq, tid))

    def dequeue(
        self, worker: str, limit: int, lease_ms: int, now: datetime, handlers: Collection[str] | None
    ) -> list[Task]:
        self._promote(now)
        taken: list[Task] = []
        skipped: list[tuple[int, datetime, int, str]] = []
        while self._ready and len(taken) < limit:
            entry = heapq.heappop(self._ready)
            negp, run_at, _seq, tid = entry
            t = self.tasks.get(tid)
            if (
                t is None
                or t.status is not TaskStatus.PENDING
                or t.priority != -negp
                or t.run_at != run_at
                or t.run_at > now
            ):
                continue  # stale entry; the task was changed and re-scheduled
            if handlers is not None and t.handler not in handlers:
                skipped.append(entry)
                continue
            attempt = t.attempt + 1
            t2 = t.model_copy(
                update={
                    "status": TaskStatus.PROCESSING,
                    "attempt": attempt,
                    "worker": worker,
                    "lease_expires_at": now + timedelta(milliseconds=lease_ms),
                    "log": [*t.log, start_entry(attempt, worker, now)],
                    "updated_at": now,
                }
            )
            self.tasks[tid] = t2
            taken.append(t2.model_copy(deep=True))
        for e in skipped:
            heapq.heappush(self._ready, e)
        return taken

    def _held(self, tid: str, attempt: int) -> Task | None:
        t = self.tasks.get(tid)
        if t is None or t.status is not TaskStatus.PROCESSING or t.attempt != attempt:
            return None
        return t

    def heartbeat(self, worker: str, leases: Sequence[Lease], lease_ms: int, now: datetime) -> list[str]:
        out = []
        for lease in leases:
            t = self._held(lease.id, lease.attempt)
            if t is not None and t.worker == worker:
                self.tasks[t.id] = t.model_copy(update={"lease_expires_at": now + timedelta(milliseconds=lease_ms)})
                out.append(t.id)
        return out

    @staticmethod
    def _close_log(t: Task, fields: dict[str, Any]) -> list[dict[str, Any]]:
        log = [dict(e) for e in t.log]
        if log:
            log[-1].update(fields)
        return log

    def complete(self, done: Sequence[Completion], now: datetime) -> list[str]:
        out = []
        for c in done:
            t = self._held(c.id, c.attempt)
            if t is None:
                continue
            self.tasks[t.id] = t.model_copy(
                update={
                    "status": TaskStatus.COMPLETED,
                    "result": c.result,
                    "worker": None,
                    "lease_expires_at": None,
                    "updated_at": now,
                    "log": self._close_log(t, end_fields(now, "completed")),
                }
            )
            out.append(t.id)
        return out

    def fail(self, f: Failure, now: datetime) -> FailOutcome | None:
        t = self._held(f.id, f.attempt)
        if t is None:
            return None
        if f.only_if_expired and (t.lease_expires_at is None or t.lease_expires_at > now):
            return None
        log = self._close_log(t, end_fields(now, f.outcome, f.error))
        common = {"worker": None, "lease_expires_at": None, "updated_at": now, "log": log}
        limit = t.max_retries if t.max_retries is not None else f.max_retries
        if not f.final and t.retry_count < limit:
            t2 = t.model_copy(
                update={
                    **common,
                    "status": TaskStatus.PENDING,
                    "retry_count": t.retry_count + 1,
                    "run_at": now + timedelta(milliseconds=f.retry_delay_ms),
                }
            )
            self.tasks[t.id] = t2
            self._schedule(t2)
            return FailOutcome.RETRIED
        self.tasks[t.id] = t.model_copy(update={**common, "status": TaskStatus.FAILED})
        return FailOutcome.FAILED

    def release(self, leases: Sequence[Lease], now: datetime) -> list[str]:
        out = []
        for lease in leases:
            t = self._held(lease.id, lease.attempt)
            if t is None:
                continue
            t2 = t.model_copy(
                update={
                    "status": TaskStatus.PENDING,
                    "worker": None,
                    "lease_expires_at": None,
                    "updated_at": now,
                    "log": self._close_log(t, end_fields(now, "released")),
                }
            )
            self.tasks[t.id] = t2
            self._schedule(t2)
            out.append(t.id)
        return out

    def expired(self, limit: int, now: datetime) -> list[Task]:
        out = [
            t.model_copy(deep=True)
            for t in self.tasks.values()
            if t.status is TaskStatus.PROCESSING and t.lease_expires_at is not None and t.lease_expires_at <= now
        ]
        out.sort(key=lambda t: t.seq)
        return out[:limit]

    def get(self, task_id: str) -> Task | None:
        t = self.tasks.get(task_id)
        return None if t is None else t.model_copy(deep=True)

    def list(self, status: TaskStatus | None, limit: int | None) -> list[Task]:
        out = sorted((t for t in self.tasks.values() if status is None or t.status is status), key=lambda t: t.seq)
        if limit is not None:
            out = out[:limit]
        return [t.model_copy(deep=True) for t in out]

    def update(self, task_id: str, fields: Mapping[str, Any], now: datetime) -> Task:
        t = self.tasks.get(task_id)
        if t is None:
            raise TaskNotFoundError(f"no task with id {task_id!r}")
        if "status" in fields and t.status is TaskStatus.PROCESSING:
            # Checked here, in the same step as the change, so a task taken since the caller looked is not reset.
            raise TaskBusyError(task_id)
        t2 = t.model_copy(update={**fields, "updated_at": now})
        if t2.status is TaskStatus.PENDING and "run_at" not in fields and t.status is not TaskStatus.PENDING:
            t2 = t2.model_copy(update={"run_at": now, "worker": None, "lease_expires_at": None})
        self.tasks[task_id] = Task.model_validate(t2.model_dump())
        if t2.status is TaskStatus.PENDING:
            self._schedule(self.tasks[task_id])
        return self.tasks[task_id].model_copy(deep=True)

    def remove(self, task_id: str, hard: bool, now: datetime) -> bool:
        t = self.tasks.get(task_id)
        if t is None:
            return False
        if hard:
            del self.tasks[task_id]
        else:
            # An attempt running at this moment is closed in the log as removed.
            log = self._close_log(t, end_fields(now, "removed")) if t.status is TaskStatus.PROCESSING else t.log
            self.tasks[task_id] = t.model_copy(
                update={
                    "status": TaskStatus.DELETED,
                    "updated_at": now,
                    "worker": None,
                    "lease_expires_at": None,
                    "log": log,
                }
            )
        return True

    def stats(self, now: datetime) -> QueueStats:
        counts = {s.value: 0 for s in TaskStatus}
        oldest: datetime | None = None
        for t in self.tasks.values():
            counts[t.status.value] += 1
            if t.status is TaskStatus.PENDING and t.run_at <= now and (oldest is None or t.run_at < oldest):
                oldest = t.run_at
        age = None if oldest is None else max(0.0, (now - oldest).total_seconds())
        return QueueStats(counts=counts, oldest_pending_age_s=age)

    def purge(self, older_than_ms: int, statuses: Collection[TaskStatus], limit: int, now: datetime) -> int:
        cutoff = now - timedelta(milliseconds=older_than_ms)
        victims = [t.id for t in self.tasks.values() if t.status in statuses and t.updated_at <= cutoff][:limit]
        for tid in victims:
            del self.tasks[tid]
        return len(victims)


class TableRepository:
    """The Repository protocol over a TaskTable. Subclasses define ``_apply``
    (run one operation on the current table, durably) and may override
    ``_wake_up`` (new or returned work may be due)."""

    name = "table"
    multi_process = False

    async def _apply(self, op: Op[_R]) -> _R:
        raise NotImplementedError

    def _wake_up(self) -> None:
        return None

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def now(self) -> datetime:
        return utcnow()

    async def add(self, tasks: Sequence[NewTask], *, connection: Any = None) -> list[Task]:
        if connection is not None:
            raise TypeError(f"the {self.name} backend has no connections; transactional enqueue needs postgres")
        new = list(tasks)
        if not new:
            return []
        out = await self._apply(lambda t, now: t.add(new, now))
        self._wake_up()
        return out

    async def dequeue(
        self, worker: str, limit: int, lease_ms: int, handlers: Collection[str] | None = None
    ) -> list[Task]:
        if limit <= 0:
            return []
        return await self._apply(lambda t, now: t.dequeue(worker, limit, lease_ms, now, handlers))

    async def heartbeat(self, worker: str, leases: Sequence[Lease], lease_ms: int) -> list[str]:
        held = list(leases)
        if not held:
            return []
        return await self._apply(lambda t, now: t.heartbeat(worker, held, lease_ms, now))

    async def complete(self, done: Sequence[Completion]) -> list[str]:
        items = list(done)
        if not items:
            return []
        return await self._apply(lambda t, now: t.complete(items, now))

    async def fail(self, failure: Failure) -> FailOutcome | None:
        out = await self._apply(lambda t, now: t.fail(failure, now))
        if out is FailOutcome.RETRIED:
            self._wake_up()
        return out

    async def release(self, leases: Sequence[Lease]) -> list[str]:
        held = list(leases)
        if not held:
            return []
        out = await self._apply(lambda t, now: t.release(held, now))
        if out:
            self._wake_up()
        return out

    async def expired(self, limit: int) -> list[Task]:
        return await self._apply(lambda t, now: t.expired(limit, now))

    async def get(self, task_id: str) -> Task | None:
        return await self._apply(lambda t, now: t.get(task_id))

    async def list(self, status: TaskStatus | None = None, limit: int | None = None) -> list[Task]:
        return await self._apply(lambda t, now: t.list(status, limit))

    async def update(self, task_id: str, fields: Mapping[str, Any]) -> Task:
        changes = dict(fields)
        out = await self._apply(lambda t, now: t.update(task_id, changes, now))
        self._wake_up()
        return out

    async def remove(self, task_id: str, hard: bool) -> bool:
        return await self._apply(lambda t, now: t.remove(task_id, hard, now))

    async def stats(self) -> QueueStats:
        return await self._apply(lambda t, now: t.stats(now))

    async def depth(self) -> QueueDepth:
        return QueueDepth.from_stats(await self.stats())

    async def purge(self, older_than_ms: int, statuses: Collection[TaskStatus], limit: int) -> int:
        wanted = frozenset(statuses)
        return await self._apply(lambda t, now: t.purge(older_than_ms, wanted, limit, now))

"""The Repository protocol every store implements, and the contract it keeps.

All methods are coroutines. Times come from the store's own clock. Every state
change on a taken task is guarded by ``(id, attempt)``: if the stored attempt or
status no longer matches, the change does not land and the method reports so.

Order of ``dequeue``: ``priority DESC, run_at ASC, seq ASC`` among pending tasks
whose ``run_at <= now``. ``seq`` is the store's insertion order; tasks in one
``add`` call get increasing seq in list order.

``dequeue`` sets ``status=processing``, ``attempt += 1``, ``worker``,
``lease_expires_at = now + lease_ms``, appends ``start_entry(...)`` to ``log``.
``complete``/``fail``/``release`` clear ``worker`` and ``lease_expires_at`` and
(complete/fail) merge ``end_fields(...)`` into the last log entry.
``release`` returns the task to ``pending`` without touching ``retry_count`` and
marks the last log entry ``outcome: released``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from ..task import Completion, FailOutcome, Failure, Lease, NewTask, QueueDepth, QueueStats, Task, TaskStatus

# Fields callers may change through update_task; the rest belong to the queue.
UPDATABLE_FIELDS = frozenset(
    {"payload", "priority", "max_retries", "max_processing_time", "run_at", "retry_backoff_ms", "extra"}
)
# What Repository.update accepts: those, plus a manual retry's status and retry_count.
UPDATE_KEYS = UPDATABLE_FIELDS | {"status", "retry_count"}


@runtime_checkable
class Repository(Protocol):
    name: str
    #: whether several processes may dequeue from the same queue safely
    multi_process: bool

    async def open(self) -> None:
        """Connect and prepare (migrate) the store. Idempotent."""

    async def close(self) -> None: ...

    async def now(self) -> datetime:
        """The store's clock, timezone-aware UTC."""

    async def add(self, tasks: Sequence[NewTask], *, connection: Any = None) -> list[Task]:
        """Store all or none. Raises DuplicateTaskError if any id exists (or repeats)."""

    async def dequeue(
        self, worker: str, limit: int, lease_ms: int, handlers: Collection[str] | None = None
    ) -> list[Task]:
        """Take up to ``limit`` due pending tasks in queue order, atomically."""

    async def heartbeat(self, worker: str, leases: Sequence[Lease], lease_ms: int) -> list[str]:
        """Extend leases still held by ``worker``; return the ids renewed."""

    async def complete(self, done: Sequence[Completion]) -> list[str]:
        """Mark completed with result; return ids whose guard held."""

    async def fail(self, failure: Failure) -> FailOutcome | None:
        """Retry or fail one attempt; None when the guard did not hold."""

    async def release(self, leases: Sequence[Lease]) -> list[str]:
        """Return taken tasks to pending without spending an attempt."""

    async def expired(self, limit: int) -> list[Task]:
        """Processing tasks whose lease has run out (workers that died)."""

    async def get(self, task_id: str) -> Task | None: ...

    async def list(self, status: TaskStatus | None = None, limit: int | None = None) -> list[Task]:
        """Tasks in queue order (seq), optionally of one status."""

    async def update(self, task_id: str, fields: Mapping[str, Any]) -> Task:
        """Change UPDATABLE_FIELDS (already validated) of a task; also
        ``status=pending`` (possibly with ``retry_count=0``) to retry a finished
        one, which resets ``run_at`` to now unless given and clears worker and
        lease. Raises TaskNotFoundError."""

    async def remove(self, task_id: str, hard: bool) -> bool:
        """Soft removal sets ``deleted``; hard removal deletes. False if absent."""

    async def stats(self) -> QueueStats: ...

    async def depth(self) -> QueueDepth:
        """Pending and processing counts and the oldest due pending age, without
        touching finished tasks (metrics and scaling read it often)."""

    async def purge(self, older_than_ms: int, statuses: Collection[TaskStatus], limit: int) -> int:
        """Delete up to ``limit`` tasks of ``statuses`` not updated for ``older_than_ms``."""

    async def wait_for_work(self, timeout: float) -> None:
        """Return when new work may be due (a notification) or after ``timeout`` s."""

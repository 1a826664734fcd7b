"""The PostgreSQL Repository: one schema per queue, every statement a named ``.sql`` file.

Each method is one statement on a pooled autocommit connection, so each is its
own transaction and ``now()`` is the moment it runs. The pool belongs to the
event loop that opened it; a repository used from a new loop after its old one
closed opens a fresh pool there.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ...errors import BackendError, ConfigError, DuplicateTaskError, TaskBusyError, TaskNotFoundError, one_line
from ...task import (
    Completion,
    FailOutcome,
    Failure,
    Lease,
    NewTask,
    QueueDepth,
    QueueStats,
    Task,
    TaskStatus,
    encode_json,
    sanitise_error,
)
from ..base import UPDATE_KEYS
from .connect import backend_error, connect_kwargs, describe
from .migrate import ensure_migrated
from .queries import channel_name, check_identifier, listen, query

__all__ = ["PostgresRepository"]

log = logging.getLogger("kubeque.backends.postgres")

_TASK_FIELDS = tuple(Task.model_fields)
_TIME_FIELDS = ("created_at", "updated_at", "run_at", "lease_expires_at")
# Reconnecting a lost listener: 0.1 s doubling to at most 5 s, never past the caller's timeout.
_LISTEN_BACKOFF_BASE_S = 0.1
_LISTEN_BACKOFF_CAP_S = 5.0
_POOL_TIMEOUT_S = 15.0

_Conn = psycopg.AsyncConnection[DictRow]


class PostgresRepository:
    """Tasks of one queue in the ``tasks`` table of its own schema.

    ``dsn`` is a libpq connection string or URL; ``schema`` names the queue
    (validated, always quoted as an identifier). ``open()`` migrates the schema
    when ``auto_migrate`` (else checks it and raises SchemaMissingError) and
    opens a pool of ``min_size``..``max_size`` connections tagged with
    ``application_name``. Every method opens the repository if needed.
    """

    name = "postgres"
    multi_process = True

    def __init__(
        self,
        dsn: str,
        schema: str = "kubeque",
        *,
        min_size: int = 1,
        max_size: int = 10,
        application_name: str = "kubeque",
        auto_migrate: bool = True,
    ) -> None:
        self.schema = check_identifier(schema)
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigError("the postgres backend needs a DSN such as 'postgresql://user@host:5432/db'")
        if min_size < 0 or max_size < 1 or min_size > max_size:
            raise ConfigError(
                f"pool sizes must satisfy 0 <= min_size <= max_size and max_size >= 1, "
                f"got min_size={min_size}, max_size={max_size}"
            )
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.application_name = application_name
        self.auto_migrate = auto_migrate
        self.channel = channel_name(schema)

        self._prepared = False  # schema migrated or checked once; later pools skip it
        self._pool: AsyncConnectionPool[_Conn] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._listener_loop: asyncio.AbstractEventLoop | None = None
        self._listener_lost = False  # notifications may have been missed since
        self._listen_failures = 0
        self._listen_retry_at = 0.0  # time.monotonic() before which not to try again
        self._listen_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._generation = 0  # bumped by close(), so a waiter does not reconnect after it

        # Chore locks (exclusive()) live on one dedicated connection, never a pooled one.
        self._chore_conn: _Conn | None = None
        self._chore_loop: asyncio.AbstractEventLoop | None = None
        self._chores_held: dict[str, _Conn] = {}  # lock key -> the chore connection holding it
        self._chore_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"PostgresRepository({describe(self.dsn)!r}, schema={self.schema!r})"

    # --- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> PostgresRepository:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Migrate (or check) the schema once, then open the pool on the running loop. Idempotent."""
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._loop is loop:
            return
        async with _lock_for(self._open_locks, loop):
            if self._pool is not None:
                if self._loop is loop:
                    return
                self._forget_other_loop()
            if not self._prepared:
                applied = await asyncio.to_thread(
                    ensure_migrated,
                    self.dsn,
                    self.schema,
                    auto_migrate=self.auto_migrate,
                    application_name=self.application_name,
                )
                if applied:
                    log.info("migrated queue schema %r to version %d", self.schema, applied[-1])
                self._prepared = True
            kwargs: dict[str, Any] = {
                "autocommit": True,
                "row_factory": dict_row,
                **connect_kwargs(self.dsn, self.application_name),
            }
            pool = AsyncConnectionPool(
                self.dsn,
                connection_class=psycopg.AsyncConnection[DictRow],
                kwargs=kwargs,
                min_size=self.min_size,
                max_size=self.max_size,
                open=False,
                name=f"kubeque-{self.schema}",
                # A connection the server dropped is replaced at checkout instead of failing one call.
                check=AsyncConnectionPool.check_connection,
                timeout=_POOL_TIMEOUT_S,
            )
            try:
                await pool.open(wait=True, timeout=_POOL_TIMEOUT_S)
            except (PoolTimeout, psycopg.Error) as exc:
                await pool.close()
                raise BackendError(
                    f"could not open connections to PostgreSQL at {describe(self.dsn)}: {one_line(exc)}"
                ) from exc
            self._pool, self._loop = pool, loop

    def _forget_other_loop(self) -> None:
        old = self._loop
        if old is not None and old.is_running() and not old.is_closed():
            raise BackendError(
                "this PostgresRepository is open on another running event loop; use one repository per event loop"
            )
        # The old loop is gone and its pool with it; its sockets close when collected.
        log.debug("queue %r: event loop changed; opening a new pool", self.schema)
        self._pool = self._loop = None
        if self._listener_loop is not asyncio.get_running_loop():
            self._listener = self._listener_loop = None
        if self._chore_loop is not asyncio.get_running_loop():
            # That session dies with its loop and frees its locks.
            self._chore_conn = self._chore_loop = None
            self._chores_held.clear()

    async def close(self) -> None:
        """Close the pool, the listener and the chore connection (freeing its
        locks). The repository reopens if used again."""
        self._generation += 1
        loop = asyncio.get_running_loop()
        listener, listener_loop = self._listener, self._listener_loop
        chores, chore_loop = self._chore_conn, self._chore_loop
        pool, pool_loop = self._pool, self._loop
        self._listener = self._listener_loop = None
        self._chore_conn = self._chore_loop = None
        self._chores_held.clear()
        self._pool = self._loop = None
        if listener is not None and listener_loop is loop:
            await listener.close()
        if chores is not None and chore_loop is loop:
            await _close_quietly(chores)
        if pool is not None and pool_loop is loop:
            await pool.close()

    async def _ensure_pool(self) -> AsyncConnectionPool[_Conn]:
        if self._pool is None or self._loop is not asyncio.get_running_loop():
            await self.open()
        assert self._pool is not None
        return self._pool

    @asynccontextmanager
    async def _connection(self, doing: str) -> AsyncIterator[_Conn]:
        pool = await self._ensure_pool()
        try:
            async with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise BackendError(
                f"could not {doing}: no connection to PostgreSQL at {describe(self.dsn)} became free "
                f"within {_POOL_TIMEOUT_S:g}s (pool max_size={self.max_size}); the server may be down "
                "or the pool too small"
            ) from exc
        except psycopg.Error as exc:
            raise backend_error(exc, self.dsn, self.schema, doing) from exc

    async def _rows(self, name: str, params: Mapping[str, Any], doing: str) -> list[DictRow]:
        async with self._connection(doing) as conn:
            cur = await conn.execute(query(name, self.schema), params)
            return await cur.fetchall()

    # --- the protocol --------------------------------------------------------

    async def now(self) -> datetime:
        """The database clock (``now()``), UTC."""
        rows = await self._rows("now", {}, "read the database clock")
        when: datetime = rows[0]["now"]
        return when.astimezone(UTC)

    async def add(self, tasks: Sequence[NewTask], *, connection: Any = None) -> list[Task]:
        """Insert all tasks or none, in list order, in one statement.

        With ``connection`` (a psycopg ``AsyncConnection`` or ``Connection``)
        the insert runs inside the caller's transaction and is neither
        committed nor rolled back here; workers are notified when it commits.
        """
        if not tasks:
            return []
        ids = [t.id for t in tasks]
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise DuplicateTaskError(f"a task with id {i!r} already exists; nothing was stored")
            seen.add(i)
        params = {"tasks": _encode_batch(tasks), "channel": self.channel}
        if connection is None:
            async with self._connection("add tasks") as conn:
                return await self._insert(conn, params, ids)
        await self._ensure_pool()  # the schema must exist before the caller's transaction uses it
        if isinstance(connection, psycopg.AsyncConnection):
            try:
                return await self._insert(connection, params, ids)
            except psycopg.Error as exc:
                raise backend_error(exc, self.dsn, self.schema, "add tasks in the caller's transaction") from exc
        if isinstance(connection, psycopg.Connection):
            # A sync connection blocks; keep it off the event loop.
            try:
                return await asyncio.to_thread(self._insert_sync, connection, params, ids)
            except psycopg.Error as exc:
                raise backend_error(exc, self.dsn, self.schema, "add tasks in the caller's transaction") from exc
        raise TypeError(
            "connection must be a psycopg 3 Connection or AsyncConnection (the caller's open transaction), "
            f"not {type(connection).__name__}"
        )

    async def _insert(
        self, conn: psycopg.AsyncConnection[Any], params: Mapping[str, Any], ids: list[str]
    ) -> list[Task]:
        async with conn.cursor(row_factory=dict_row) as cur:
            try:
                await cur.execute(query("add", self.schema), params)
            except pg_errors.UniqueViolation as exc:
                raise _duplicate(exc) from exc
            rows = await cur.fetchall()
            if rows:
                return [_task(r) for r in rows]
            await cur.execute(query("existing_ids", self.schema), {"ids": ids})
            clash = await cur.fetchone()
        raise DuplicateTaskError(_duplicate_message(clash["id"] if clash else None))

    def _insert_sync(self, conn: psycopg.Connection[Any], params: Mapping[str, Any], ids: list[str]) -> list[Task]:
        with conn.cursor(row_factory=dict_row) as cur:
            try:
                cur.execute(query("add", self.schema), params)
            except pg_errors.UniqueViolation as exc:
                raise _duplicate(exc) from exc
            rows = cur.fetchall()
            if rows:
                return [_task(r) for r in rows]
            cur.execute(query("existing_ids", self.schema), {"ids": ids})
            clash = cur.fetchone()
        raise DuplicateTaskError(_duplicate_message(clash["id"] if clash else None))

    async def dequeue(
        self, worker: str, limit: int, lease_ms: int, handlers: Collection[str] | None = None
    ) -> list[Task]:
        """Take up to ``limit`` due pending tasks in queue order (one UPDATE ... SKIP LOCKED)."""
        if limit <= 0 or (handlers is not None and not handlers):
            return []
        rows = await self._rows(
            "dequeue",
            {
                "worker": worker,
                "limit": limit,
                "lease_ms": lease_ms,
                "handlers": None if handlers is None else list(handlers),
            },
            "take tasks",
        )
        taken = [_task(r) for r in rows]
        taken.sort(key=lambda t: (-t.priority, t.run_at, t.seq))  # RETURNING has no order
        return taken

    async def heartbeat(self, worker: str, leases: Sequence[Lease], lease_ms: int) -> list[str]:
        """Extend the leases ``worker`` still holds; return the ids renewed."""
        if not leases:
            return []
        rows = await self._rows(
            "heartbeat",
            {
                "worker": worker,
                "lease_ms": lease_ms,
                "ids": [lease.id for lease in leases],
                "attempts": [lease.attempt for lease in leases],
            },
            "renew leases",
        )
        return _in_order([lease.id for lease in leases], rows)

    async def complete(self, done: Sequence[Completion]) -> list[str]:
        """Complete a batch in one statement; return the ids whose attempt still held."""
        if not done:
            return []
        batch = encode_json([{"id": c.id, "attempt": c.attempt, "result": c.result} for c in done], what="task result")
        rows = await self._rows("complete", {"done": batch}, "record completions")
        return _in_order([c.id for c in done], rows)

    async def fail(self, failure: Failure) -> FailOutcome | None:
        """Retry or fail one attempt, decided in SQL; None when the guard did not hold."""
        rows = await self._rows(
            "fail",
            {
                "id": failure.id,
                "attempt": failure.attempt,
                "error": sanitise_error(failure.error),
                "outcome": failure.outcome,
                "retry_delay_ms": max(0, failure.retry_delay_ms),
                "only_if_expired": failure.only_if_expired,
                "final": failure.final,
                "max_retries": failure.max_retries,
                "channel": self.channel,
            },
            "record a failure",
        )
        if not rows:
            return None
        return FailOutcome.RETRIED if rows[0]["status"] == TaskStatus.PENDING.value else FailOutcome.FAILED

    async def release(self, leases: Sequence[Lease]) -> list[str]:
        """Return taken tasks to pending without spending a retry."""
        if not leases:
            return []
        rows = await self._rows(
            "release",
            {
                "ids": [lease.id for lease in leases],
                "attempts": [lease.attempt for lease in leases],
                "channel": self.channel,
            },
            "release tasks",
        )
        return _in_order([lease.id for lease in leases], rows)

    async def expired(self, limit: int) -> list[Task]:
        """Processing tasks whose lease has run out, oldest first."""
        if limit <= 0:
            return []
        rows = await self._rows("expired", {"limit": limit}, "look for expired leases")
        return [_task(r) for r in rows]

    async def get(self, task_id: str) -> Task | None:
        rows = await self._rows("get", {"id": task_id}, "read a task")
        return _task(rows[0]) if rows else None

    async def list(self, status: TaskStatus | None = None, limit: int | None = None) -> list[Task]:
        """Tasks in insertion order, optionally of one status."""
        rows = await self._rows(
            "list",
            {"status": None if status is None else TaskStatus(status).value, "limit": limit},
            "list tasks",
        )
        return [_task(r) for r in rows]

    async def update(self, task_id: str, fields: Mapping[str, Any]) -> Task:
        """Change the given fields (and ``status``/``retry_count`` for a manual retry).

        Raises TaskNotFoundError if the id is absent, and TaskBusyError (changing
        nothing) if ``status`` is given and the task is processing.
        """
        unknown = set(fields) - UPDATE_KEYS
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}; updatable fields are {sorted(UPDATE_KEYS)}")
        encoded = json.dumps({k: _jsonable(v) for k, v in fields.items()}, allow_nan=False, ensure_ascii=False)
        rows = await self._rows("update", {"id": task_id, "fields": encoded, "channel": self.channel}, "update a task")
        if rows:
            return _task(rows[0])
        # Nothing matched: the id is absent, or the status guard held (the task was processing).
        if await self._rows("existing_ids", {"ids": [task_id]}, "update a task"):
            raise TaskBusyError(task_id)
        raise TaskNotFoundError(f"no task with id {task_id!r}")

    async def remove(self, task_id: str, hard: bool) -> bool:
        """Soft removal marks the task deleted; hard removal deletes the row. False if absent."""
        rows = await self._rows("remove_hard" if hard else "remove_soft", {"id": task_id}, "remove a task")
        return bool(rows)

    async def stats(self) -> QueueStats:
        """Counts for every status (zeros included) and the age of the oldest due pending task."""
        rows = await self._rows("stats", {}, "read queue statistics")
        counts = {s.value: 0 for s in TaskStatus}
        counts.update({k: int(v) for k, v in (rows[0]["counts"] or {}).items()})
        age = rows[0]["oldest_pending_age_s"]
        return QueueStats(counts=counts, oldest_pending_age_s=None if age is None else max(0.0, float(age)))

    async def depth(self) -> QueueDepth:
        """Counts read from the pending and lease indexes only: cost follows the live work."""
        rows = await self._rows("depth", {}, "read the queue depth")
        age = rows[0]["oldest_pending_age_s"]
        return QueueDepth(
            pending=int(rows[0]["pending"]),
            processing=int(rows[0]["processing"]),
            oldest_pending_age_s=None if age is None else max(0.0, float(age)),
        )

    async def purge(self, older_than_ms: int, statuses: Collection[TaskStatus], limit: int) -> int:
        """Delete up to ``limit`` tasks of ``statuses`` not updated for ``older_than_ms``."""
        if limit <= 0 or not statuses:
            return 0
        async with self._connection("purge old tasks") as conn:
            cur = await conn.execute(
                query("purge", self.schema),
                {
                    "statuses": [TaskStatus(s).value for s in statuses],
                    "older_than_ms": max(0, older_than_ms),
                    "limit": limit,
                },
            )
            return max(0, cur.rowcount)

    @asynccontextmanager
    async def exclusive(self, chore: str) -> AsyncIterator[bool]:
        """Hold this queue's lock for ``chore`` while the block runs; yield False
        (and hold nothing) when another process, or another task of this one,
        has it. Never waits for the lock.

        The lock is a session advisory lock on the repository's own chore
        connection, not a pooled one, so a chore's statements (which use the
        pool) never wait on the connection its lock sits on, and a held lock
        costs the pool nothing. If that session ends (a crash, a killed
        connection) the server frees the lock; the next call opens a new one.
        """
        key = f"kubeque:{self.schema}:{chore}"
        await self._ensure_pool()  # opens (and migrates) like every method; forgets a dead loop's state
        conn = await self._take_chore_lock(key, chore)
        if conn is None:
            yield False
            return
        try:
            yield True
        finally:
            if self._chores_held.get(key) is conn:
                del self._chores_held[key]
            await self._release_chore_lock(conn, key, chore)

    async def _take_chore_lock(self, key: str, chore: str) -> _Conn | None:
        """The chore connection, now holding ``key`` for the caller; None if someone else holds it."""
        doing = f"take the {chore} lock"
        async with _lock_for(self._chore_locks, asyncio.get_running_loop()):
            if key in self._chores_held:
                return None  # a session advisory lock is re-entrant: this keeps it exclusive within the process
            while True:
                conn, fresh = await self._chore_connection(doing)
                if conn is None:
                    return None  # close() ran meanwhile
                try:
                    cur = await conn.execute(query("try_lock", self.schema), {"key": key})
                    row = await cur.fetchone()
                except psycopg.Error as exc:
                    if conn.broken or conn.closed:
                        await self._discard_chore_connection(conn)
                        if not fresh:
                            # The server ended the idle session (and freed its locks); a new one will do.
                            log.info(
                                "queue %r: the chore connection was lost (%s); reconnecting",
                                self.schema,
                                one_line(exc),
                            )
                            continue
                    raise backend_error(exc, self.dsn, self.schema, doing) from exc
                except BaseException:
                    # Cancelled mid-statement: the lock may have been granted with
                    # nobody to record it. Closing the session frees it.
                    await self._discard_chore_connection(conn)
                    raise
                if row is None or not row["locked"]:
                    return None
                self._chores_held[key] = conn
                return conn

    async def _release_chore_lock(self, conn: _Conn, key: str, chore: str) -> None:
        try:
            async with _lock_for(self._chore_locks, asyncio.get_running_loop()):
                if conn is self._chore_conn and not conn.closed:
                    await conn.execute(query("unlock", self.schema), {"key": key})
        except BaseException as exc:
            # Whether the lock was freed is unknown (an error, or cancelled mid-way); ending the session frees it.
            await self._discard_chore_connection(conn)
            if not isinstance(exc, psycopg.Error):
                raise
            log.warning(
                "queue %r: could not release the %s lock (%s); closed its session", self.schema, chore, one_line(exc)
            )

    async def _chore_connection(self, doing: str) -> tuple[_Conn | None, bool]:
        """The open chore connection and whether it is new; opened on first use or when broken.
        Call with the chore lock held."""
        loop = asyncio.get_running_loop()
        conn = self._chore_conn if self._chore_loop is loop else None
        if conn is not None and not conn.closed and not conn.broken:
            return conn, False
        if conn is not None:
            await self._discard_chore_connection(conn)
        generation = self._generation
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.dsn,
                autocommit=True,
                row_factory=dict_row,
                **connect_kwargs(self.dsn, f"{self.application_name}-chores", keepalives=True),
            )
        except psycopg.Error as exc:
            raise backend_error(exc, self.dsn, self.schema, doing) from exc
        if generation != self._generation:
            await _close_quietly(conn)  # close() ran meanwhile; do not outlive it
            return None, True
        self._chore_conn, self._chore_loop = conn, loop
        return conn, True

    async def _discard_chore_connection(self, conn: _Conn) -> None:
        """Forget and close the chore connection; the server frees every lock its session held."""
        if self._chore_conn is conn:
            self._chore_conn = self._chore_loop = None
        await _close_quietly(conn)

    # --- wakeups -------------------------------------------------------------

    async def wait_for_work(self, timeout: float) -> None:
        """Return on a NOTIFY for this queue, or after ``timeout`` seconds.

        The LISTEN connection is dedicated, not pooled. When it turns out to be
        dead it is re-established at once and this returns, because
        notifications may have been missed: the caller polls. While it cannot
        be re-established this just sleeps ``timeout`` (plain polling) and
        tries again after a bounded backoff.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        generation = self._generation
        async with _lock_for(self._listen_locks, loop):
            conn = self._listener if self._listener_loop is loop else None
            if conn is None or conn.closed:
                lost = self._listener_lost
                conn = None if time.monotonic() < self._listen_retry_at else await self._connect_listener(generation)
                if conn is None:
                    await _sleep_until(loop, deadline)
                    return
                if lost:
                    return
            try:
                heard = False
                async for _ in conn.notifies(timeout=max(0.0, deadline - loop.time()), stop_after=1):
                    heard = True
                if heard:
                    # Several adds may have notified; one wakeup is enough for all of them.
                    async for _ in conn.notifies(timeout=0):
                        pass
            except psycopg.Error as exc:
                if generation != self._generation:
                    return  # close() ended the listener
                log.warning("queue %r: the LISTEN connection was lost (%s); reconnecting", self.schema, one_line(exc))
                if self._listener is conn:
                    self._listener = self._listener_loop = None
                self._listener_lost = True
                await _close_quietly(conn)
                if await self._connect_listener(generation) is None:
                    await _sleep_until(loop, deadline)

    async def _connect_listener(self, generation: int) -> psycopg.AsyncConnection[Any] | None:
        """Open a connection and LISTEN; on failure schedule the next try (bounded backoff) and return None."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.dsn,
                autocommit=True,
                **connect_kwargs(self.dsn, f"{self.application_name}-listen", keepalives=True),
            )
            try:
                await conn.execute(listen(self.schema))
            except BaseException:
                await _close_quietly(conn)
                raise
        except (psycopg.Error, BackendError) as exc:
            self._listen_failures += 1
            self._listener_lost = True
            delay = min(_LISTEN_BACKOFF_CAP_S, _LISTEN_BACKOFF_BASE_S * 2 ** min(self._listen_failures - 1, 10))
            self._listen_retry_at = time.monotonic() + delay
            log.warning(
                "queue %r: could not LISTEN at %s (%s); polling meanwhile, next try in %.1fs",
                self.schema,
                describe(self.dsn),
                one_line(exc),
                delay,
            )
            return None
        if generation != self._generation:
            await _close_quietly(conn)  # close() ran meanwhile; do not outlive it
            return None
        self._listener, self._listener_loop = conn, asyncio.get_running_loop()
        self._listen_failures = 0
        self._listen_retry_at = 0.0
        self._listener_lost = False
        return conn


# --- helpers -------------------------------------------------------------------


def _lock_for(
    locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock], loop: asyncio.AbstractEventLoop
) -> asyncio.Lock:
    # asyncio locks belong to one loop; keep one per loop.
    lock = locks.get(loop)
    if lock is None:
        lock = locks[loop] = asyncio.Lock()
    return lock


async def _sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - loop.time()))


async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):  # already broken; nothing left to release
        await conn.close()


def _task(row: Mapping[str, Any]) -> Task:
    data = {k: row[k] for k in _TASK_FIELDS}
    for k in _TIME_FIELDS:
        if data[k] is not None:
            data[k] = data[k].astimezone(UTC)
    return Task.parse(data, source="postgres")


def _in_order(ids: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ids that landed, in the caller's order, once each."""
    landed = {r["id"] for r in rows}
    out: list[str] = []
    for i in ids:
        if i in landed:
            out.append(i)
            landed.discard(i)
    return out


def _utc_iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # as Task does: naive means UTC
    return value.isoformat()


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return _utc_iso(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _encode_batch(tasks: Sequence[NewTask]) -> str:
    return encode_json(
        [
            {
                "id": t.id,
                "handler": t.handler,
                "payload": t.payload,
                "max_retries": t.max_retries,
                "max_processing_time": t.max_processing_time,
                "priority": t.priority,
                "run_at": None if t.run_at is None else _utc_iso(t.run_at),
                "delay_ms": t.delay_ms,
                "retry_backoff_ms": t.retry_backoff_ms,
                "extra": t.extra,
            }
            for t in tasks
        ],
        what="task payload or extra",
    )


def _duplicate_message(task_id: str | None) -> str:
    if task_id is None:
        return "a task with one of these ids already exists; nothing was stored"
    return f"a task with id {task_id!r} already exists; nothing was stored"


def _duplicate(exc: pg_errors.UniqueViolation) -> DuplicateTaskError:
    # Another transaction stored the same id between our check and our insert.
    detail = exc.diag.message_detail or ""
    prefix, suffix = "Key (id)=(", ") already exists."
    task_id = detail[len(prefix) : -len(suffix)] if detail.startswith(prefix) and detail.endswith(suffix) else None
    return DuplicateTaskError(_duplicate_message(task_id))

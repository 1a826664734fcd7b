"""Redis store: one hash of JSON fields per task, every state change one Lua script.

Each change runs as a script (``redis_scripts/<name>.lua``, with ``lib.lua``
prepended), so it is atomic, and reads the one clock the queue has: the Redis
server's ``TIME``. ``lib.lua`` documents the key layout. Several processes may
share a queue: a dequeue hands each task to exactly one of them, and a task
taken by a worker that dies stays in the lease index until ``expired`` returns it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import (
    BackendError,
    DuplicateTaskError,
    InvalidIdentifierError,
    InvalidTaskError,
    TaskBusyError,
    TaskNotFoundError,
)
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
    encode_json,
)
from .base import UPDATE_KEYS

__all__ = ["RedisRepository"]

log = logging.getLogger(__name__)

_QUEUE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SCRIPT_NAMES = (
    "add",
    "dequeue",
    "heartbeat",
    "complete",
    "fail",
    "release",
    "expired",
    "read",
    "update",
    "remove",
    "stats",
    "purge",
    "wake_hint",
)
_INT_FIELDS = frozenset(
    {"max_retries", "max_processing_time", "retry_count", "priority", "attempt", "retry_backoff_ms", "seq"}
)
_JSON_FIELDS = frozenset({"payload", "log", "result", "extra"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Bounds on the work one script call does, so no call blocks the server for long.
_PROMOTE_MAX = 10_000
_EXPIRED_SCAN_MAX = 10_000
# A template task for checking update fields the way the memory store does.
_TEMPLATE = NewTask(handler="h", payload={}, id="x").materialise(_EPOCH, 1).to_json_dict()


def _load_script(name: str) -> str:
    folder = resources.files("kubeque.backends").joinpath("redis_scripts")
    lib = folder.joinpath("lib.lua").read_text(encoding="utf-8")
    body = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return f"{lib}\n-- {name}.lua\n{body}"


def _micros(dt: datetime) -> int:
    return (_aware(dt) - _EPOCH) // timedelta(microseconds=1)


def _aware(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def _iso(dt: datetime) -> str:
    return _aware(dt).astimezone(UTC).isoformat()


def _priority_key(priority: int) -> str:
    """Fixed-width digits that sort ascending as priority descends."""
    if not _INT64_MIN <= priority <= _INT64_MAX:
        raise ValueError(f"priority {priority} does not fit in a signed 64-bit integer; use a smaller one")
    return f"{_INT64_MAX - priority:020d}"


def _safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable url>"


def _opt_int(value: int | None) -> str:
    """Integers as Redis stores them; "" stands for None (an option left to the handler)."""
    return "" if value is None else str(int(value))


def _task(flat: Sequence[str]) -> Task:
    """A task from its hash (flat field/value list), validated."""
    raw = dict(zip(flat[::2], flat[1::2], strict=True))
    data: dict[str, Any] = {}
    try:
        for key, value in raw.items():
            if key.startswith("_"):
                continue  # index bookkeeping, not part of the task
            if key in _INT_FIELDS:
                data[key] = int(value) if value != "" else None
            elif key in _JSON_FIELDS:
                data[key] = json.loads(value)
            else:
                data[key] = value
    except ValueError as exc:
        raise InvalidTaskError(f"redis holds a malformed task {raw.get('id')!r}: {exc}") from None
    return Task.parse(data, source="redis")


class RedisRepository:
    """Tasks in Redis under ``kubeque:<queue>:``; safe for many worker processes."""

    name = "redis"
    multi_process = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", queue: str = "default") -> None:
        if not isinstance(queue, str) or not _QUEUE_NAME.fullmatch(queue):
            raise InvalidIdentifierError(
                f"queue name {queue!r} is not valid: use 1-63 lower-case letters, digits and "
                "underscores, not starting with a digit (^[a-z_][a-z0-9_]{0,62}$)"
            )
        self.url = url
        self.queue = queue
        self.prefix = f"kubeque:{queue}:"
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._open_lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._subscribed = asyncio.Event()

    def __repr__(self) -> str:
        return f"RedisRepository(url={_safe_url(self.url)!r}, queue={self.queue!r})"

    # --- connection --------------------------------------------------------

    @asynccontextmanager
    async def _talking(self, what: str) -> AsyncIterator[None]:
        """Turn redis-py errors into BackendError naming the operation."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendError(
                f"cannot reach Redis at {_safe_url(self.url)} to {what}: {exc}; "
                "check that the server is running and the URL is right"
            ) from exc
        except RedisError as exc:
            raise BackendError(f"Redis refused to {what} on queue {self.queue!r}: {exc}") from exc

    async def open(self) -> None:
        """Connect, check the server answers, and load the scripts. Idempotent."""
        async with self._open_lock:
            if self._client is not None:
                return
            try:
                # No automatic retries: a script resent after a lost reply would
                # run twice (a second dequeue, a duplicate add).
                client = aioredis.Redis.from_url(
                    self.url,
                    decode_responses=True,
                    socket_connect_timeout=5,
                    retry=Retry(NoBackoff(), 0),
                )
            except ValueError as exc:
                raise BackendError(f"invalid Redis URL {_safe_url(self.url)}: {exc}") from exc
            try:
                async with self._talking("open the queue"):
                    await client.ping()
                    scripts = {}
                    for name in _SCRIPT_NAMES:
                        text = _load_script(name)
                        # Loading now reports a broken script at open, not mid-run.
                        await client.script_load(text)
                        scripts[name] = client.register_script(text)
            except BaseException:
                await client.aclose()
                raise
            self._client = client
            self._scripts = scripts

    async def close(self) -> None:
        """Stop the wakeup listener and drop every pooled connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        # Fresh primitives: a reopened store may run on another event loop.
        self._wake, self._subscribed, self._open_lock = asyncio.Event(), asyncio.Event(), asyncio.Lock()
        client, self._client = self._client, None
        self._scripts = {}
        if client is not None:
            try:
                await client.aclose()
            except RedisError as exc:  # closing a dead connection must not fail shutdown
                log.debug("closing Redis client for queue %s: %s", self.queue, exc)

    async def _connected(self) -> aioredis.Redis:
        """The client, opening the store first if nobody has (methods need no explicit open)."""
        if self._client is None:
            await self.open()
        assert self._client is not None
        return self._client

    async def _run(self, script: str, args: Sequence[str | int], what: str) -> Any:
        await self._connected()
        async with self._talking(what):
            return await self._scripts[script](args=[self.prefix, *args])

    async def now(self) -> datetime:
        """The Redis server's clock (TIME), timezone-aware UTC."""
        client = await self._connected()
        async with self._talking("read the server time"):
            seconds, micros = await client.time()
        return _EPOCH + timedelta(seconds=int(seconds), microseconds=int(micros))

    # --- tasks ---------------------------------------------------------------

    async def add(self, tasks: Sequence[NewTask], *, connection: Any = None) -> list[Task]:
        """Store all or none; DuplicateTaskError if any id exists or repeats."""
        if connection is not None:
            raise TypeError("the redis backend has no connections to join; transactional enqueue needs postgres")
        seen: set[str] = set()
        for n in tasks:
            if n.id in seen:
                raise DuplicateTaskError(f"a task with id {n.id!r} already exists; nothing was stored")
            seen.add(n.id)
        if not tasks:
            return []
        args: list[str | int] = [len(tasks)]
        for n in tasks:
            checked = n.materialise(_EPOCH, 1)  # same field validation as the memory store
            args += [
                checked.id,
                checked.handler,
                encode_json(checked.payload, what="payload"),
                encode_json(checked.extra, what="extra"),
                str(checked.priority),
                _priority_key(checked.priority),
                _opt_int(checked.max_retries),
                _opt_int(checked.max_processing_time),
                _opt_int(checked.retry_backoff_ms),
                "" if n.run_at is None else str(_micros(n.run_at)),
                "" if n.run_at is None else _iso(n.run_at),
                str(int(n.delay_ms)),
            ]
        reply = await self._run("add", args, "add tasks")
        if reply[0] == "dup":
            raise DuplicateTaskError(f"a task with id {reply[1]!r} already exists; nothing was stored")
        return [_task(t) for t in reply[1:]]

    async def dequeue(
        self, worker: str, limit: int, lease_ms: int, handlers: Collection[str] | None = None
    ) -> list[Task]:
        """Take up to ``limit`` due pending tasks in queue order, atomically."""
        if limit <= 0:
            return []
        names = [] if handlers is None else sorted(set(handlers))
        if handlers is not None and not names:
            return []
        args: list[str | int] = [
            worker,
            json.dumps(worker, ensure_ascii=False),
            int(limit),
            int(lease_ms),
            _PROMOTE_MAX,
            -1 if handlers is None else len(names),
            *names,
        ]
        reply = await self._run("dequeue", args, "dequeue tasks")
        return [_task(t) for t in reply]

    async def heartbeat(self, worker: str, leases: Sequence[Lease], lease_ms: int) -> list[str]:
        """Extend leases still held by ``worker``; return the ids renewed."""
        if not leases:
            return []
        args: list[str | int] = [worker, int(lease_ms), len(leases)]
        for lease in leases:
            args += [lease.id, int(lease.attempt)]
        return list(await self._run("heartbeat", args, "renew leases"))

    async def complete(self, done: Sequence[Completion]) -> list[str]:
        """Mark completed with result; return ids whose guard held."""
        if not done:
            return []
        args: list[str | int] = [len(done)]
        for c in done:
            args += [c.id, int(c.attempt), encode_json(c.result, what="result")]
        return list(await self._run("complete", args, "complete tasks"))

    async def fail(self, failure: Failure) -> FailOutcome | None:
        """Retry or fail one attempt (decided in the script); None when the guard did not hold."""
        f = failure
        args: list[str | int] = [
            f.id,
            int(f.attempt),
            json.dumps(f.outcome, ensure_ascii=False),
            json.dumps(f.error, ensure_ascii=False),
            int(f.retry_delay_ms),
            int(f.only_if_expired),
            int(f.final),
            int(f.max_retries),
        ]
        reply = await self._run("fail", args, "record a failure")
        return None if reply is None else FailOutcome(reply)

    async def release(self, leases: Sequence[Lease]) -> list[str]:
        """Return taken tasks to pending without spending an attempt."""
        args: list[str | int] = [len(leases)]
        for lease in leases:
            args += [lease.id, int(lease.attempt)]
        return list(await self._run("release", args, "release tasks"))

    async def expired(self, limit: int) -> list[Task]:
        """Processing tasks whose lease has run out, in seq order."""
        if limit <= 0:
            return []
        reply = await self._run("expired", [int(limit), _EXPIRED_SCAN_MAX], "find expired leases")
        return [_task(t) for t in reply]

    async def get(self, task_id: str) -> Task | None:
        """The task with that id, or None."""
        client = await self._connected()
        async with self._talking("read a task"):
            fields = await client.hgetall(f"{self.prefix}task:{task_id}")
        if not fields:
            return None
        return _task([str(x) for kv in fields.items() for x in kv])

    async def list(self, status: TaskStatus | None = None, limit: int | None = None) -> list[Task]:
        """Tasks in queue order (seq), optionally of one status."""
        index = "all" if status is None else f"s:{TaskStatus(status).value}"
        want = -1 if limit is None or limit < 0 else int(limit)
        if want == 0:
            return []
        reply = await self._run("read", [index, want], "list tasks")
        out = [_task(t) for t in reply]
        if limit is not None and limit < 0:
            out = out[:limit]  # a negative limit slices as it does in the memory store
        return out

    async def update(self, task_id: str, fields: Mapping[str, Any]) -> Task:
        """Change UPDATABLE_FIELDS (and ``status``, ``retry_count``) of a task; TaskNotFoundError if absent,
        TaskBusyError (changing nothing) if ``status`` is given and the task is processing."""
        unknown = set(fields) - UPDATE_KEYS
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}: only {sorted(UPDATE_KEYS)}")
        # Check the values as the memory store does, before anything is written.
        checked = Task.model_validate({**_TEMPLATE, **fields})
        status = "" if "status" not in fields else checked.status.value
        run_us, run_iso = ("", "") if "run_at" not in fields else (str(_micros(checked.run_at)), _iso(checked.run_at))
        pk = "" if "priority" not in fields else _priority_key(checked.priority)
        pairs: list[str | int] = []
        for name in ("payload", "extra"):
            if name in fields:
                pairs += [name, encode_json(getattr(checked, name), what=name)]
        for name in ("priority", "max_retries", "max_processing_time", "retry_backoff_ms", "retry_count"):
            if name in fields:
                pairs += [name, _opt_int(getattr(checked, name))]
        args: list[str | int] = [task_id, status, run_us, run_iso, pk, len(pairs) // 2, *pairs]
        reply = await self._run("update", args, "update a task")
        if reply is None:
            raise TaskNotFoundError(f"no task with id {task_id!r} in queue {self.queue!r}")
        if reply == "busy":
            raise TaskBusyError(task_id)
        return _task(reply)

    async def remove(self, task_id: str, hard: bool) -> bool:
        """Soft removal sets ``deleted``; hard removal deletes. False if absent."""
        reply = await self._run("remove", [task_id, int(bool(hard))], "remove a task")
        return bool(reply)

    async def depth(self) -> QueueDepth:
        """The stats script reads only index sizes: already cheap."""
        return QueueDepth.from_stats(await self.stats())

    async def stats(self) -> QueueStats:
        """Counts for every status (zeros included) and the age of the oldest due pending task."""
        statuses = [s.value for s in TaskStatus]
        reply = await self._run("stats", statuses, "read queue stats")
        now_us = int(reply[0])
        counts = {s: int(c) for s, c in zip(statuses, reply[1:-1], strict=True)}
        oldest = reply[-1]
        age = None
        if oldest != "" and int(float(oldest)) <= now_us:
            age = max(0.0, (now_us - int(float(oldest))) / 1_000_000)
        return QueueStats(counts=counts, oldest_pending_age_s=age)

    async def purge(self, older_than_ms: int, statuses: Collection[TaskStatus], limit: int) -> int:
        """Delete up to ``limit`` tasks of ``statuses`` not updated for ``older_than_ms``."""
        names = sorted({TaskStatus(s).value for s in statuses})
        if limit <= 0 or not names:
            return 0
        reply = await self._run("purge", [int(older_than_ms), int(limit), *names], "purge old tasks")
        return int(reply)

    # --- wakeups -------------------------------------------------------------

    async def wait_for_work(self, timeout: float) -> None:
        """Return when add, retry, release or update announce work on the queue's
        wake channel, when the first delayed task comes due, or after ``timeout`` s.

        A background task holds the subscription and sets an event, so waits may
        be cancelled (the worker does so whenever a slot frees) at no cost.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name=f"kubeque-redis-wake-{self.queue}")
        try:
            if not self._subscribed.is_set():
                # Wait for the first subscription, so no announcement falls in the gap.
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._subscribed.wait(), max(0.0, deadline - loop.time()))
            # Shielded: a wait cancelled mid-call would otherwise cost the pooled connection.
            _, due_in_us = await asyncio.shield(self._run("wake_hint", [], "check for due work"))
            if int(due_in_us) >= 0:
                deadline = min(deadline, loop.time() + int(due_in_us) / 1_000_000)
        except BackendError as exc:
            log.debug("wait_for_work on queue %s without a due-time hint: %s", self.queue, exc)
        if not self._wake.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - loop.time()))
        self._wake.clear()

    async def _listen(self) -> None:
        """Keep a subscription to the wake channel and turn its messages into ``_wake``."""
        failures = 0
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = (await self._connected()).pubsub()
                await pubsub.subscribe(f"{self.prefix}wake")
                # Work announced while we were not subscribed reached nobody: look for it.
                ready, _ = await self._run("wake_hint", [], "check for due work")
                if int(ready) > 0:
                    self._wake.set()
                self._subscribed.set()
                failures = 0
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None and message.get("type") == "message":
                        self._wake.set()
            except Exception as exc:  # the listener must outlive any one failure
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "wakeups for queue %s lost (%s); waits poll until they are back", self.queue, exc)
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
            finally:
                if pubsub is not None:
                    with suppress(RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

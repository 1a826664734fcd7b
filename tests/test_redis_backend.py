"""The Redis store against a real Redis: order, atomic dequeue, guards, leases, wakeups.

The cross-backend contract suite covers the shared behaviour through the
QueueManager; these tests hold the Redis-specific part and the Repository
methods directly, including a differential run against the memory store.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis

from kubeque.backends.memory import MemoryRepository
from kubeque.backends.redis import RedisRepository
from kubeque.errors import BackendError, DuplicateTaskError, InvalidIdentifierError, TaskBusyError, TaskNotFoundError
from kubeque.task import Completion, FailOutcome, Failure, Lease, NewTask, Task, TaskStatus

pytestmark = pytest.mark.timeout(60)

MakeRepo = Callable[[], Awaitable[RedisRepository]]


@pytest.fixture
async def make_repo(redis_url: str, redis_queue: str) -> AsyncIterator[MakeRepo]:
    """Open repositories on the test queue, each with its own connections; closed after."""
    opened: list[RedisRepository] = []

    async def make() -> RedisRepository:
        repo = RedisRepository(redis_url, redis_queue)
        await repo.open()
        opened.append(repo)
        return repo

    yield make
    for repo in opened:
        await repo.close()


@pytest.fixture
async def repo(make_repo: MakeRepo) -> RedisRepository:
    return await make_repo()


def new(i: int | str, **kw: Any) -> NewTask:
    return NewTask(handler=kw.pop("handler", "h"), payload=kw.pop("payload", {"i": i}), id=str(i), **kw)


async def take_one(repo: RedisRepository, worker: str = "w", lease_ms: int = 60_000) -> Task:
    got = await repo.dequeue(worker, 1, lease_ms)
    assert len(got) == 1
    return got[0]


# --- construction, clock, connection ------------------------------------------


@pytest.mark.parametrize("name", ["", "Bad", "1abc", "a-b", "a" * 64, "a\n", "kubeque:x"])
def test_invalid_queue_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        RedisRepository("redis://127.0.0.1:6379/15", name)


def test_multi_process_and_name() -> None:
    repo = RedisRepository(queue="_ok_name_9")
    assert repo.multi_process is True
    assert repo.name == "redis"
    assert repo.prefix == "kubeque:_ok_name_9:"


async def test_now_is_server_time_in_utc(repo: RedisRepository, redis_url: str) -> None:
    now = await repo.now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    seconds, _ = redis.Redis.from_url(redis_url).time()
    assert abs(now.timestamp() - seconds) < 5


async def test_unreachable_server_raises_backend_error_without_password() -> None:
    repo = RedisRepository("redis://user:s3cret@127.0.0.1:1/0", "q")
    with pytest.raises(BackendError) as info:
        await repo.open()
    assert "s3cret" not in str(info.value)
    assert "127.0.0.1" in str(info.value)
    assert isinstance(info.value.__cause__, redis.RedisError)
    with pytest.raises(BackendError):
        await repo.dequeue("w", 1, 1000)  # methods open lazily and report the same way
    await repo.close()


async def test_connection_keyword_is_refused(repo: RedisRepository) -> None:
    with pytest.raises(TypeError, match="postgres"):
        await repo.add([new(1)], connection=object())
    assert await repo.list() == []


async def test_keys_stay_under_the_queue_prefix_and_hold_json(
    repo: RedisRepository, redis_url: str, redis_queue: str
) -> None:
    await repo.add([new("a", payload={"x": [1, 2]})])
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = set(r.scan_iter(match="*" + redis_queue + "*"))
    assert keys and all(k.startswith(f"kubeque:{redis_queue}:") for k in keys)
    stored = r.hgetall(f"kubeque:{redis_queue}:task:a")
    assert json.loads(stored["payload"]) == {"x": [1, 2]}
    assert json.loads(stored["log"]) == []
    assert datetime.fromisoformat(str(stored["created_at"])).utcoffset() == timedelta(0)


# --- add ------------------------------------------------------------------------


async def test_add_stores_pending_tasks_with_server_times(repo: RedisRepository) -> None:
    before = await repo.now()
    added = await repo.add([new(1), new(2, delay_ms=60_000)])
    after = await repo.now()
    assert [t.status for t in added] == [TaskStatus.PENDING] * 2
    assert added[0].seq < added[1].seq
    assert before <= added[0].created_at <= after
    assert added[0].run_at == added[0].created_at
    assert added[1].run_at == added[1].created_at + timedelta(milliseconds=60_000)
    assert await repo.get("1") == added[0]


async def test_duplicate_ids_store_nothing(repo: RedisRepository) -> None:
    await repo.add([new("a")])
    with pytest.raises(DuplicateTaskError, match="'a'"):
        await repo.add([new("b"), new("a"), new("c")])
    with pytest.raises(DuplicateTaskError, match="'d'"):
        await repo.add([new("d"), new("d")])
    assert [t.id for t in await repo.list()] == ["a"]


async def test_priority_outside_int64_is_refused(repo: RedisRepository) -> None:
    with pytest.raises(ValueError, match="64-bit"):
        await repo.add([new("a", priority=2**63)])
    assert await repo.list() == []


async def test_json_round_trip_of_payload_result_log(repo: RedisRepository) -> None:
    payload = {
        "text": 'héllo wörld ✓ 🎉 中文 "quoted" \\ / \n\t',
        "nested": {"list": [1, 2.5, None, True, {"deep": ["x", []]}], "empty": {}},
        "big": 12345678901234567890,
        "precise": 0.30000000000000004,
        "neg": -1e-300,
        "empty_list": [],
    }
    await repo.add([NewTask(handler="h", payload=payload, id="τ/1 x:y", extra={"k": ["ü"]})])
    t = await take_one(repo, worker='w "ü" 1')
    assert t.payload == payload and t.extra == {"k": ["ü"]}
    assert t.log[-1]["worker"] == 'w "ü" 1'
    result = {"out": ["ok", {"ñ": 1.5e10, "list": []}], "n": 2**62}
    assert await repo.complete([Completion(t.id, t.attempt, result)]) == [t.id]
    got = await repo.get(t.id)
    assert got is not None and got.result == result and got.payload == payload


async def test_error_text_round_trips_into_the_log(repo: RedisRepository) -> None:
    await repo.add([new(1, max_retries=0)])
    t = await take_one(repo)
    err = 'Traceback: "bad" \\ value ✗\nline 2}]'
    assert await repo.fail(Failure(t.id, t.attempt, err, 0)) is FailOutcome.FAILED
    got = await repo.get(t.id)
    assert got is not None
    assert got.log[-1]["error"] == err and got.log[-1]["outcome"] == "error"


# --- dequeue order and atomicity ---------------------------------------------------


async def test_dequeue_orders_by_priority_then_run_at_then_batch_order(repo: RedisRepository) -> None:
    now = await repo.now()
    await repo.add([new(f"b{i}") for i in range(20)])
    await repo.add([new("early", run_at=now - timedelta(seconds=5)), new("high", priority=5)])
    await repo.add([new("low", priority=-1), new("high2", priority=5)])
    got = await repo.dequeue("w", 100, 60_000)
    assert [t.id for t in got] == ["high", "high2", "early", *[f"b{i}" for i in range(20)], "low"]


async def test_delayed_task_is_not_taken_before_run_at(repo: RedisRepository) -> None:
    await repo.add([new("later", delay_ms=400, priority=9), new("now")])
    assert [t.id for t in await repo.dequeue("w", 10, 60_000)] == ["now"]
    await asyncio.sleep(0.45)
    assert [t.id for t in await repo.dequeue("w", 10, 60_000)] == ["later"]


async def test_dequeue_starts_an_attempt(repo: RedisRepository) -> None:
    await repo.add([new(1)])
    t = await take_one(repo, "worker-7", lease_ms=30_000)
    assert t.status is TaskStatus.PROCESSING
    assert t.attempt == 1 and t.worker == "worker-7"
    assert t.lease_expires_at is not None
    assert t.lease_expires_at - t.updated_at == timedelta(milliseconds=30_000)
    assert len(t.log) == 1 and t.log[0]["attempt"] == 1 and t.log[0]["worker"] == "worker-7"
    assert datetime.fromisoformat(t.log[0]["started_at"]) == t.updated_at
    assert await repo.dequeue("w", 1, 1000) == []


async def test_dequeue_filters_by_handler_in_queue_order(repo: RedisRepository) -> None:
    await repo.add([new(1, handler="a"), new(2, handler="b"), new(3, handler="c", priority=1), new(4, handler="a")])
    assert await repo.dequeue("w", 5, 1000, handlers=[]) == []
    got = await repo.dequeue("w", 2, 1000, handlers={"a", "c", "zzz"})
    assert [t.id for t in got] == ["3", "1"]
    got = await repo.dequeue("w", 5, 1000, handlers=["a", "b", "a"])
    assert [t.id for t in got] == ["2", "4"]


async def test_concurrent_dequeues_never_share_a_task(make_repo: MakeRepo) -> None:
    repos = [await make_repo() for _ in range(4)]
    total = 300
    await repos[0].add([new(i) for i in range(total)])
    taken: list[str] = []

    async def drain(r: RedisRepository, worker: str) -> None:
        while batch := await r.dequeue(worker, random.randint(1, 7), 60_000):
            taken.extend(t.id for t in batch)

    await asyncio.gather(*(drain(r, f"w{i}-{j}") for i, r in enumerate(repos) for j in range(3)))
    assert len(taken) == total
    assert set(taken) == {str(i) for i in range(total)}


# --- guards: complete, fail, release, heartbeat ---------------------------------


async def test_complete_lands_only_for_the_current_attempt(repo: RedisRepository) -> None:
    await repo.add([new(1), new(2)])
    a, b = await repo.dequeue("w", 2, 60_000)
    assert await repo.complete([Completion(a.id, a.attempt + 1, "stale")]) == []
    assert await repo.complete([Completion(a.id, a.attempt, 1), Completion(b.id, b.attempt, 2)]) == ["1", "2"]
    assert await repo.complete([Completion(a.id, a.attempt, "again")]) == []
    assert await repo.complete([Completion("missing", 1, None)]) == []
    done = await repo.get("1")
    assert done is not None and done.status is TaskStatus.COMPLETED and done.result == 1
    assert done.worker is None and done.lease_expires_at is None
    assert done.log[-1]["outcome"] == "completed" and "ended_at" in done.log[-1]


async def test_fail_retries_until_max_retries_then_fails(repo: RedisRepository) -> None:
    await repo.add([new(1, max_retries=2)])
    outcomes = []
    for attempt in range(1, 4):
        t = await take_one(repo)
        assert t.attempt == attempt
        outcomes.append(await repo.fail(Failure(t.id, t.attempt, f"boom {attempt}", 0)))
    assert outcomes == [FailOutcome.RETRIED, FailOutcome.RETRIED, FailOutcome.FAILED]
    t2 = await repo.get("1")
    assert t2 is not None and t2.status is TaskStatus.FAILED and t2.retry_count == 2
    assert [e["error"] for e in t2.log] == ["boom 1", "boom 2", "boom 3"]
    assert await repo.fail(Failure("1", 3, "late", 0)) is None


async def test_retry_waits_for_its_delay(repo: RedisRepository) -> None:
    await repo.add([new(1)])
    t = await take_one(repo)
    assert await repo.fail(Failure(t.id, t.attempt, "e", retry_delay_ms=400)) is FailOutcome.RETRIED
    again = await repo.get("1")
    assert again is not None and again.status is TaskStatus.PENDING and again.retry_count == 1
    assert again.run_at == again.updated_at + timedelta(milliseconds=400)
    assert await repo.dequeue("w", 1, 1000) == []
    await asyncio.sleep(0.45)
    assert (await take_one(repo)).attempt == 2


async def test_final_failure_does_not_retry(repo: RedisRepository) -> None:
    await repo.add([new(1)])
    t = await take_one(repo)
    outcome = await repo.fail(Failure(t.id, t.attempt, "no handler", 0, outcome="unknown_handler", final=True))
    assert outcome is FailOutcome.FAILED
    got = await repo.get("1")
    assert got is not None and got.retry_count == 0 and got.log[-1]["outcome"] == "unknown_handler"


async def test_fail_only_if_expired_waits_for_the_lease(repo: RedisRepository) -> None:
    await repo.add([new(1)])
    t = await take_one(repo, lease_ms=400)
    assert await repo.fail(Failure(t.id, t.attempt, "lost", 0, outcome="lost", only_if_expired=True)) is None
    await asyncio.sleep(0.45)
    outcome = await repo.fail(Failure(t.id, t.attempt, "lost", 0, outcome="lost", only_if_expired=True))
    assert outcome is FailOutcome.RETRIED


async def test_release_returns_to_pending_without_spending_a_retry(repo: RedisRepository) -> None:
    await repo.add([new(1), new(2)])
    a, b = await repo.dequeue("w", 2, 60_000)
    assert await repo.release([Lease(a.id, a.attempt), Lease(b.id, b.attempt + 5)]) == ["1"]
    got = await repo.get("1")
    assert got is not None and got.status is TaskStatus.PENDING
    assert got.retry_count == 0 and got.attempt == 1 and got.worker is None and got.lease_expires_at is None
    assert got.log[-1]["outcome"] == "released"
    again = await take_one(repo)
    assert again.id == "1" and again.attempt == 2 and len(again.log) == 2


async def test_heartbeat_is_guarded_by_worker_and_attempt(repo: RedisRepository) -> None:
    await repo.add([new(1), new(2)])
    a = await take_one(repo, "w1", lease_ms=1000)
    b = await take_one(repo, "w2", lease_ms=1000)
    leases = [Lease(a.id, a.attempt), Lease(b.id, b.attempt), Lease(a.id, a.attempt + 1), Lease("x", 1)]
    assert await repo.heartbeat("w1", leases, 60_000) == ["1"]
    renewed = await repo.get("1")
    assert renewed is not None and renewed.lease_expires_at is not None and a.lease_expires_at is not None
    assert renewed.lease_expires_at > a.lease_expires_at + timedelta(seconds=50)
    other = await repo.get("2")
    assert other is not None and other.lease_expires_at == b.lease_expires_at


async def test_heartbeat_keeps_a_task_out_of_expired(repo: RedisRepository) -> None:
    await repo.add([new(1)])
    t = await take_one(repo, lease_ms=150)
    await repo.heartbeat("w", [Lease(t.id, t.attempt)], 60_000)
    await asyncio.sleep(0.2)
    assert await repo.expired(10) == []


# --- leases and lost workers -----------------------------------------------------


async def test_expired_returns_tasks_after_a_short_lease_in_seq_order(repo: RedisRepository) -> None:
    await repo.add([new(1), new(2), new(3, priority=9)])
    await repo.dequeue("w", 3, 150)
    assert await repo.expired(10) == []
    await asyncio.sleep(0.2)
    assert [t.id for t in await repo.expired(10)] == ["1", "2", "3"]
    assert [t.id for t in await repo.expired(2)] == ["1", "2"]


async def test_a_killed_workers_task_is_reclaimed_and_its_late_write_never_lands(
    make_repo: MakeRepo, redis_url: str, redis_queue: str
) -> None:
    repo = await make_repo()
    await repo.add([new("job")])
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from kubeque.backends.redis import RedisRepository

        async def main():
            repo = RedisRepository({redis_url!r}, {redis_queue!r})
            taken = await repo.dequeue("doomed", 1, 300)
            print(taken[0].id, taken[0].attempt, flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert line.split() == ["job", "1"]
    held = await repo.get("job")
    assert held is not None and held.status is TaskStatus.PROCESSING and held.worker == "doomed"
    await asyncio.sleep(0.35)
    lost = await repo.expired(10)
    assert [t.id for t in lost] == ["job"]
    outcome = await repo.fail(Failure("job", 1, "worker lost", 0, outcome="lost", only_if_expired=True))
    assert outcome is FailOutcome.RETRIED
    again = await take_one(repo, "survivor")
    assert again.attempt == 2
    assert await repo.complete([Completion("job", 1, "late")]) == []  # the dead attempt's write
    assert await repo.complete([Completion("job", 2, "ok")]) == ["job"]


# --- update, remove, list, stats, purge ------------------------------------------


async def test_update_changes_fields_and_reorders(repo: RedisRepository) -> None:
    await repo.add([new(1), new(2)])
    updated = await repo.update("2", {"priority": 3, "payload": {"new": "ü"}, "max_retries": 7, "extra": {"a": 1}})
    assert updated.priority == 3 and updated.payload == {"new": "ü"} and updated.max_retries == 7
    assert updated.extra == {"a": 1}
    assert [t.id for t in await repo.dequeue("w", 2, 1000)] == ["2", "1"]


async def test_update_run_at_into_the_future_delays_a_pending_task(repo: RedisRepository) -> None:
    await repo.add([new(1)])
    later = await repo.now() + timedelta(milliseconds=400)
    got = await repo.update("1", {"run_at": later})
    assert got.run_at == later
    assert await repo.dequeue("w", 1, 1000) == []
    await asyncio.sleep(0.45)
    assert (await take_one(repo)).id == "1"


async def test_update_to_pending_retries_a_finished_task_now(repo: RedisRepository) -> None:
    await repo.add([new(1, max_retries=0)])
    t = await take_one(repo)
    await repo.fail(Failure(t.id, t.attempt, "e", 0))
    before = await repo.now()
    revived = await repo.update("1", {"status": TaskStatus.PENDING})
    assert revived.status is TaskStatus.PENDING and revived.run_at >= before
    assert (await repo.stats()).counts["failed"] == 0
    assert (await take_one(repo)).attempt == 2


async def test_update_to_pending_of_a_processing_task_is_refused_and_changes_nothing(repo: RedisRepository) -> None:
    await repo.add([new(1)])
    t = await take_one(repo, lease_ms=100)
    with pytest.raises(TaskBusyError, match="processing"):
        await repo.update("1", {"status": "pending", "priority": 5})
    still = await repo.get("1")
    assert still is not None
    assert (still.status, still.worker, still.lease_expires_at, still.priority) == (
        TaskStatus.PROCESSING,
        t.worker,
        t.lease_expires_at,
        t.priority,
    )
    await asyncio.sleep(0.15)
    assert [x.id for x in await repo.expired(10)] == ["1"]  # still in the lease index
    assert await repo.complete([Completion(t.id, t.attempt, None)]) == ["1"]


async def test_update_of_a_missing_task_raises(repo: RedisRepository) -> None:
    with pytest.raises(TaskNotFoundError):
        await repo.update("nope", {"priority": 1})


async def test_update_refuses_fields_that_belong_to_the_queue(repo: RedisRepository) -> None:
    await repo.add([new(1)])
    with pytest.raises(ValueError, match="attempt"):
        await repo.update("1", {"attempt": 9})


async def test_remove_soft_and_hard(repo: RedisRepository) -> None:
    await repo.add([new(1), new(2), new(3)])
    t = await take_one(repo)
    assert await repo.remove("1", hard=False) is True
    soft = await repo.get("1")
    assert soft is not None and soft.status is TaskStatus.DELETED and soft.worker is None
    assert await repo.complete([Completion(t.id, t.attempt, None)]) == []
    assert await repo.remove("2", hard=True) is True
    assert await repo.get("2") is None
    assert await repo.remove("2", hard=True) is False
    assert [t.id for t in await repo.list()] == ["1", "3"]
    assert [t.id for t in await repo.dequeue("w", 5, 1000)] == ["3"]


async def test_list_in_seq_order_by_status_and_limit(repo: RedisRepository) -> None:
    await repo.add([new(i, priority=-i) for i in range(5)])
    await repo.dequeue("w", 2, 60_000)
    assert [t.id for t in await repo.list()] == ["0", "1", "2", "3", "4"]
    assert [t.id for t in await repo.list(limit=2)] == ["0", "1"]
    assert [t.id for t in await repo.list(TaskStatus.PENDING)] == ["2", "3", "4"]
    assert [t.id for t in await repo.list(TaskStatus.PROCESSING, limit=1)] == ["0"]
    assert await repo.list(TaskStatus.FAILED) == []
    assert await repo.list(limit=0) == []


async def test_stats_counts_every_status_and_the_oldest_due_pending(repo: RedisRepository) -> None:
    empty = await repo.stats()
    assert empty.counts == {s.value: 0 for s in TaskStatus} and empty.oldest_pending_age_s is None
    await repo.add([new("later", delay_ms=60_000)])
    assert (await repo.stats()).oldest_pending_age_s is None
    now = await repo.now()
    await repo.add([new("old", run_at=now - timedelta(seconds=30)), new(2), new(3)])
    t = await take_one(repo)  # "old" goes first: same priority, earliest run_at
    assert t.id == "old"
    await repo.complete([Completion(t.id, t.attempt, None)])
    await repo.remove("3", hard=False)
    stats = await repo.stats()
    assert stats.counts == {"pending": 2, "processing": 0, "completed": 1, "failed": 0, "deleted": 1}
    assert stats.oldest_pending_age_s is not None and 0 <= stats.oldest_pending_age_s < 5
    await repo.update("2", {"run_at": now - timedelta(seconds=100)})
    age = (await repo.stats()).oldest_pending_age_s
    assert age is not None and 100 <= age < 105


async def test_purge_deletes_old_finished_tasks_of_the_given_statuses(repo: RedisRepository) -> None:
    await repo.add([new(i, max_retries=0) for i in range(5)])
    a, b, c, d = await repo.dequeue("w", 4, 60_000)
    await repo.complete([Completion(a.id, a.attempt, None), Completion(b.id, b.attempt, None)])
    await repo.fail(Failure(c.id, c.attempt, "e", 0))
    await asyncio.sleep(0.25)
    await repo.complete([Completion(d.id, d.attempt, None)])
    assert await repo.purge(200, [TaskStatus.COMPLETED], 1) == 1
    assert await repo.purge(200, [TaskStatus.COMPLETED], 10) == 1
    assert await repo.purge(200, [TaskStatus.COMPLETED], 10) == 0
    assert [t.id for t in await repo.list()] == ["2", "3", "4"]
    assert await repo.purge(0, [TaskStatus.FAILED, TaskStatus.COMPLETED], 10) == 2
    assert [t.id for t in await repo.list()] == ["4"]
    assert (await repo.stats()).counts["completed"] == 0


# --- wakeups ----------------------------------------------------------------------


async def test_wait_for_work_returns_after_timeout_when_nothing_happens(repo: RedisRepository) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await repo.wait_for_work(0.3)
    assert 0.25 <= loop.time() - start < 2


async def test_wait_for_work_wakes_on_add_from_another_client(make_repo: MakeRepo) -> None:
    waiter, producer = await make_repo(), await make_repo()
    await waiter.wait_for_work(0.01)  # subscribe
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def add_soon() -> None:
        await asyncio.sleep(0.1)
        await producer.add([new(1)])

    adder = asyncio.create_task(add_soon())
    await waiter.wait_for_work(10)
    await adder
    assert loop.time() - start < 2
    # the wakeup was consumed: the next wait runs to its timeout
    start = loop.time()
    await waiter.wait_for_work(0.2)
    assert loop.time() - start >= 0.15


async def test_wait_for_work_wakes_on_retry_and_release(make_repo: MakeRepo) -> None:
    waiter, worker = await make_repo(), await make_repo()
    await worker.add([new(1), new(2)])
    a, b = await worker.dequeue("w", 2, 60_000)
    await waiter.wait_for_work(0.01)  # subscribe, consume the add
    loop = asyncio.get_running_loop()
    for change in (
        worker.fail(Failure(a.id, a.attempt, "e", 0)),
        worker.release([Lease(b.id, b.attempt)]),
    ):
        await change
        start = loop.time()
        await waiter.wait_for_work(10)
        assert loop.time() - start < 2


async def test_wait_for_work_returns_when_a_delayed_task_comes_due(repo: RedisRepository) -> None:
    await repo.add([new(1, delay_ms=300)])
    await repo.wait_for_work(0)  # consume the add's wakeup
    loop = asyncio.get_running_loop()
    start = loop.time()
    await repo.wait_for_work(10)
    assert 0.2 <= loop.time() - start < 2
    assert (await take_one(repo)).id == "1"


async def test_wait_for_work_and_reopening_do_not_leak_connections(redis_url: str, redis_queue: str) -> None:
    name = f"kqleak{uuid.uuid4().hex[:8]}"
    url = f"{redis_url}{'&' if '?' in redis_url else '?'}client_name={name}"
    admin = redis.Redis.from_url(redis_url)

    def count() -> int:
        return sum(1 for c in admin.client_list() if c.get("name") == name)

    repo = RedisRepository(url, redis_queue)
    for _ in range(20):
        await repo.wait_for_work(0.005)
        await repo.add([new(uuid.uuid4().hex)])
        await repo.dequeue("w", 1, 1000)
    steady = count()
    assert steady <= 3
    for _ in range(10):
        await repo.wait_for_work(0.005)
        waiting = asyncio.create_task(repo.wait_for_work(10))
        await asyncio.sleep(0.002)
        waiting.cancel()  # the worker cancels waits whenever a slot frees
        await asyncio.gather(waiting, return_exceptions=True)
    assert count() == steady
    await repo.close()
    for _ in range(5):
        other = RedisRepository(url, redis_queue)
        await other.open()
        await other.wait_for_work(0.005)
        await other.close()
    await asyncio.sleep(0.05)
    assert count() == 0


async def test_cancelled_wait_leaves_the_repository_usable(make_repo: MakeRepo) -> None:
    waiter, producer = await make_repo(), await make_repo()
    waiting = asyncio.create_task(waiter.wait_for_work(10))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await producer.add([new(1)])
    loop = asyncio.get_running_loop()
    start = loop.time()
    await waiter.wait_for_work(5)  # a fresh subscription sees the ready task at once
    assert loop.time() - start < 1


# --- differential run against the memory store --------------------------------------


def _shape(t: Task) -> tuple[Any, ...]:
    return (
        t.id,
        t.status.value,
        t.attempt,
        t.retry_count,
        t.priority,
        t.worker,
        json.dumps(t.result),
        [(e.get("attempt"), e.get("worker"), e.get("outcome"), e.get("error")) for e in t.log],
    )


async def test_same_answers_as_the_memory_store_over_random_operations(repo: RedisRepository) -> None:
    mem = MemoryRepository()
    rng = random.Random(20240611)
    held: dict[str, int] = {}  # id -> attempt, for tasks currently taken
    next_id = 0

    async def both(method: str, *args: Any) -> Any:
        """Call one Repository method on both stores and insist on the same answer."""
        want, got = await getattr(mem, method)(*args), await getattr(repo, method)(*args)
        if isinstance(want, list) and want and isinstance(want[0], Task):
            want, got = [_shape(t) for t in want], [_shape(t) for t in got]
        elif isinstance(want, Task):
            want, got = _shape(want), _shape(got)
        assert got == want
        return got

    for step in range(300):
        op = rng.choice(["add", "add", "take", "take", "complete", "fail", "release", "update", "remove", "beat"])
        if op == "add":
            batch = [
                NewTask(
                    handler=rng.choice("ab"),
                    payload={"n": next_id + k},
                    id=f"t{next_id + k}",
                    priority=rng.randint(0, 2),
                    max_retries=rng.randint(0, 2),
                )
                for k in range(rng.randint(1, 4))
            ]
            next_id += len(batch)
            await both("add", batch)
        elif op == "take":
            handlers = rng.choice([None, ["a"], ["b"], ["a", "b"]])
            taken = await both("dequeue", "w", rng.randint(1, 3), 60_000, handlers)
            held.update({t[0]: t[2] for t in taken})
        elif held and op in ("complete", "fail", "release", "beat"):
            tid = rng.choice(sorted(held))
            attempt = held[tid] + rng.choice([0, 0, 0, 1])  # sometimes a stale attempt
            if op == "complete":
                landed = await both("complete", [Completion(tid, attempt, {"r": tid})])
            elif op == "fail":
                failure = Failure(tid, attempt, f"err {step}", 0, final=rng.random() < 0.2)
                landed = await both("fail", failure)
            elif op == "release":
                landed = await both("release", [Lease(tid, attempt)])
            else:
                await both("heartbeat", "w", [Lease(tid, attempt)], 60_000)
                landed = None  # still held
            if landed:
                held.pop(tid)
        elif next_id and op == "update":
            tid = f"t{rng.randrange(next_id)}"
            fields: dict[str, Any] = rng.choice(
                [{"priority": rng.randint(0, 3)}, {"status": TaskStatus.PENDING}, {"payload": {"u": step}}]
            )
            current = await mem.get(tid)
            if current is None:
                with pytest.raises(TaskNotFoundError):
                    await repo.update(tid, fields)
                continue
            if "status" in fields and current.status is TaskStatus.PROCESSING:
                for store in (mem, repo):
                    with pytest.raises(TaskBusyError):
                        await store.update(tid, fields)
                continue
            await both("update", tid, fields)
            if fields.get("status") is TaskStatus.PENDING:
                held.pop(tid, None)
        elif next_id and op == "remove":
            tid, hard = f"t{rng.randrange(next_id)}", rng.random() < 0.5
            await both("remove", tid, hard)
            held.pop(tid, None)
        if step % 20 == 0:
            await both("list")
    await both("list")
    stats_mem, stats_redis = await mem.stats(), await repo.stats()
    assert stats_redis.counts == stats_mem.counts


async def test_wakeups_come_back_after_the_subscription_is_killed(
    redis_url: str, redis_queue: str, make_repo: MakeRepo, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"kqkill{uuid.uuid4().hex[:8]}"
    waiter = RedisRepository(f"{redis_url}{'&' if '?' in redis_url else '?'}client_name={name}", redis_queue)
    producer = await make_repo()
    try:
        await waiter.wait_for_work(0.01)  # subscribe
        admin = redis.Redis.from_url(redis_url)
        subscribers = [c for c in admin.client_list() if c.get("name") == name and int(c.get("sub", 0)) > 0]
        assert len(subscribers) == 1
        admin.client_kill_filter(_id=subscribers[0]["id"])
        await producer.add([new(1)])  # announced while nobody listens
        loop = asyncio.get_running_loop()
        start = loop.time()
        await waiter.wait_for_work(5)
        assert loop.time() - start < 2
        assert "wakeups for queue" in caplog.text
    finally:
        await waiter.close()

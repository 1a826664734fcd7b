"""What only the Postgres backend promises: migrations, SQL guards, SKIP LOCKED,
transactional enqueue, LISTEN/NOTIFY wakeups and an index-only dequeue path.

The behaviour every backend shares is checked by the contract suite.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from kubeque.backends.postgres import PostgresRepository, migrate
from kubeque.backends.postgres.queries import migrations, query
from kubeque.errors import BackendError, DuplicateTaskError, InvalidIdentifierError, SchemaMissingError
from kubeque.task import Completion, FailOutcome, Failure, Lease, NewTask, TaskStatus

LATEST = max(m.version for m in migrations())


@pytest.fixture
async def repo(pg_dsn: str, pg_schema: str) -> AsyncIterator[PostgresRepository]:
    r = PostgresRepository(pg_dsn, pg_schema, application_name=f"kq-{pg_schema}")
    await r.open()
    yield r
    await r.close()


async def run_sql(dsn: str, statement: str, schema: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run test-only SQL; ``{}`` is the schema, quoted as an identifier."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql.SQL(statement).format(sql.Identifier(schema)), params)
        return await cur.fetchall() if cur.description else []


def new(handler: str = "h", **kw: Any) -> NewTask:
    return NewTask(handler=handler, payload=kw.pop("payload", {}), **kw)


# --- names and migrations ------------------------------------------------------


@pytest.mark.parametrize("bad", ["Tasks", "1queue", "a-b", "a;drop table x", "x" * 64, "", "q\n", 'q"'])
def test_bad_schema_names_are_refused_by_name(pg_dsn: str, bad: str) -> None:
    with pytest.raises(InvalidIdentifierError) as exc:
        PostgresRepository(pg_dsn, bad)
    assert repr(bad) in str(exc.value)
    with pytest.raises(InvalidIdentifierError):
        migrate(pg_dsn, bad)


def test_longest_valid_schema_name_is_accepted(pg_dsn: str) -> None:
    assert PostgresRepository(pg_dsn, "_" + "a" * 62).schema == "_" + "a" * 62


async def test_migrate_applies_each_version_once(pg_dsn: str, pg_schema: str) -> None:
    assert await asyncio.to_thread(migrate, pg_dsn, pg_schema) == [m.version for m in migrations()]
    assert await asyncio.to_thread(migrate, pg_dsn, pg_schema) == []
    rows = await run_sql(pg_dsn, "SELECT version FROM {}.migrations ORDER BY version", pg_schema)
    assert [r[0] for r in rows] == [m.version for m in migrations()]


def test_concurrent_migrations_on_a_fresh_schema_all_succeed(pg_dsn: str, pg_schema: str) -> None:
    barrier = threading.Barrier(8)

    def run() -> list[int]:
        barrier.wait()
        return migrate(pg_dsn, pg_schema)

    with ThreadPoolExecutor(8) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(run) for _ in range(8)]]
    applied = Counter(v for r in results for v in r)
    assert applied == Counter({m.version: 1 for m in migrations()})


async def test_open_migrates_when_auto_migrate(pg_dsn: str, pg_schema: str) -> None:
    async with PostgresRepository(pg_dsn, pg_schema) as r:
        assert await r.list() == []
    rows = await run_sql(pg_dsn, "SELECT max(version) FROM {}.migrations", pg_schema)
    assert rows[0][0] == LATEST


async def test_open_without_auto_migrate_on_missing_schema_says_run_migrate(pg_dsn: str, pg_schema: str) -> None:
    r = PostgresRepository(pg_dsn, pg_schema, auto_migrate=False)
    with pytest.raises(SchemaMissingError, match="kubeque migrate"):
        await r.open()
    await asyncio.to_thread(migrate, pg_dsn, pg_schema)
    async with r:
        assert await r.list() == []


async def test_dropped_schema_is_reported_as_missing(repo: PostgresRepository, pg_dsn: str, pg_schema: str) -> None:
    await run_sql(pg_dsn, "DROP SCHEMA {} CASCADE", pg_schema)
    with pytest.raises(SchemaMissingError, match="kubeque migrate"):
        await repo.list()


# --- connection failures -------------------------------------------------------


async def test_malformed_dsn_is_a_backend_error() -> None:
    r = PostgresRepository("this is not = a dsn = at all", "q")
    with pytest.raises(BackendError, match="DSN") as exc:
        await r.open()
    assert exc.value.__cause__ is not None


async def test_unreachable_server_is_a_backend_error_with_its_address() -> None:
    r = PostgresRepository("postgresql://postgres:secret@127.0.0.1:1/test", "q")
    with pytest.raises(BackendError, match=r"127\.0\.0\.1:1") as exc:
        await r.open()
    assert "secret" not in str(exc.value)
    assert isinstance(exc.value.__cause__, psycopg.OperationalError)


# --- order ---------------------------------------------------------------------


async def test_dequeue_orders_by_priority_then_run_at_then_insertion(repo: PostgresRepository) -> None:
    now = await repo.now()
    await repo.add(
        [
            new(id="late-low", run_at=now - timedelta(seconds=1)),
            new(id="early-low", run_at=now - timedelta(seconds=5)),
            new(id="high", priority=5, run_at=now - timedelta(seconds=1)),
            new(id="future-top", priority=9, run_at=now + timedelta(hours=1)),
            new(id="tie-a", run_at=now - timedelta(seconds=3)),
            new(id="tie-b", run_at=now - timedelta(seconds=3)),
        ]
    )
    taken = await repo.dequeue("w", 10, 60_000)
    assert [t.id for t in taken] == ["high", "early-low", "tie-a", "tie-b", "late-low"]


async def test_one_batch_and_one_transaction_stay_fifo(repo: PostgresRepository, pg_dsn: str) -> None:
    await repo.add([new(id=f"b{i:03}") for i in range(60)])
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        for i in range(5):
            await repo.add([new(id=f"t{i}")], connection=conn)
        await conn.commit()
    taken = [t.id for t in await repo.dequeue("w", 100, 60_000)]
    assert taken == [f"b{i:03}" for i in range(60)] + [f"t{i}" for i in range(5)]


async def test_dequeue_starts_an_attempt(repo: PostgresRepository) -> None:
    [added] = await repo.add([new()])
    [t] = await repo.dequeue("w1", 1, 30_000)
    assert (t.status, t.attempt, t.worker) == (TaskStatus.PROCESSING, 1, "w1")
    assert t.lease_expires_at is not None
    assert abs((t.lease_expires_at - t.updated_at).total_seconds() - 30) < 0.01
    assert t.log == [{"attempt": 1, "worker": "w1", "started_at": t.updated_at.isoformat()}]
    assert datetime.fromisoformat(t.log[0]["started_at"]) == t.updated_at
    assert await repo.dequeue("w2", 1, 30_000) == []
    assert added.seq == t.seq


async def test_dequeue_takes_only_the_named_handlers(repo: PostgresRepository) -> None:
    await repo.add([new("a", id="1"), new("b", id="2"), new("c", id="3")])
    assert [t.id for t in await repo.dequeue("w", 10, 60_000, handlers={"c", "a"})] == ["1", "3"]
    assert await repo.dequeue("w", 10, 60_000, handlers=[]) == []


async def test_concurrent_dequeues_never_share_a_task(repo: PostgresRepository) -> None:
    await repo.add([new(payload={"i": i}) for i in range(300)])

    async def drain(worker: str) -> list[str]:
        got: list[str] = []
        while batch := await repo.dequeue(worker, 7, 60_000):
            got += [t.id for t in batch]
        return got

    results = await asyncio.gather(*(drain(f"w{i}") for i in range(8)))
    ids = [i for r in results for i in r]
    assert len(ids) == 300
    assert len(set(ids)) == 300


async def test_dequeue_inner_select_uses_the_partial_pending_index(
    repo: PostgresRepository, pg_dsn: str, pg_schema: str
) -> None:
    # History: tasks that went through the queue, and many more finished long ago.
    await repo.add([new() for _ in range(1000)])
    await run_sql(pg_dsn, "UPDATE {}.tasks SET status = 'completed' WHERE seq > 20", pg_schema)
    await run_sql(
        pg_dsn,
        "INSERT INTO {}.tasks (id, handler, payload, status) "
        "SELECT 'old-' || i, 'h', jsonb_build_object(), 'completed' FROM generate_series(1, 5000) AS i",
        pg_schema,
    )
    await run_sql(pg_dsn, "ANALYZE {}.tasks", pg_schema)
    params = {"worker": "w", "limit": 10, "lease_ms": 1000, "handlers": None}
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        cur = await conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query("dequeue", pg_schema), params)
        row = await cur.fetchone()
    assert row is not None
    assert "tasks_pending_idx" in json.dumps(row[0])


# --- guards ----------------------------------------------------------------------


async def test_a_stale_attempt_cannot_complete_or_fail(repo: PostgresRepository) -> None:
    await repo.add([new(id="x")])
    [first] = await repo.dequeue("w1", 1, 60_000)
    assert await repo.release([Lease("x", first.attempt)]) == ["x"]
    [second] = await repo.dequeue("w2", 1, 60_000)
    assert second.attempt == first.attempt + 1
    assert await repo.complete([Completion("x", first.attempt, "late")]) == []
    assert await repo.fail(Failure("x", first.attempt, "late", 0)) is None
    assert await repo.heartbeat("w1", [Lease("x", first.attempt)], 60_000) == []
    assert await repo.complete([Completion("x", second.attempt, {"n": 1})]) == ["x"]
    done = await repo.get("x")
    assert done is not None
    assert (done.status, done.result, done.worker) == (TaskStatus.COMPLETED, {"n": 1}, None)
    assert done.lease_expires_at is None
    assert done.log[-1]["outcome"] == "completed"
    assert await repo.complete([Completion("x", second.attempt, "again")]) == []


async def test_complete_takes_a_batch_and_reports_what_landed(repo: PostgresRepository) -> None:
    await repo.add([new(id=str(i)) for i in range(4)])
    taken = await repo.dequeue("w", 3, 60_000)
    batch = [Completion(t.id, t.attempt, {"id": t.id}) for t in taken] + [Completion("3", 1), Completion("nope", 1)]
    assert await repo.complete(batch) == ["0", "1", "2"]
    assert {t.id: t.result for t in await repo.list(TaskStatus.COMPLETED)} == {i: {"id": i} for i in "012"}


async def test_failures_retry_until_max_retries_then_fail(repo: PostgresRepository) -> None:
    await repo.add([new(id="x", max_retries=1)])
    [t] = await repo.dequeue("w", 1, 60_000)
    assert await repo.fail(Failure("x", t.attempt, "boom\x00", retry_delay_ms=0)) is FailOutcome.RETRIED
    retried = await repo.get("x")
    assert retried is not None
    assert (retried.status, retried.retry_count, retried.worker) == (TaskStatus.PENDING, 1, None)
    assert retried.log[-1]["outcome"] == "error"
    assert retried.log[-1]["error"] == "boom\\0"
    [t] = await repo.dequeue("w", 1, 60_000)
    assert await repo.fail(Failure("x", t.attempt, "again", retry_delay_ms=0)) is FailOutcome.FAILED
    failed = await repo.get("x")
    assert failed is not None
    assert (failed.status, failed.retry_count, failed.attempt) == (TaskStatus.FAILED, 1, 2)
    assert [e["attempt"] for e in failed.log] == [1, 2]


async def test_a_retry_waits_for_its_backoff(repo: PostgresRepository) -> None:
    await repo.add([new(id="x")])
    [t] = await repo.dequeue("w", 1, 60_000)
    before = await repo.now()
    assert await repo.fail(Failure("x", t.attempt, "boom", retry_delay_ms=60_000)) is FailOutcome.RETRIED
    assert await repo.dequeue("w", 1, 60_000) == []
    retried = await repo.get("x")
    assert retried is not None
    assert timedelta(seconds=59) < retried.run_at - before < timedelta(seconds=61)


async def test_a_final_failure_does_not_retry(repo: PostgresRepository) -> None:
    await repo.add([new(id="x", max_retries=5)])
    [t] = await repo.dequeue("w", 1, 60_000)
    outcome = await repo.fail(Failure("x", t.attempt, "no handler", 0, outcome="unknown_handler", final=True))
    assert outcome is FailOutcome.FAILED
    failed = await repo.get("x")
    assert failed is not None
    assert failed.retry_count == 0
    assert failed.log[-1]["outcome"] == "unknown_handler"


async def test_release_returns_a_task_without_spending_a_retry(repo: PostgresRepository) -> None:
    await repo.add([new(id="x")])
    [t] = await repo.dequeue("w", 1, 60_000)
    assert await repo.release([Lease("x", t.attempt), Lease("missing", 1)]) == ["x"]
    back = await repo.get("x")
    assert back is not None
    assert (back.status, back.retry_count, back.worker, back.lease_expires_at) == (TaskStatus.PENDING, 0, None, None)
    assert back.log[-1]["outcome"] == "released"
    assert [u.id for u in await repo.dequeue("w", 1, 60_000)] == ["x"]


async def test_heartbeat_renews_only_the_workers_own_current_leases(repo: PostgresRepository) -> None:
    await repo.add([new(id="a"), new(id="b")])
    a, b = await repo.dequeue("w1", 2, 1_000)
    assert await repo.heartbeat("w2", [Lease("a", a.attempt)], 60_000) == []
    assert await repo.heartbeat("w1", [Lease("b", b.attempt + 1), Lease("a", a.attempt)], 60_000) == ["a"]
    renewed = await repo.get("a")
    assert renewed is not None and renewed.lease_expires_at is not None and a.lease_expires_at is not None
    assert renewed.lease_expires_at > a.lease_expires_at + timedelta(seconds=50)


async def test_expired_leases_are_found_and_reclaimed_only_once_expired(repo: PostgresRepository) -> None:
    await repo.add([new(id="short"), new(id="long")])
    [short] = await repo.dequeue("w", 1, 1)
    [long] = await repo.dequeue("w", 1, 60_000)
    await asyncio.sleep(0.02)
    assert [t.id for t in await repo.expired(10)] == ["short"]
    assert await repo.fail(Failure("long", long.attempt, "lost", 0, outcome="lost", only_if_expired=True)) is None
    reclaim = Failure("short", short.attempt, "lease expired", 0, outcome="lost", only_if_expired=True)
    assert await repo.fail(reclaim) is FailOutcome.RETRIED
    assert await repo.expired(10) == []


# --- adding ------------------------------------------------------------------------


async def test_a_duplicate_id_stores_nothing_and_names_the_id(repo: PostgresRepository) -> None:
    await repo.add([new(id="taken")])
    with pytest.raises(DuplicateTaskError, match="'taken'"):
        await repo.add([new(id="fresh"), new(id="taken")])
    with pytest.raises(DuplicateTaskError, match="'twice'"):
        await repo.add([new(id="twice"), new(id="other"), new(id="twice")])
    assert [t.id for t in await repo.list()] == ["taken"]


async def test_transactional_add_vanishes_on_rollback(repo: PostgresRepository, pg_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await repo.add([new(id="x")], connection=conn)
        assert await repo.get("x") is None  # not visible outside the caller's transaction
        await conn.rollback()
    assert await repo.list() == []


async def test_transactional_add_is_stored_on_commit_and_then_wakes_workers(
    repo: PostgresRepository, pg_dsn: str
) -> None:
    await repo.wait_for_work(0)  # connect the listener
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await conn.execute("SELECT 1")  # the caller's transaction is already under way
        waiter = asyncio.create_task(repo.wait_for_work(5))
        [t] = await repo.add([new(id="x")], connection=conn)
        assert t.status is TaskStatus.PENDING
        await asyncio.sleep(0.3)
        assert not waiter.done()  # NOTIFY is delivered at commit, not before
        await conn.commit()
        await asyncio.wait_for(waiter, 2)
    assert [u.id for u in await repo.list()] == ["x"]


async def test_transactional_add_on_a_sync_connection(repo: PostgresRepository, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        await repo.add([new(id="rolled-back")], connection=conn)
        conn.rollback()
        await repo.add([new(id="kept")], connection=conn)
        conn.commit()
    assert [t.id for t in await repo.list()] == ["kept"]


async def test_a_duplicate_in_a_callers_transaction_leaves_it_usable(repo: PostgresRepository, pg_dsn: str) -> None:
    await repo.add([new(id="taken")])
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await repo.add([new(id="mine")], connection=conn)
        with pytest.raises(DuplicateTaskError, match="'taken'"):
            await repo.add([new(id="taken"), new(id="also")], connection=conn)
        await conn.commit()
    assert [t.id for t in await repo.list()] == ["taken", "mine"]


async def test_other_connection_types_are_refused(repo: PostgresRepository) -> None:
    with pytest.raises(TypeError, match="psycopg"):
        await repo.add([new()], connection=object())


# --- wakeups -----------------------------------------------------------------------


async def test_wait_for_work_times_out_when_nothing_happens(repo: PostgresRepository) -> None:
    await repo.wait_for_work(0)
    start = time.monotonic()
    await repo.wait_for_work(0.3)
    assert time.monotonic() - start >= 0.25


async def test_add_and_retry_wake_a_waiting_worker(repo: PostgresRepository) -> None:
    await repo.wait_for_work(0)
    for trigger in ("add", "retry"):
        waiter = asyncio.create_task(repo.wait_for_work(10))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        if trigger == "add":
            await repo.add([new(id="x")])
            [taken] = await repo.dequeue("w", 1, 60_000)
        else:
            assert await repo.fail(Failure("x", taken.attempt, "boom", 0)) is FailOutcome.RETRIED
        await asyncio.wait_for(waiter, 2)
        assert time.monotonic() - start < 1


async def test_listener_killed_by_the_server_is_reestablished(
    repo: PostgresRepository, pg_dsn: str, pg_schema: str
) -> None:
    await repo.wait_for_work(0)
    waiter = asyncio.create_task(repo.wait_for_work(10))
    await asyncio.sleep(0.1)
    await kill_listener(pg_dsn, pg_schema)
    await asyncio.wait_for(waiter, 3)  # the loss is noticed: return so the caller polls

    waiter = asyncio.create_task(repo.wait_for_work(10))
    await asyncio.sleep(0.1)
    start = time.monotonic()
    await repo.add([new()])
    await asyncio.wait_for(waiter, 2)
    assert time.monotonic() - start < 1


async def kill_listener(dsn: str, schema: str) -> None:
    killed = await run_sql(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        schema,
        (f"kq-{schema}-listen",),
    )
    assert killed == [(True,)]


async def test_listener_killed_while_idle_is_noticed_by_the_next_wait(
    repo: PostgresRepository, pg_dsn: str, pg_schema: str
) -> None:
    await repo.wait_for_work(0)
    await kill_listener(pg_dsn, pg_schema)
    await asyncio.sleep(0.05)
    start = time.monotonic()
    await repo.wait_for_work(10)
    assert time.monotonic() - start < 3
    waiter = asyncio.create_task(repo.wait_for_work(10))
    await asyncio.sleep(0.1)
    await repo.add([new()])
    await asyncio.wait_for(waiter, 2)


async def test_cancelled_waits_leave_the_listener_working(repo: PostgresRepository) -> None:
    await repo.wait_for_work(0)
    for _ in range(3):
        waiter = asyncio.create_task(repo.wait_for_work(10))
        await asyncio.sleep(0.02)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    waiter = asyncio.create_task(repo.wait_for_work(10))
    await asyncio.sleep(0.1)
    await repo.add([new()])
    await asyncio.wait_for(waiter, 2)


async def test_close_ends_a_wait(repo: PostgresRepository) -> None:
    await repo.wait_for_work(0)
    waiter = asyncio.create_task(repo.wait_for_work(10))
    await asyncio.sleep(0.1)
    await repo.close()
    await asyncio.wait_for(waiter, 2)


async def test_without_a_listener_waiting_falls_back_to_polling() -> None:
    r = PostgresRepository("postgresql://postgres@127.0.0.1:1/test", "q")
    for _ in range(2):
        start = time.monotonic()
        await r.wait_for_work(0.2)  # no error: the caller simply polls
        assert 0.15 < time.monotonic() - start < 2


# --- housekeeping --------------------------------------------------------------------


async def test_purge_deletes_old_finished_tasks_in_bounded_batches(repo: PostgresRepository) -> None:
    await repo.add([new(id=f"{i:02}") for i in range(25)])
    taken = await repo.dequeue("w", 20, 60_000)
    await repo.complete([Completion(t.id, t.attempt) for t in taken])
    await asyncio.sleep(0.01)
    assert await repo.purge(60_000, [TaskStatus.COMPLETED], 100) == 0  # not old enough
    assert await repo.purge(0, [TaskStatus.COMPLETED], 8) == 8
    assert await repo.purge(0, [TaskStatus.COMPLETED, TaskStatus.FAILED], 8) == 8
    assert await repo.purge(0, [TaskStatus.COMPLETED], 8) == 4
    assert await repo.purge(0, [TaskStatus.COMPLETED], 8) == 0
    assert len(await repo.list(TaskStatus.PENDING)) == 5


async def test_stats_count_every_status_and_the_oldest_due_wait(repo: PostgresRepository) -> None:
    empty = await repo.stats()
    assert empty.counts == {s.value: 0 for s in TaskStatus} and empty.oldest_pending_age_s is None
    now = await repo.now()
    await repo.add([new(run_at=now - timedelta(seconds=30)), new(run_at=now + timedelta(hours=1)), new()])
    await repo.dequeue("w", 1, 60_000)
    stats = await repo.stats()
    assert stats.counts == {"pending": 2, "processing": 1, "completed": 0, "failed": 0, "deleted": 0}
    assert stats.oldest_pending_age_s is not None and 0 <= stats.oldest_pending_age_s < 5


async def test_update_to_pending_retries_a_finished_task_now(repo: PostgresRepository) -> None:
    await repo.add([new(id="x", max_retries=0)])
    [t] = await repo.dequeue("w", 1, 60_000)
    assert await repo.fail(Failure("x", t.attempt, "boom", 0)) is FailOutcome.FAILED
    before = await repo.now()
    again = await repo.update("x", {"status": TaskStatus.PENDING, "priority": 3, "extra": {"k": "v"}})
    assert (again.status, again.priority, again.extra, again.worker) == (TaskStatus.PENDING, 3, {"k": "v"}, None)
    assert again.run_at >= before
    assert [u.id for u in await repo.dequeue("w", 1, 60_000)] == ["x"]


async def test_a_repository_reopens_on_a_new_event_loop(pg_dsn: str, pg_schema: str) -> None:
    r = PostgresRepository(pg_dsn, pg_schema)

    def use_on_fresh_loop(task_id: str) -> list[str]:
        async def body() -> list[str]:
            await r.add([new(id=task_id)])
            return [t.id for t in await r.list()]

        return asyncio.run(body())

    assert await asyncio.to_thread(use_on_fresh_loop, "a") == ["a"]
    assert await asyncio.to_thread(use_on_fresh_loop, "b") == ["a", "b"]
    await r.close()


async def test_only_one_process_holds_a_chore_lock(pg_dsn: str, pg_schema: str) -> None:
    a, b = PostgresRepository(pg_dsn, pg_schema), PostgresRepository(pg_dsn, pg_schema)
    try:
        async with (
            a.exclusive("reclaim") as first,
            b.exclusive("reclaim") as second,
            b.exclusive("prune") as other_chore,
        ):
            assert (first, second, other_chore) == (True, False, True)
        async with b.exclusive("reclaim") as after:
            assert after is True
    finally:
        await a.close()
        await b.close()


async def chore_sessions(dsn: str, schema: str) -> list[int]:
    """Backend pids of the repository's chore connections (application_name kq-<schema>-chores)."""
    rows = await run_sql(
        dsn,
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
        schema,
        (f"kq-{schema}-chores",),
    )
    return [r[0] for r in rows]


async def test_a_chore_holding_its_lock_can_still_use_a_one_connection_pool(pg_dsn: str, pg_schema: str) -> None:
    r = PostgresRepository(pg_dsn, pg_schema, min_size=1, max_size=1, application_name=f"kq-{pg_schema}")
    try:
        await r.add([new(id="lost"), new(id="other")])
        [t] = await r.dequeue("dead-worker", 1, 1)
        await asyncio.sleep(0.05)  # its 1 ms lease runs out
        async with r.exclusive("reclaim") as mine:
            assert mine is True
            # The pool timeout is 15 s: each call here would wait that long if the lock held the one connection.
            expired = await asyncio.wait_for(r.expired(10), 3)
            assert [e.id for e in expired] == ["lost"]
            lost = Failure(t.id, t.attempt, "lease expired", 0, outcome="lost", only_if_expired=True)
            assert await asyncio.wait_for(r.fail(lost), 3) is FailOutcome.RETRIED
            # Workers are not blocked while a chore runs either.
            assert len(await asyncio.wait_for(r.dequeue("w", 2, 60_000), 3)) == 2
    finally:
        await r.close()


async def test_chore_locks_sit_on_one_dedicated_connection_closed_with_the_repository(
    repo: PostgresRepository, pg_dsn: str, pg_schema: str
) -> None:
    async with repo.exclusive("reclaim") as reclaim, repo.exclusive("prune") as prune:
        assert (reclaim, prune) == (True, True)
        [pid] = await chore_sessions(pg_dsn, pg_schema)
    async with repo.exclusive("reclaim") as again:
        assert again is True
        assert await chore_sessions(pg_dsn, pg_schema) == [pid]  # reused, not reopened
    await repo.close()
    assert await chore_sessions(pg_dsn, pg_schema) == []


async def test_a_chore_is_exclusive_within_one_process_too(repo: PostgresRepository) -> None:
    async with repo.exclusive("reclaim") as first, repo.exclusive("reclaim") as second:
        assert (first, second) == (True, False)
    async with repo.exclusive("reclaim") as after:
        assert after is True

    async def try_at_once() -> bool:
        async with repo.exclusive("prune") as mine:
            await asyncio.sleep(0.1)
            return mine

    assert sorted(await asyncio.gather(*(try_at_once() for _ in range(5)))) == [False] * 4 + [True]


async def test_a_killed_chore_connection_is_replaced_by_the_next_call(
    repo: PostgresRepository, pg_dsn: str, pg_schema: str
) -> None:
    async with repo.exclusive("reclaim") as mine:
        assert mine is True
    [pid] = await chore_sessions(pg_dsn, pg_schema)
    await run_sql(pg_dsn, "SELECT pg_terminate_backend(%s)", pg_schema, (pid,))
    await asyncio.sleep(0.05)
    async with repo.exclusive("reclaim") as mine:
        assert mine is True
        [new_pid] = await chore_sessions(pg_dsn, pg_schema)
        assert new_pid != pid


async def test_a_chore_lock_lost_with_its_connection_is_free_for_others(
    repo: PostgresRepository, pg_dsn: str, pg_schema: str
) -> None:
    other = PostgresRepository(pg_dsn, pg_schema)
    try:
        async with repo.exclusive("reclaim") as mine:
            assert mine is True
            [pid] = await chore_sessions(pg_dsn, pg_schema)
            await run_sql(pg_dsn, "SELECT pg_terminate_backend(%s)", pg_schema, (pid,))
            await asyncio.sleep(0.05)
            async with other.exclusive("reclaim") as theirs:
                assert theirs is True  # the server freed it with the session
        # Leaving the block after the loss raised nothing; the next call reconnects.
        async with other.exclusive("reclaim") as theirs, repo.exclusive("reclaim") as mine_again:
            assert (theirs, mine_again) == (True, False)
    finally:
        await other.close()


async def test_a_cancelled_chore_gives_its_lock_back(repo: PostgresRepository, pg_dsn: str, pg_schema: str) -> None:
    entered = asyncio.Event()

    async def chore() -> None:
        async with repo.exclusive("reclaim") as mine:
            assert mine is True
            entered.set()
            await asyncio.sleep(30)

    running = asyncio.create_task(chore())
    await asyncio.wait_for(entered.wait(), 5)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    other = PostgresRepository(pg_dsn, pg_schema)
    try:
        async with other.exclusive("reclaim") as theirs:
            assert theirs is True
    finally:
        await other.close()
    async with repo.exclusive("reclaim") as mine:
        assert mine is True

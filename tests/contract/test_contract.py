"""The task contract (DESIGN.md, "The task"), checked against every backend."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from kubeque import (
    ConfigError,
    DuplicateTaskError,
    PayloadError,
    PayloadValidationError,
    QueueManager,
    Task,
    TaskEvent,
    TaskStatus,
    UnknownHandlerError,
)
from kubeque.task import Completion, FailOutcome, Failure, Lease

from .conftest import StoreFactory

FAST = {"retry_backoff_ms": 1, "poll_interval": 0.05}


class Thumb(BaseModel):
    path: str
    width: int


@pytest.fixture
async def make_qm(store_factory: StoreFactory) -> AsyncIterator[Callable[..., QueueManager]]:
    made: list[QueueManager] = []

    def make(**kwargs: Any) -> QueueManager:
        opts = {**FAST, **kwargs}
        qm = QueueManager(store_factory(), **opts)
        made.append(qm)
        return qm

    yield make
    for qm in made:
        await qm.close()


async def settle(qm: QueueManager, timeout: float = 15.0) -> None:
    """Wait until nothing is pending or processing."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        st = await qm.stats()
        if st.counts["pending"] == 0 and st.counts["processing"] == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"queue did not settle: {(await qm.stats()).counts}")


# --- ordering ----------------------------------------------------------------


async def test_dequeue_order_is_priority_then_fifo(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    a = await qm.add_task("h", {"n": 1})
    b = await qm.add_task("h", {"n": 2}, priority=5)
    c = await qm.add_task("h", {"n": 3})
    d = await qm.add_task("h", {"n": 4}, priority=5)
    e = await qm.add_task("h", {"n": 5}, priority=-1)
    taken = await qm.repository.dequeue("w", 10, 30_000)
    assert [t.id for t in taken] == [x.id for x in (b, d, a, c, e) if x is not None]


async def test_batch_add_keeps_insertion_order(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    added = await qm.add_tasks([{"handler": "h", "payload": {"i": i}} for i in range(50)])
    taken: list[Task] = []
    while len(taken) < 50:
        taken += await qm.repository.dequeue("w", 7, 30_000)
    assert [t.id for t in taken] == [t.id for t in added]
    assert [t.payload["i"] for t in taken] == list(range(50))


async def test_delayed_task_waits_for_run_at(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    later = await qm.add_task("h", {}, delay=0.4)
    now = await qm.add_task("h", {})
    assert later is not None and now is not None
    assert [t.id for t in await qm.repository.dequeue("w", 10, 30_000)] == [now.id]
    await asyncio.sleep(0.5)
    assert [t.id for t in await qm.repository.dequeue("w", 10, 30_000)] == [later.id]


async def test_run_at_in_the_past_runs_at_once(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    t = await qm.add_task("h", {}, run_at=datetime.now(UTC) - timedelta(hours=1))
    assert t is not None
    assert [x.id for x in await qm.repository.dequeue("w", 1, 30_000)] == [t.id]


# --- attempts and retries ----------------------------------------------------


async def test_failing_task_runs_one_plus_max_retries_times(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm()
    runs: list[int] = []

    @qm.handler(max_retries=2)
    def flaky(p: dict[str, Any]) -> None:
        runs.append(1)
        raise RuntimeError("boom")

    failed: list[TaskEvent] = []
    retried: list[TaskEvent] = []
    qm.on("task_failed", failed.append)
    qm.on("task_retried", retried.append)
    t = await qm.add_task("flaky", {})
    assert t is not None
    await qm.start_worker(2)
    await settle(qm)
    await qm.stop_worker()
    got = await qm.get_task(t.id)
    assert got is not None
    assert got.status is TaskStatus.FAILED
    assert len(runs) == 3
    assert got.retry_count == 2
    assert [e["outcome"] for e in got.log] == ["error", "error", "error"]
    assert all("RuntimeError: boom" in e["error"] for e in got.log)
    assert len(retried) == 2 and len(failed) == 1
    assert failed[0].error is not None and "boom" in failed[0].error


async def test_task_that_fails_then_succeeds_completes(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm()
    calls = {"n": 0}

    @qm.handler()
    async def transient(p: dict[str, Any]) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("try later")
        return {"delivered": True, "after": calls["n"]}

    t = await qm.add_task("transient", {})
    assert t is not None
    await qm.start_worker(1)
    await settle(qm)
    await qm.stop_worker()
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.COMPLETED
    assert got.result == {"delivered": True, "after": 3}
    assert got.retry_count == 2
    assert [e["outcome"] for e in got.log] == ["error", "error", "completed"]


async def test_options_override_handler_override_defaults(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(max_retries=7, max_processing_time=1234)
    qm.register("a", lambda p: None, max_retries=2)
    qm.register("b", lambda p: None)
    t1 = await qm.add_task("a", {})
    t2 = await qm.add_task("a", {}, max_retries=0, max_processing_time=timedelta(seconds=2))
    t3 = await qm.add_task("b", {})
    assert t1 is not None and t2 is not None and t3 is not None
    assert (t1.max_retries, t1.max_processing_time) == (2, 1234)
    assert (t2.max_retries, t2.max_processing_time) == (0, 2000)
    assert (t3.max_retries, t3.max_processing_time) == (7, 1234)
    assert qm.inspect_handler("a")["effective"]["max_retries"] == 2


async def test_backoff_spaces_retries(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    t = await qm.add_task("h", {}, retry_backoff_ms=600)
    assert t is not None
    [taken] = await qm.repository.dequeue("w", 1, 30_000)
    out = await qm.repository.fail(Failure(t.id, taken.attempt, "x", retry_delay_ms=600))
    assert out is FailOutcome.RETRIED
    assert await qm.repository.dequeue("w", 1, 30_000) == []
    await asyncio.sleep(0.7)
    again = await qm.repository.dequeue("w", 1, 30_000)
    assert [x.id for x in again] == [t.id]
    assert again[0].retry_count == 1 and again[0].attempt == 2


# --- deadlines ---------------------------------------------------------------


async def test_attempt_past_deadline_is_stopped_and_counted(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm()
    cancelled = asyncio.Event()

    @qm.handler(max_retries=1, max_processing_time=150)
    async def hang(p: dict[str, Any]) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stuck: list[TaskEvent] = []
    qm.on("task_stuck", stuck.append)
    t = await qm.add_task("hang", {})
    assert t is not None
    await qm.start_worker(1)
    await settle(qm)
    await qm.stop_worker()
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.FAILED
    assert [e["outcome"] for e in got.log] == ["timeout", "timeout"]
    assert "max_processing_time" in got.log[0]["error"]
    assert cancelled.is_set()
    assert len(stuck) == 2


async def test_sync_handler_past_deadline_fails_and_late_result_is_dropped(
    make_qm: Callable[..., QueueManager],
) -> None:
    qm = make_qm()
    import time

    @qm.handler(max_retries=0, max_processing_time=100)
    def slow(p: dict[str, Any]) -> str:
        time.sleep(0.4)
        return "late"

    t = await qm.add_task("slow", {})
    assert t is not None
    await qm.start_worker(1)
    await settle(qm)
    await asyncio.sleep(0.5)  # the thread finishes; its result must not land
    await qm.stop_worker()
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.FAILED and got.result is None


# --- leases ------------------------------------------------------------------


async def test_expired_lease_is_reclaimed_as_a_failed_attempt(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(lease_ms=300)
    ran: list[str] = []

    @qm.handler(max_retries=1)
    def job(p: dict[str, Any]) -> str:
        ran.append("x")
        return "ok"

    t = await qm.add_task("job", {})
    assert t is not None
    # A worker takes it and dies: nobody renews the lease.
    [dead] = await qm.repository.dequeue("dead-worker", 1, 300)
    stuck: list[TaskEvent] = []
    qm.on("task_stuck", stuck.append)
    await asyncio.sleep(0.35)
    await qm.start_worker(1)
    await settle(qm)
    await qm.stop_worker()
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.COMPLETED
    assert [e["outcome"] for e in got.log] == ["lost", "completed"]
    assert got.retry_count == 1 and ran == ["x"]
    assert stuck and stuck[0].outcome == "lost"
    # The dead worker wakes up late: its write must not land.
    assert await qm.repository.complete([Completion(t.id, dead.attempt, "zombie")]) == []
    assert (await qm.get_task(t.id)).result == "ok"  # type: ignore[union-attr]


async def test_heartbeat_keeps_a_long_task_alive(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(lease_ms=500)

    @qm.handler(max_retries=0)
    async def long(p: dict[str, Any]) -> str:
        await asyncio.sleep(1.6)  # several lease lengths
        return "done"

    t = await qm.add_task("long", {})
    assert t is not None
    await qm.start_worker(1)
    await settle(qm)
    await qm.stop_worker()
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.COMPLETED and got.retry_count == 0


async def test_stale_attempt_writes_never_land(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    repo = qm.repository
    t = await qm.add_task("h", {}, max_retries=3)
    assert t is not None
    [first] = await repo.dequeue("w1", 1, 30_000)
    assert await repo.fail(Failure(t.id, first.attempt, "x", retry_delay_ms=0)) is FailOutcome.RETRIED
    [second] = await repo.dequeue("w2", 1, 30_000)
    assert second.attempt == first.attempt + 1
    # w1's late writes, with its old attempt, all bounce off the guard.
    assert await repo.complete([Completion(t.id, first.attempt, "stale")]) == []
    assert await repo.fail(Failure(t.id, first.attempt, "stale", retry_delay_ms=0)) is None
    assert await repo.release([Lease(t.id, first.attempt)]) == []
    assert await repo.heartbeat("w1", [Lease(t.id, first.attempt)], 30_000) == []
    # and w2's land.
    assert await repo.complete([Completion(t.id, second.attempt, "fresh")]) == [t.id]
    got = await repo.get(t.id)
    assert got is not None and got.status is TaskStatus.COMPLETED and got.result == "fresh"
    # Completing twice does not land twice.
    assert await repo.complete([Completion(t.id, second.attempt, "again")]) == []


async def test_reclaim_does_not_touch_a_renewed_lease(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    repo = qm.repository
    t = await qm.add_task("h", {})
    assert t is not None
    [held] = await repo.dequeue("w", 1, 200)
    await asyncio.sleep(0.25)
    expired = await repo.expired(10)
    assert [x.id for x in expired] == [t.id]
    assert await repo.heartbeat("w", [Lease(t.id, held.attempt)], 30_000) == [t.id]
    late = Failure(t.id, held.attempt, "lost", retry_delay_ms=0, outcome="lost", only_if_expired=True)
    assert await repo.fail(late) is None
    got = await repo.get(t.id)
    assert got is not None and got.status is TaskStatus.PROCESSING


# --- graceful stop -----------------------------------------------------------


async def test_stop_returns_unfinished_tasks_without_spending_an_attempt(
    make_qm: Callable[..., QueueManager],
) -> None:
    qm = make_qm()
    started = asyncio.Event()

    @qm.handler(max_retries=0)
    async def long(p: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(30)

    t = await qm.add_task("long", {})
    assert t is not None
    await qm.start_worker(1)
    await asyncio.wait_for(started.wait(), 10)
    await qm.stop_worker(grace=0.1)
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.PENDING
    assert got.retry_count == 0 and got.log[-1]["outcome"] == "released"


async def test_stop_lets_running_tasks_finish_within_grace(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm()
    started = asyncio.Event()

    @qm.handler()
    async def short(p: dict[str, Any]) -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "finished"

    t = await qm.add_task("short", {})
    assert t is not None
    await qm.start_worker(1)
    await asyncio.wait_for(started.wait(), 10)
    await qm.stop_worker(grace=5)
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.COMPLETED and got.result == "finished"


# --- payload rules -----------------------------------------------------------

BAD_PAYLOADS: list[tuple[str, Any]] = [
    ("nul in value", {"s": "a\x00b"}),
    ("nul in key", {"a\x00": 1}),
    ("nan", {"x": math.nan}),
    ("infinity", {"x": math.inf}),
    ("negative infinity", {"x": [-math.inf]}),
    ("set", {"x": {1, 2}}),
    ("bytes", {"x": b"raw"}),
    ("datetime", {"x": datetime.now(UTC)}),
    ("decimal", {"x": Decimal("1.5")}),
    ("object", {"x": object()}),
    ("int key", {1: "a"}),
    ("lone surrogate", {"x": "\ud800"}),
    ("oversize", {"x": "y" * 2_000_000}),
    ("not an object", [1, 2, 3]),
    ("string", "hello"),
]


@pytest.mark.parametrize(("label", "payload"), BAD_PAYLOADS, ids=[b[0] for b in BAD_PAYLOADS])
async def test_bad_payload_is_refused_and_nothing_stored(
    make_qm: Callable[..., QueueManager], label: str, payload: Any
) -> None:
    qm = make_qm(validate_handlers=False)
    with pytest.raises(PayloadError):
        await qm.add_task("h", payload)
    with pytest.raises(PayloadError):
        await qm.add_tasks([{"handler": "h", "payload": {"ok": 1}}, {"handler": "h", "payload": payload}])
    assert await qm.get_all_tasks() == []


async def test_payload_round_trips_exactly(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    payload = {
        "text": "héllo ✓ 日本 \U0001f600 \\ \" ' \n\t",
        "n": [0, -1, 2**53, 1.5, -0.25, True, False, None],
        "nested": {"a": {"b": {"c": []}}, "": "empty key"},
        "big": 10**30,
        "literal escape": "C:\\u0000\\data",  # the text backslash-u-0000, not a NUL
    }
    t = await qm.add_task("h", payload)
    assert t is not None
    got = await qm.get_task(t.id)
    assert got is not None and got.payload == payload
    assert t.payload == payload


async def test_schema_error_names_the_field(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm()

    @qm.handler()
    def thumbnail(p: Thumb) -> None:
        return None

    with pytest.raises(PayloadValidationError, match="width"):
        await qm.add_task("thumbnail", {"path": "a.png", "width": "wide"})
    assert await qm.get_all_tasks() == []
    t = await qm.add_task("thumbnail", Thumb(path="a.png", width=10))
    assert t is not None and t.payload == {"path": "a.png", "width": 10}


async def test_skip_on_payload_error_warns_and_stores_nothing(
    make_qm: Callable[..., QueueManager], caplog: pytest.LogCaptureFixture
) -> None:
    qm = make_qm()

    class P(BaseModel):
        n: int

    qm.register("h", lambda p: None, schema=P, skip_on_payload_error=True)
    assert await qm.add_task("h", {"n": "x"}) is None
    assert "skipped a task" in caplog.text
    assert await qm.get_all_tasks() == []


async def test_error_text_is_sanitised(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm()

    class Nasty(Exception):
        def __str__(self) -> str:
            return "bad\x00byte \ud800 " + "x" * 20_000

    @qm.handler(max_retries=0)
    def nasty(p: dict[str, Any]) -> None:
        raise Nasty()

    t = await qm.add_task("nasty", {})
    assert t is not None
    await qm.start_worker(1)
    await settle(qm)
    await qm.stop_worker()
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.FAILED
    err = got.log[-1]["error"]
    assert "\x00" not in err and len(err) <= 4000 and err.startswith("Nasty: bad")


async def test_non_json_result_fails_the_attempt_clearly(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm()

    @qm.handler(max_retries=0)
    def gives_set(p: dict[str, Any]) -> Any:
        return {1, 2}

    t = await qm.add_task("gives_set", {})
    assert t is not None
    await qm.start_worker(1)
    await settle(qm)
    await qm.stop_worker()
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.FAILED
    assert "handler result is not JSON" in got.log[-1]["error"]


# --- unknown handler ---------------------------------------------------------


async def test_unknown_handler_fails_once_with_a_clear_log(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    qm.register("known", lambda p: None)
    t = await qm.add_task("nobody", {}, max_retries=5)
    assert t is not None
    await qm.start_worker(1)
    await settle(qm)
    await qm.stop_worker()
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.FAILED
    assert len(got.log) == 1 and got.log[0]["outcome"] == "unknown_handler"
    assert "'nobody'" in got.log[0]["error"]


async def test_adding_for_an_unregistered_handler_is_refused(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm()
    with pytest.raises(UnknownHandlerError, match="nope"):
        await qm.add_task("nope", {})
    assert await qm.get_all_tasks() == []


# --- identity, inspection, removal -------------------------------------------


async def test_duplicate_id_is_refused_and_nothing_changes(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    await qm.add_task("h", {"v": 1}, id="job-1")
    with pytest.raises(DuplicateTaskError, match="job-1"):
        await qm.add_task("h", {"v": 2}, id="job-1")
    with pytest.raises(DuplicateTaskError):
        await qm.add_tasks([{"handler": "h", "id": "x"}, {"handler": "h", "id": "x"}])
    with pytest.raises(DuplicateTaskError):
        await qm.add_tasks([{"handler": "h", "id": "y"}, {"handler": "h", "id": "job-1"}])
    tasks = await qm.get_all_tasks()
    assert [(t.id, t.payload) for t in tasks] == [("job-1", {"v": 1})]


async def test_inspection_update_remove_and_stats(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    a = await qm.add_task("h", {"n": 1}, tenant="acme")
    b = await qm.add_task("h", {"n": 2})
    c = await qm.add_task("h", {"n": 3})
    assert a is not None and b is not None and c is not None
    assert a.extra == {"tenant": "acme"}
    assert await qm.get_task("missing") is None
    updated = await qm.update_task(b.id, priority=9, payload={"n": 20})
    assert updated.priority == 9 and updated.payload == {"n": 20}
    [first] = await qm.repository.dequeue("w", 1, 30_000)
    assert first.id == b.id
    removed: list[TaskEvent] = []
    qm.on("task_removed", removed.append)
    assert await qm.remove_task(a.id) is True
    assert (await qm.get_task(a.id)).status is TaskStatus.DELETED  # type: ignore[union-attr]
    assert await qm.remove_task(c.id, hard=True) is True
    assert await qm.get_task(c.id) is None
    assert await qm.remove_task("missing") is False
    assert [e.task_id for e in removed] == [a.id, c.id]
    st = await qm.stats()
    assert st.counts == {"pending": 0, "processing": 1, "completed": 0, "failed": 0, "deleted": 1}
    assert [t.id for t in await qm.get_all_tasks("deleted")] == [a.id]
    assert [t.id for t in await qm.get_all_tasks(TaskStatus.PROCESSING)] == [b.id]


async def test_failed_task_can_be_retried_by_update(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    t = await qm.add_task("h", {}, max_retries=0)
    assert t is not None
    [held] = await qm.repository.dequeue("w", 1, 30_000)
    assert await qm.repository.fail(Failure(t.id, held.attempt, "x", 0)) is FailOutcome.FAILED
    again = await qm.update_task(t.id, status="pending")
    assert again.status is TaskStatus.PENDING and again.retry_count == 0
    assert [x.id for x in await qm.repository.dequeue("w", 1, 30_000)] == [t.id]


async def test_stats_report_oldest_pending_age(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    st = await qm.stats()
    assert st.oldest_pending_age_s is None
    await qm.add_task("h", {})
    await qm.add_task("h", {}, delay=3600)
    await asyncio.sleep(0.2)
    st = await qm.stats()
    assert st.counts["pending"] == 2
    assert st.oldest_pending_age_s is not None and 0.1 < st.oldest_pending_age_s < 30


async def test_purge_removes_only_old_finished_tasks(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    done = await qm.add_tasks([{"handler": "h"} for _ in range(5)])
    keep = await qm.add_task("h", {})
    taken = await qm.repository.dequeue("w", 5, 30_000)
    assert {t.id for t in taken} == {t.id for t in done}
    await qm.repository.complete([Completion(t.id, t.attempt) for t in taken])
    purged: list[TaskEvent] = []
    qm.on("tasks_purged", purged.append)
    assert await qm.purge(older_than=timedelta(hours=1)) == 0
    await asyncio.sleep(0.05)
    assert await qm.purge(older_than=0, batch_size=2) == 5
    assert keep is not None and [t.id for t in await qm.get_all_tasks()] == [keep.id]
    assert [e.count for e in purged] == [0, 5]


async def test_events_follow_a_task_through_its_life(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm()
    seen: list[str] = []
    for name in ("task_added", "task_started", "task_completed", "task_failed", "task_retried"):
        qm.on(name, lambda e: seen.append(e.name))

    @qm.handler()
    async def once(p: dict[str, Any]) -> None:
        return None

    t = await qm.add_task("once", {})
    assert t is not None
    await qm.start_worker(1)
    await settle(qm)
    await qm.stop_worker()
    assert seen == ["task_added", "task_started", "task_completed"]


# --- concurrency within one process ------------------------------------------


async def test_concurrent_dequeuers_never_share_a_task(make_qm: Callable[..., QueueManager], backend_name: str) -> None:
    qm = make_qm(validate_handlers=False)
    await qm.add_tasks([{"handler": "h", "payload": {"i": i}} for i in range(300)])

    async def drain(worker: str) -> list[str]:
        got: list[str] = []
        while True:
            batch = await qm.repository.dequeue(worker, 7, 30_000)
            if not batch:
                return got
            got += [t.id for t in batch]

    results = await asyncio.gather(*(drain(f"w{i}") for i in range(5)))
    ids = [i for r in results for i in r]
    assert len(ids) == 300 and len(set(ids)) == 300


async def test_sync_facade_adds_and_reads(store_factory: StoreFactory) -> None:
    qm = QueueManager(store_factory(), validate_handlers=False)

    def from_a_view() -> tuple[Task | None, Any]:
        t = qm.sync.add_task("h", {"from": "flask"})
        return t, qm.sync.stats()

    t, st = await asyncio.to_thread(from_a_view)
    assert t is not None and st.counts["pending"] == 1
    got = await asyncio.to_thread(qm.sync.get_task, t.id)
    assert got is not None and got.payload == {"from": "flask"}
    await asyncio.to_thread(qm.sync.close)


async def test_worker_prunes_finished_tasks_past_retention(store_factory: StoreFactory) -> None:
    qm = QueueManager(store_factory(), retention=0, prune_interval=0.05, **FAST)  # type: ignore[arg-type]
    qm.register("h", lambda p: None)
    pending = await qm.add_task("h", {}, delay=3600)
    await qm.add_tasks([{"handler": "h"} for _ in range(5)])
    await qm.start_worker(2)
    try:
        for _ in range(200):
            if [t.id for t in await qm.get_all_tasks()] == [pending.id]:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        assert [t.id for t in await qm.get_all_tasks()] == [pending.id]  # type: ignore[union-attr]
    finally:
        await qm.close()


async def test_producer_without_the_handler_leaves_its_settings_to_the_worker(store_factory: StoreFactory) -> None:
    from kubeque.backends import make_repository

    repo = make_repository(store_factory())
    producer = QueueManager(repo, validate_handlers=False, **FAST)  # type: ignore[arg-type]
    worker = QueueManager(repo, **FAST)  # type: ignore[arg-type]
    runs: dict[str, int] = {}

    @worker.handler(max_retries=1, max_processing_time=200)
    async def flaky(p: dict[str, Any]) -> None:
        runs[p["n"]] = runs.get(p["n"], 0) + 1
        if p.get("hang"):
            await asyncio.sleep(30)
        raise RuntimeError("always")

    plain = await producer.add_task("flaky", {"n": "plain"})
    hangs = await producer.add_task("flaky", {"n": "hang", "hang": True})
    explicit = await producer.add_task("flaky", {"n": "explicit"}, max_retries=0)
    assert plain is not None and hangs is not None and explicit is not None
    assert plain.max_retries is None and plain.max_processing_time is None
    assert explicit.max_retries == 0
    await worker.start_worker(3)
    try:
        await settle(worker)
    finally:
        await worker.close()
    assert runs == {"plain": 2, "hang": 2, "explicit": 1}
    await repo.open()  # closed with the worker's manager
    try:
        got = await repo.get(hangs.id)
        assert got is not None and [e["outcome"] for e in got.log] == ["timeout", "timeout"]
        assert "200 ms" in got.log[0]["error"]
    finally:
        await repo.close()


async def test_removing_a_running_task_stops_its_handler(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(lease_ms=300)
    started, cancelled = asyncio.Event(), asyncio.Event()

    @qm.handler()
    async def long(p: dict[str, Any]) -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "should not finish"

    t = await qm.add_task("long", {})
    assert t is not None
    await qm.start_worker(1)
    await asyncio.wait_for(started.wait(), 10)
    assert await qm.remove_task(t.id) is True
    await asyncio.wait_for(cancelled.wait(), 5)  # noticed at the next lease renewal
    await qm.stop_worker()
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.DELETED and got.result is None


async def test_depth_counts_live_work_only(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    assert (await qm.depth()).pending == 0 and (await qm.depth()).oldest_pending_age_s is None
    added = await qm.add_tasks([{"handler": "h"} for _ in range(4)])
    await qm.add_task("h", {}, delay=3600)
    taken = await qm.repository.dequeue("w", 2, 30_000)
    await qm.repository.complete([Completion(taken[0].id, taken[0].attempt)])
    await asyncio.sleep(0.05)
    d = await qm.depth()
    assert (d.pending, d.processing) == (3, 1) and len(added) == 4
    assert d.oldest_pending_age_s is not None and d.oldest_pending_age_s > 0


async def test_large_floats_come_back_as_the_same_integers_everywhere(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    t = await qm.add_task("h", {"a": 1e16, "b": -2.5e300, "c": 1234.5}, tags=("x", "y"))
    assert t is not None
    got = await qm.get_task(t.id)
    assert got is not None
    assert got.payload == t.payload == {"a": 10**16, "b": int(-2.5e300), "c": 1234.5}
    assert [type(got.payload[k]) for k in "abc"] == [int, int, float]
    assert got.extra == t.extra == {"tags": ["x", "y"]}


BAD_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("max_retries too large", {"max_retries": 2**31}),
    ("delay of a timestamp", {"delay": 1e12}),
    ("delay infinite", {"delay": math.inf}),
    ("max_processing_time too large", {"max_processing_time": 10**15}),
    ("retry_backoff_ms nan", {"retry_backoff_ms": math.nan}),
]


@pytest.mark.parametrize(("label", "options"), BAD_OPTIONS, ids=[b[0] for b in BAD_OPTIONS])
async def test_out_of_range_options_are_refused_and_nothing_stored(
    make_qm: Callable[..., QueueManager], label: str, options: dict[str, Any]
) -> None:
    qm = make_qm(validate_handlers=False)
    with pytest.raises(ConfigError):
        await qm.add_task("h", {}, **options)
    assert await qm.get_all_tasks() == []


@pytest.mark.parametrize("payload", [[], "", 0, False], ids=["empty list", "empty string", "zero", "false"])
async def test_add_tasks_refuses_falsy_non_object_payloads(make_qm: Callable[..., QueueManager], payload: Any) -> None:
    qm = make_qm(validate_handlers=False)
    with pytest.raises(PayloadError):
        await qm.add_tasks([{"handler": "h", "payload": payload}])
    assert await qm.get_all_tasks() == []


async def test_removing_a_running_task_closes_its_attempt_in_the_log(make_qm: Callable[..., QueueManager]) -> None:
    qm = make_qm(validate_handlers=False)
    t = await qm.add_task("h", {})
    assert t is not None
    await qm.repository.dequeue("w", 1, 30_000)
    await qm.remove_task(t.id)
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.DELETED
    assert [(e["attempt"], e.get("outcome")) for e in got.log] == [(1, "removed")]
    assert "ended_at" in got.log[0]

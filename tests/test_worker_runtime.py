"""Worker runtime faults found in review: each test names the fault it pins down."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from typing import Any

from kubeque import QueueManager, Task, TaskStatus
from kubeque.backends.memory import MemoryRepository
from kubeque.errors import BackendError
from kubeque.task import Completion


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def outcomes(task: Task | None) -> list[tuple[int, Any]]:
    assert task is not None
    return [(e["attempt"], e.get("outcome")) for e in task.log]


async def test_a_second_attempt_of_a_task_still_running_here_is_tracked_separately() -> None:
    qm = QueueManager(lease_ms=300, poll_interval=0.05)
    gates = {1: asyncio.Event(), 2: asyncio.Event()}
    started: list[int] = []

    @qm.handler()
    async def job(p: dict[str, Any], task: Task) -> int:
        started.append(task.attempt)
        await gates[task.attempt].wait()
        return task.attempt

    worker = await qm.start_worker(2)
    await qm.add_task("job", {}, id="T")
    await wait_until(lambda: _true(started == [1]))
    await qm.remove_task("T")
    await qm.update_task("T", status="pending")  # retried while attempt 1 still runs here
    await wait_until(lambda: _true(started == [1, 2]))
    assert worker.in_flight == 2
    # Attempt 1 lost its lease: it is stopped at the next renewal, attempt 2 keeps its slot.
    await wait_until(lambda: _true(worker.in_flight == 1))
    gates[2].set()
    await wait_until(lambda: _status(qm, "T", TaskStatus.COMPLETED))
    got = await qm.get_task("T")
    assert got is not None and got.result == 2 and got.attempt == 2
    await qm.close()


class SlowCompletes(MemoryRepository):
    async def complete(self, done: Sequence[Completion]) -> list[str]:
        await asyncio.sleep(0.5)  # a completion round trip under load
        return await super().complete(done)


async def test_shutdown_lets_a_result_being_written_land_instead_of_releasing_it() -> None:
    qm = QueueManager(SlowCompletes(), poll_interval=0.05)
    runs: list[int] = []

    @qm.handler()
    async def charge(p: dict[str, Any]) -> dict[str, bool]:
        runs.append(1)
        await asyncio.sleep(0.1)
        return {"charged": True}

    await qm.start_worker(1)
    await qm.add_task("charge", {}, id="T")
    await asyncio.sleep(0.05)
    await qm.stop_worker(grace=0.2)  # the handler returns at 0.1 s; its write takes 0.5 s
    got = await qm.get_task("T")
    assert got is not None and got.status is TaskStatus.COMPLETED and got.result == {"charged": True}
    assert runs == [1]


class RefusesOne(MemoryRepository):
    async def complete(self, done: Sequence[Completion]) -> list[str]:
        if any(c.id == "bad" for c in done):
            raise BackendError("value too long for type character varying(1000)")
        return await super().complete(done)


async def test_one_result_the_store_refuses_does_not_hold_back_the_others() -> None:
    qm = QueueManager(RefusesOne(), lease_ms=1000, max_retries=0, poll_interval=0.05)

    @qm.handler()
    async def job(p: dict[str, Any]) -> str:
        return "x"

    worker = await qm.start_worker(4)
    await qm.add_tasks([{"handler": "job", "id": i} for i in ("bad", "good0", "good1", "good2")])
    await wait_until(lambda: _settled(qm))
    assert worker.dead_loop is None
    statuses = {t.id: t.status for t in await qm.get_all_tasks()}
    assert statuses == {
        "bad": TaskStatus.FAILED,
        "good0": TaskStatus.COMPLETED,
        "good1": TaskStatus.COMPLETED,
        "good2": TaskStatus.COMPLETED,
    }
    bad = await qm.get_task("bad")
    assert bad is not None and "refused the result" in bad.log[-1]["error"]
    await qm.close()


async def test_sync_handlers_past_their_deadline_keep_their_slot_so_later_tasks_still_run() -> None:
    qm = QueueManager(max_retries=0, poll_interval=0.05)
    release = threading.Event()
    ran: list[int] = []

    @qm.handler(max_processing_time=100)
    def hang(p: dict[str, Any]) -> None:
        release.wait(10)  # a network call without its own timeout

    @qm.handler(max_processing_time=300)
    def quick(p: dict[str, Any]) -> str:
        ran.append(p["n"])
        return "ok"

    worker = await qm.start_worker(2)
    try:
        await qm.add_tasks([{"handler": "hang"} for _ in range(6)])
        await wait_until(lambda: _true(worker.free_slots == 0), timeout=5)
        await qm.add_tasks([{"handler": "quick", "payload": {"n": n}} for n in range(3)])
        await asyncio.sleep(0.6)  # longer than quick's deadline
        assert ran == []  # both slots are held by threads that cannot be stopped
        release.set()
        await wait_until(lambda: _settled(qm))
        quick_tasks = [t for t in await qm.get_all_tasks() if t.handler == "quick"]
        assert sorted(ran) == [0, 1, 2]
        assert all(t.status is TaskStatus.COMPLETED for t in quick_tasks)
    finally:
        release.set()
        await qm.close()


async def test_cancelled_error_raised_by_a_handler_fails_the_attempt() -> None:
    qm = QueueManager(lease_ms=5000, max_retries=0, poll_interval=0.05)

    @qm.handler()
    async def fetch(p: dict[str, Any]) -> None:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner  # a library's inner cancel scope leaking out

    worker = await qm.start_worker(1)
    t = await qm.add_task("fetch", {})
    assert t is not None
    await wait_until(lambda: _status(qm, t.id, TaskStatus.FAILED), timeout=3)
    got = await qm.get_task(t.id)
    assert outcomes(got) == [(1, "error")] and "CancelledError" in got.log[-1]["error"]  # type: ignore[union-attr]
    assert worker.running
    await qm.close()


async def _true(value: bool) -> bool:
    return value


async def _status(qm: QueueManager, task_id: str, status: TaskStatus) -> bool:
    t = await qm.get_task(task_id)
    return t is not None and t.status is status


async def _settled(qm: QueueManager) -> bool:
    st = await qm.stats()
    return st.counts["pending"] == 0 and st.counts["processing"] == 0


class BrieflyAway(MemoryRepository):
    """A store that is unreachable (every call fails) for a moment."""

    def __init__(self) -> None:
        super().__init__()
        self.away_until = 0.0

    def _check(self) -> None:
        if asyncio.get_running_loop().time() < self.away_until:
            raise BackendError("store unreachable")

    async def complete(self, done: Sequence[Completion]) -> list[str]:
        self._check()
        return await super().complete(done)

    async def depth(self) -> Any:
        self._check()
        return await super().depth()


async def test_a_store_briefly_away_does_not_turn_a_success_into_a_failure() -> None:
    store = BrieflyAway()
    qm = QueueManager(store, max_retries=0, poll_interval=0.05)
    runs: list[int] = []

    @qm.handler()
    async def job(p: dict[str, Any]) -> str:
        runs.append(1)
        store.away_until = asyncio.get_running_loop().time() + 0.4
        return "done"

    await qm.start_worker(1)
    t = await qm.add_task("job", {})
    assert t is not None
    await wait_until(lambda: _status(qm, t.id, TaskStatus.COMPLETED))
    assert runs == [1]
    await qm.close()


class BusyTwice(MemoryRepository):
    """Up, but the first two writes of a result fail (a lock timeout, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 2

    async def complete(self, done: Sequence[Completion]) -> list[str]:
        if self.failures:
            self.failures -= 1
            raise BackendError("canceling statement due to lock timeout")
        return await super().complete(done)


async def test_a_write_that_fails_while_the_store_answers_is_retried_before_it_is_refused() -> None:
    qm = QueueManager(BusyTwice(), max_retries=0, poll_interval=0.05)

    @qm.handler()
    async def job(p: dict[str, Any]) -> str:
        return "done"

    await qm.start_worker(1)
    t = await qm.add_task("job", {})
    assert t is not None
    await wait_until(lambda: _status(qm, t.id, TaskStatus.COMPLETED))
    await qm.close()


class AlwaysAway(MemoryRepository):
    async def complete(self, done: Sequence[Completion]) -> list[str]:
        raise BackendError("store unreachable")

    async def now(self) -> Any:
        raise BackendError("store unreachable")

    async def depth(self) -> Any:
        raise BackendError("store unreachable")


async def test_shutdown_with_the_store_away_ends_within_one_deadline() -> None:
    qm = QueueManager(AlwaysAway(), poll_interval=0.05)

    @qm.handler()
    async def job(p: dict[str, Any]) -> str:
        return "done"

    worker = await qm.start_worker(4)
    worker._completions.give_up_after = 1.0
    await qm.add_tasks([{"handler": "job"} for _ in range(6)])
    await wait_until(lambda: _true(worker.counters.started >= 4))  # four results wait on the store
    await asyncio.wait_for(qm.stop_worker(grace=0.1), 6)  # one 1 s deadline, not one per result


async def test_shutdown_does_not_wait_for_a_handler_that_ignores_cancellation() -> None:
    qm = QueueManager(poll_interval=0.05)
    started, test_over = asyncio.Event(), asyncio.Event()

    @qm.handler()
    async def stubborn(p: dict[str, Any]) -> None:
        started.set()
        while not test_over.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # swallows every cancel
                await asyncio.sleep(0.05)

    worker = await qm.start_worker(1)
    worker._completions.give_up_after = 0.5
    t = await qm.add_task("stubborn", {})
    assert t is not None
    await asyncio.wait_for(started.wait(), 5)
    try:
        await asyncio.wait_for(qm.stop_worker(grace=0.1), 6)
        got = await qm.get_task(t.id)
        assert got is not None and got.status is TaskStatus.PENDING and outcomes(got) == [(1, "released")]
    finally:
        test_over.set()


async def test_two_attempts_of_one_task_never_share_a_completion_batch() -> None:
    from kubeque.task import Failure, NewTask
    from kubeque.worker.completions import CompletionBatcher

    repo = MemoryRepository()
    await repo.add([NewTask(handler="h", payload={}, id="T", max_retries=3)])
    [first] = await repo.dequeue("w", 1, 30_000)
    await repo.fail(Failure("T", first.attempt, "x", retry_delay_ms=0))
    [second] = await repo.dequeue("w", 1, 30_000)
    import logging

    batcher = CompletionBatcher(repo, logging.getLogger("test"))
    stale = asyncio.ensure_future(batcher.complete(Completion("T", first.attempt, "stale")))
    fresh = asyncio.ensure_future(batcher.complete(Completion("T", second.attempt, "fresh")))
    await asyncio.sleep(0)
    batcher.start()
    assert (await stale, await fresh) == (False, True)
    await batcher.close()


async def test_a_handlers_own_timeout_error_is_an_error_not_a_deadline() -> None:
    qm = QueueManager(max_retries=0, poll_interval=0.05)

    @qm.handler()
    async def fetch_async(p: dict[str, Any]) -> None:
        await asyncio.wait_for(asyncio.sleep(10), 0.01)

    @qm.handler()
    def fetch_sync(p: dict[str, Any]) -> None:
        raise TimeoutError("socket timed out")

    stuck: list[Any] = []
    qm.on("task_stuck", stuck.append)
    worker = await qm.start_worker(2)
    added = await qm.add_tasks([{"handler": "fetch_async"}, {"handler": "fetch_sync"}])
    await wait_until(lambda: _settled(qm))
    for t in added:
        got = await qm.get_task(t.id)
        assert outcomes(got) == [(1, "error")] and "TimeoutError" in got.log[-1]["error"]  # type: ignore[union-attr]
    assert stuck == [] and worker.counters.timed_out == 0
    await qm.close()


async def test_no_stuck_event_for_a_timeout_whose_attempt_was_already_taken_away() -> None:
    qm = QueueManager(max_retries=0, lease_ms=30_000, poll_interval=0.05)
    started = asyncio.Event()

    @qm.handler(max_processing_time=300)
    async def slow(p: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(5)

    stuck: list[Any] = []
    qm.on("task_stuck", stuck.append)
    worker = await qm.start_worker(1)
    t = await qm.add_task("slow", {})
    assert t is not None
    await asyncio.wait_for(started.wait(), 5)
    from kubeque.task import Failure

    # Another worker's reclaimer fails this attempt before the deadline here.
    await qm.repository.fail(Failure(t.id, 1, "lost", retry_delay_ms=0, outcome="lost"))
    await asyncio.sleep(0.5)
    assert stuck == [] and worker.counters.timed_out == 0
    await qm.close()


class SlowFail(MemoryRepository):
    async def fail(self, failure: Any) -> Any:
        await asyncio.sleep(0.3)
        return await super().fail(failure)


async def test_a_stuck_thread_takes_one_slot_not_two() -> None:
    qm = QueueManager(SlowFail(), max_retries=0, poll_interval=0.05)
    release = threading.Event()

    @qm.handler(max_processing_time=100)
    def hang(p: dict[str, Any]) -> None:
        release.wait(5)

    worker = await qm.start_worker(1)
    try:
        await qm.add_task("hang", {})
        seen: list[int] = []
        for _ in range(40):
            seen.append(worker.free_slots)
            await asyncio.sleep(0.02)
        assert min(seen) == 0
    finally:
        release.set()
        await qm.close()


async def test_a_handler_that_turns_cancellation_into_an_error_is_still_released() -> None:
    qm = QueueManager(poll_interval=0.05)
    started = asyncio.Event()

    class UploadAborted(Exception):
        pass

    @qm.handler()
    async def upload(p: dict[str, Any]) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise UploadAborted("cancelled mid-upload") from None

    await qm.start_worker(1)
    t = await qm.add_task("upload", {})
    assert t is not None
    await asyncio.wait_for(started.wait(), 5)
    await qm.stop_worker(grace=0.1)
    got = await qm.get_task(t.id)
    assert got is not None and got.status is TaskStatus.PENDING and got.retry_count == 0
    assert outcomes(got) == [(1, "released")]
    await qm.close()

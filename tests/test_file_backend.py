"""The file backend: one JSON file, safe between processes and across crashes."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from filelock import FileLock

from kubeque.backends import make_repository
from kubeque.backends.file import FileRepository
from kubeque.errors import BackendError, DuplicateTaskError
from kubeque.task import Completion, FailOutcome, Failure, Lease, NewTask, TaskStatus

SPAWN = multiprocessing.get_context("spawn")


def new(n: int, prefix: str = "t") -> list[NewTask]:
    return [NewTask(handler="h", payload={"n": i}, id=f"{prefix}{i}") for i in range(n)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "tasks.json"


# --- child-process bodies (module level so spawn can import them) ----------------


def _take_all(path: str, worker: str, batch: int) -> list[tuple[str, int]]:
    """Dequeue and complete until the queue is empty; return what this process took."""

    async def run() -> list[tuple[str, int]]:
        repo = FileRepository(path)
        taken: list[tuple[str, int]] = []
        while True:
            got = await repo.dequeue(worker, batch, 600_000)
            if not got:
                return taken
            taken.extend((t.id, t.attempt) for t in got)
            await repo.complete([Completion(t.id, t.attempt) for t in got])

    return asyncio.run(run())


def _add_and_take(path: str, worker: str, n: int, batch: int) -> tuple[list[str], list[str]]:
    """Add n tasks in batches, dequeuing a batch after each add; return (added, taken)."""

    async def run() -> tuple[list[str], list[str]]:
        repo = FileRepository(path)
        added: list[str] = []
        taken: list[str] = []
        for start in range(0, n, batch):
            tasks = [NewTask(handler="h", payload={"i": i}, id=f"{worker}-{i}") for i in range(start, start + batch)]
            added.extend(t.id for t in await repo.add(tasks))
            taken.extend(t.id for t in await repo.dequeue(worker, batch, 600_000))
        return added, taken

    return asyncio.run(run())


def _add_forever(path: str) -> None:
    async def run() -> None:
        repo = FileRepository(path)
        i = 0
        while True:
            await repo.add([NewTask(handler="h", payload={"pad": "x" * 500}, id=f"k{i + j}") for j in range(20)])
            i += 20

    asyncio.run(run())


# --- basics -------------------------------------------------------------------


async def test_round_trip_keeps_every_field(path: Path) -> None:
    repo = FileRepository(path)
    await repo.open()
    [added] = await repo.add(
        [NewTask(handler="email", payload={"to": "a@b.c", "n": [1, 2.5, None]}, id="x", priority=3, extra={"k": 1})]
    )
    got = await repo.get("x")
    assert got == added
    assert got is not None and got.payload == {"to": "a@b.c", "n": [1, 2.5, None]}
    [taken] = await repo.dequeue("w1", 10, 30_000)
    assert (taken.status, taken.attempt, taken.worker) == (TaskStatus.PROCESSING, 1, "w1")
    assert await repo.complete([Completion("x", 1, result={"ok": True})]) == ["x"]
    done = await FileRepository(path).get("x")
    assert done is not None
    assert (done.status, done.result, done.worker) == (TaskStatus.COMPLETED, {"ok": True}, None)
    assert done.log[-1]["outcome"] == "completed"


async def test_store_format_is_versioned_json_of_task_dicts(path: Path) -> None:
    repo = FileRepository(path)
    added = await repo.add(new(3))
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert doc["next_seq"] == 4
    assert doc["tasks"] == [t.to_json_dict() for t in added]


async def test_tasks_persist_across_instances(path: Path) -> None:
    first = FileRepository(path)
    await first.add(new(3))
    await first.close()
    second = FileRepository(path)
    assert [t.id for t in await second.list()] == ["t0", "t1", "t2"]
    [taken] = await second.dequeue("w", 1, 30_000)
    # The first instance sees the second one's change although it cached the file.
    got = await first.get(taken.id)
    assert got is not None and got.status is TaskStatus.PROCESSING
    assert [t.seq for t in await first.add(new(1, prefix="u"))] == [4]


async def test_dequeue_order_priority_then_run_at_then_insertion(path: Path) -> None:
    repo = FileRepository(path)
    await repo.add([NewTask(handler="h", payload={}, id=i, priority=p) for i, p in [("a", 0), ("b", 5), ("c", 0)]])
    await repo.add([NewTask(handler="h", payload={}, id="d", priority=5)])
    assert [t.id for t in await repo.dequeue("w", 10, 30_000)] == ["b", "d", "a", "c"]


async def test_state_changes_are_guarded_by_attempt(path: Path) -> None:
    repo = FileRepository(path)
    await repo.add([NewTask(handler="h", payload={}, id="x", max_retries=1)])
    [t] = await repo.dequeue("w", 1, 30_000)
    assert await repo.fail(Failure("x", t.attempt, "boom", retry_delay_ms=0)) is FailOutcome.RETRIED
    # The first attempt is over: its late writes do not land.
    assert await repo.complete([Completion("x", t.attempt)]) == []
    [t2] = await repo.dequeue("w", 1, 30_000)
    assert t2.attempt == 2
    assert await repo.heartbeat("w", [Lease("x", 1)], 30_000) == []
    assert await repo.heartbeat("w", [Lease("x", 2)], 30_000) == ["x"]
    assert await repo.fail(Failure("x", 2, "boom", retry_delay_ms=0)) is FailOutcome.FAILED
    assert await repo.release([Lease("x", 2)]) == []


async def test_add_rejects_duplicates_and_stores_nothing(path: Path) -> None:
    repo = FileRepository(path)
    await repo.add(new(1))
    with pytest.raises(DuplicateTaskError):
        await repo.add([NewTask(handler="h", payload={}, id="new"), NewTask(handler="h", payload={}, id="t0")])
    with pytest.raises(DuplicateTaskError):
        await repo.add([NewTask(handler="h", payload={}, id="y"), NewTask(handler="h", payload={}, id="y")])
    assert [t.id for t in await FileRepository(path).list()] == ["t0"]


async def test_add_refuses_a_connection(path: Path) -> None:
    with pytest.raises(TypeError, match="postgres"):
        await FileRepository(path).add(new(1), connection=object())


async def test_remove_update_purge_and_stats(path: Path) -> None:
    repo = FileRepository(path)
    await repo.add(new(3))
    assert await repo.remove("t0", hard=False)
    assert await repo.remove("t1", hard=True)
    assert not await repo.remove("nope", hard=True)
    updated = await repo.update("t2", {"priority": 9})
    assert updated.priority == 9
    stats = await FileRepository(path).stats()
    assert stats.counts["pending"] == 1 and stats.counts["deleted"] == 1
    assert await repo.purge(0, [TaskStatus.DELETED], 10) == 1
    assert [t.id for t in await FileRepository(path).list()] == ["t2"]


async def test_make_repository_builds_a_file_backend(path: Path) -> None:
    repo = make_repository({"type": "file", "path": str(path)})
    assert isinstance(repo, FileRepository)
    assert repo.multi_process is True


async def test_reads_a_hand_formatted_file(path: Path) -> None:
    added = await FileRepository(path).add(new(2))
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(doc, indent=2))
    repo = FileRepository(path)
    assert [t.id for t in await repo.list()] == [t.id for t in added]
    [t] = await repo.dequeue("w", 1, 30_000)
    assert t.id == "t0"


# --- corrupt files ---------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"not json at all",
        b"",
        b"[]",
        b'{"tasks": []}',
        b'{"version": 2, "next_seq": 1, "tasks": []}',
        b'{"version": 1, "next_seq": 1, "tasks": [{"id": "x"}]}',
    ],
    ids=["garbage", "empty", "list", "no-version", "future-version", "malformed-task"],
)
async def test_a_file_that_is_not_a_task_file_raises_and_is_left_alone(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    repo = FileRepository(path)
    with pytest.raises(BackendError, match=re.escape(str(path))):
        await repo.open()
    with pytest.raises(BackendError, match="not a valid kubeque task file"):
        await repo.add(new(1))
    assert path.read_bytes() == content


async def test_a_task_with_a_bad_status_names_the_task_and_field(path: Path) -> None:
    await FileRepository(path).add(new(1))
    path.write_text(path.read_text().replace('"status":"pending"', '"status":"sleeping"'))
    with pytest.raises(BackendError, match=r"'t0'.*'status'"):
        await FileRepository(path).list()


async def test_missing_directory_is_created(tmp_path: Path) -> None:
    repo = FileRepository(tmp_path / "a" / "b" / "tasks.json")
    await repo.add(new(1))
    assert (tmp_path / "a" / "b" / "tasks.json").is_file()


async def test_unusable_location_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a directory")
    with pytest.raises(BackendError, match="plain"):
        await FileRepository(tmp_path / "plain" / "tasks.json").open()


async def test_lock_held_too_long_is_a_clear_error(path: Path) -> None:
    with FileLock(f"{path}.lock"), pytest.raises(BackendError, match="could not lock"):
        await FileRepository(path, lock_timeout=0.1).list()


# --- crashes -------------------------------------------------------------------


async def test_crash_before_replace_leaves_previous_file_whole(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = FileRepository(path)
    await repo.add(new(5))
    before = path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(BackendError, match="simulated crash"):
        await repo.add(new(5, prefix="lost"))
    with pytest.raises(BackendError):
        await repo.dequeue("w", 5, 30_000)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    # Both a new instance and the one that failed see exactly the old tasks.
    assert [t.id for t in await FileRepository(path).list()] == [f"t{i}" for i in range(5)]
    assert [t.id for t in await repo.list(TaskStatus.PENDING)] == [f"t{i}" for i in range(5)]


async def test_killed_writer_leaves_a_loadable_file(tmp_path: Path) -> None:
    for n, delay in enumerate((0.7, 1.0)):
        path = tmp_path / f"killed{n}.json"
        await FileRepository(path).open()
        empty_size = path.stat().st_size
        child = SPAWN.Process(target=_add_forever, args=(str(path),))
        child.start()
        try:
            deadline = time.monotonic() + 30
            # Wait until the child is writing, then kill it at an arbitrary moment.
            while path.stat().st_size == empty_size and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(delay)
        finally:
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        repo = FileRepository(path)
        await repo.open()  # also removes a temp file the killed writer may have left
        tasks = await repo.list()
        assert len(tasks) > 0 and len(tasks) % 20 == 0  # whole add() calls only
        assert [t.seq for t in tasks] == list(range(1, len(tasks) + 1))
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- wakeups -------------------------------------------------------------------


async def test_wait_for_work_returns_when_another_writer_changes_the_file(path: Path) -> None:
    waiter = FileRepository(path, poll_interval=0.02)
    await waiter.open()
    await waiter.dequeue("w", 1, 1000)  # look at the queue, as a worker does before waiting

    async def add_later() -> None:
        await asyncio.sleep(0.2)
        await FileRepository(path).add(new(1))

    start = time.monotonic()
    await asyncio.gather(waiter.wait_for_work(10), add_later())
    assert time.monotonic() - start < 2


async def test_wait_for_work_sleeps_until_timeout_when_nothing_changes(path: Path) -> None:
    repo = FileRepository(path)
    await repo.open()
    await repo.dequeue("w", 1, 1000)
    start = time.monotonic()
    await repo.wait_for_work(0.3)
    assert 0.25 < time.monotonic() - start < 2


# --- several processes ------------------------------------------------------------


@pytest.mark.slow
async def test_four_processes_take_each_of_10000_tasks_exactly_once(path: Path) -> None:
    n = 10_000
    await FileRepository(path).add([NewTask(handler="h", payload={"i": i}, id=f"t{i}") for i in range(n)])
    with ProcessPoolExecutor(4, mp_context=SPAWN) as pool:
        futures = [pool.submit(_take_all, str(path), f"w{i}", 50) for i in range(4)]
        results = [f.result(timeout=120) for f in futures]
    taken = [tid for per_worker in results for tid, _ in per_worker]
    assert len(taken) == n
    assert set(taken) == {f"t{i}" for i in range(n)}
    assert {attempt for per_worker in results for _, attempt in per_worker} == {1}
    assert all(results), "every process should have taken some work"
    stats = await FileRepository(path).stats()
    assert stats.counts["completed"] == n


async def test_processes_adding_and_dequeuing_at_once_lose_nothing(path: Path) -> None:
    with ProcessPoolExecutor(4, mp_context=SPAWN) as pool:
        futures = [pool.submit(_add_and_take, str(path), f"w{i}", 200, 20) for i in range(4)]
        results = [f.result(timeout=120) for f in futures]
    added = [tid for a, _ in results for tid in a]
    taken = [tid for _, t in results for tid in t]
    assert len(added) == 800 and len(set(added)) == 800
    assert len(taken) == len(set(taken))
    tasks = await FileRepository(path).list()
    assert {t.id for t in tasks} == set(added)
    assert len({t.seq for t in tasks}) == 800
    assert {t.id for t in tasks if t.status is TaskStatus.PROCESSING} == set(taken)


async def test_non_ascii_text_round_trips(path: Path) -> None:
    payload = {"text": 'caf\u00e9 \u2028 \U0001f600 \\n "q"'}
    await FileRepository(path).add([NewTask(handler="h", payload=payload, id="u")])
    got = await FileRepository(path).get("u")
    assert got is not None and got.payload == payload

"""The custom backend: user callables behind the Repository protocol, validated."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import threading
import uuid
from collections.abc import Collection, Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from kubeque.backends import make_repository
from kubeque.backends.custom import CustomRepository, claim_due
from kubeque.errors import BackendError, ConfigError, DuplicateTaskError, InvalidIdentifierError, InvalidTaskError
from kubeque.task import Completion, FailOutcome, Failure, Lease, NewTask, TaskStatus, utcnow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_postgres.py"


class DictStore:
    """The smallest custom store: a dict of task dicts in this process."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def load_tasks(self) -> list[dict[str, Any]]:
        with self.lock:
            return copy.deepcopy(list(self.rows.values()))

    def save_tasks(self, tasks: list[dict[str, Any]]) -> None:
        with self.lock:
            for t in tasks:
                self.rows[t["id"]] = copy.deepcopy(t)

    def dequeue(
        self, worker: str, limit: int, lease_ms: int, handlers: list[str] | None = None
    ) -> list[dict[str, Any]]:
        with self.lock:
            claimed = claim_due(self.rows.values(), worker, limit, lease_ms, handlers)
            for t in claimed:
                self.rows[t["id"]] = t
            return copy.deepcopy(claimed)

    def delete_tasks(self, ids: list[str]) -> None:
        with self.lock:
            for i in ids:
                self.rows.pop(i, None)

    def repository(self, **kw: Any) -> CustomRepository:
        return CustomRepository(self.load_tasks, self.save_tasks, self.dequeue, self.delete_tasks, **kw)


class AsyncDictStore(DictStore):
    """The same store with coroutine callables."""

    async def aload(self) -> list[dict[str, Any]]:
        await asyncio.sleep(0)
        return self.load_tasks()

    async def asave(self, tasks: list[dict[str, Any]]) -> None:
        self.save_tasks(tasks)

    async def adequeue(
        self, worker: str, limit: int, lease_ms: int, handlers: list[str] | None = None
    ) -> list[dict[str, Any]]:
        return self.dequeue(worker, limit, lease_ms, handlers)

    async def adelete(self, ids: list[str]) -> None:
        self.delete_tasks(ids)

    def repository(self, **kw: Any) -> CustomRepository:
        return CustomRepository(self.aload, self.asave, self.adequeue, self.adelete, **kw)


def new(n: int, prefix: str = "t") -> list[NewTask]:
    return [NewTask(handler="h", payload={"n": i}, id=f"{prefix}{i}") for i in range(n)]


def pending_row(tid: str = "x", **changes: Any) -> dict[str, Any]:
    row = NewTask(handler="h", payload={}, id=tid).materialise(utcnow(), 1).to_json_dict()
    row.update(changes)
    return row


def fixed(load: Any = (), dequeue: Any = ()) -> CustomRepository:
    """A repository whose callables return the given values."""
    return CustomRepository(lambda: load, lambda tasks: None, lambda worker, limit, lease_ms: dequeue)


# --- over a dict store ---------------------------------------------------------


@pytest.fixture(params=["sync", "async"])
def store(request: pytest.FixtureRequest) -> DictStore:
    return DictStore() if request.param == "sync" else AsyncDictStore()


async def test_round_trip_over_a_dict_store(store: DictStore) -> None:
    repo = store.repository()
    await repo.open()
    [added] = await repo.add([NewTask(handler="email", payload={"to": "a@b.c"}, id="x", priority=2)])
    assert store.rows["x"] == added.to_json_dict()
    assert await repo.get("x") == added
    [taken] = await repo.dequeue("w1", 5, 30_000)
    assert (taken.id, taken.status, taken.attempt, taken.worker) == ("x", TaskStatus.PROCESSING, 1, "w1")
    assert await repo.complete([Completion("x", 1, result=[1, 2])]) == ["x"]
    done = await repo.get("x")
    assert done is not None
    assert (done.status, done.result, done.log[-1]["outcome"]) == (TaskStatus.COMPLETED, [1, 2], "completed")


async def test_dequeue_follows_queue_order_and_handlers(store: DictStore) -> None:
    repo = store.repository()
    now = utcnow()
    await repo.add(
        [
            NewTask(handler="a", payload={}, id="low"),
            NewTask(handler="b", payload={}, id="high", priority=9),
            NewTask(handler="a", payload={}, id="early", run_at=now - timedelta(seconds=5)),
            NewTask(handler="a", payload={}, id="later", run_at=now + timedelta(hours=1)),
        ]
    )
    assert [t.id for t in await repo.dequeue("w", 10, 30_000, handlers=["a"])] == ["early", "low"]
    assert [t.id for t in await repo.dequeue("w", 10, 30_000)] == ["high"]


async def test_state_changes_are_guarded_by_attempt(store: DictStore) -> None:
    repo = store.repository()
    await repo.add([NewTask(handler="h", payload={}, id="x", max_retries=1)])
    await repo.dequeue("w", 1, 30_000)
    assert await repo.heartbeat("w", [Lease("x", 1)], 60_000) == ["x"]
    assert await repo.fail(Failure("x", 1, "boom", retry_delay_ms=0)) is FailOutcome.RETRIED
    assert await repo.complete([Completion("x", 1)]) == []  # attempt 1 is over
    [t2] = await repo.dequeue("w", 1, 30_000)
    assert t2.attempt == 2 and t2.retry_count == 1
    assert await repo.release([Lease("x", 1)]) == []
    assert await repo.release([Lease("x", 2)]) == ["x"]
    released = await repo.get("x")
    assert released is not None and released.status is TaskStatus.PENDING and released.retry_count == 1


async def test_expired_update_remove_purge_and_stats(store: DictStore) -> None:
    repo = store.repository()
    await repo.add(new(3))
    await repo.dequeue("w", 1, 1)
    await asyncio.sleep(0.01)
    assert [t.id for t in await repo.expired(10)] == ["t0"]
    assert (await repo.update("t1", {"priority": 4})).priority == 4
    assert await repo.remove("t1", hard=False)
    assert await repo.remove("t2", hard=True)
    assert not await repo.remove("nope", hard=True)
    assert "t2" not in store.rows
    stats = await repo.stats()
    assert stats.counts["processing"] == 1 and stats.counts["deleted"] == 1
    assert await repo.purge(0, [TaskStatus.DELETED], 10) == 1
    assert sorted(store.rows) == ["t0"]


async def test_add_rejects_duplicates_and_stores_nothing(store: DictStore) -> None:
    repo = store.repository()
    await repo.add(new(1))
    with pytest.raises(DuplicateTaskError):
        await repo.add([NewTask(handler="h", payload={}, id="y"), NewTask(handler="h", payload={}, id="t0")])
    with pytest.raises(DuplicateTaskError):
        await repo.add([NewTask(handler="h", payload={}, id="z"), NewTask(handler="h", payload={}, id="z")])
    assert sorted(store.rows) == ["t0"]


async def test_add_gives_increasing_seq_in_list_order(store: DictStore) -> None:
    repo = store.repository()
    first = await repo.add(new(2))
    second = await repo.add(new(2, prefix="u"))
    assert [t.seq for t in first + second] == [1, 2, 3, 4]


async def test_add_refuses_a_connection() -> None:
    with pytest.raises(TypeError, match="postgres"):
        await DictStore().repository().add(new(1), connection=object())


async def test_hard_removal_without_delete_tasks_asks_for_it() -> None:
    store = DictStore()
    repo = CustomRepository(store.load_tasks, store.save_tasks, store.dequeue)
    await repo.add(new(1))
    assert not repo.can_delete
    with pytest.raises(ConfigError, match="delete_tasks"):
        await repo.remove("t0", hard=True)
    with pytest.raises(ConfigError, match="delete_tasks"):
        await repo.purge(0, [TaskStatus.COMPLETED], 10)
    assert await repo.remove("t0", hard=False)


async def test_wait_for_work_wakes_on_add_in_this_process() -> None:
    repo = DictStore().repository()

    async def add_later() -> None:
        await asyncio.sleep(0.05)
        await repo.add(new(1))

    start = asyncio.get_running_loop().time()
    await asyncio.gather(repo.wait_for_work(5), add_later())
    assert asyncio.get_running_loop().time() - start < 1


async def test_sync_callables_run_off_the_loop_unless_told_otherwise() -> None:
    store = DictStore()
    threads: list[int] = []

    def load() -> list[dict[str, Any]]:
        threads.append(threading.get_ident())
        return store.load_tasks()

    await CustomRepository(load, store.save_tasks, store.dequeue).list()
    await CustomRepository(load, store.save_tasks, store.dequeue, threaded=False).list()
    assert threads[0] != threading.get_ident()
    assert threads[1] == threading.get_ident()


async def test_a_callable_that_raises_becomes_a_backend_error() -> None:
    def load() -> list[dict[str, Any]]:
        raise RuntimeError("database is down")

    repo = CustomRepository(load, lambda tasks: None, lambda worker, limit, lease_ms: [])
    with pytest.raises(BackendError, match="load_tasks raised RuntimeError: database is down"):
        await repo.list()


async def test_handlers_filter_needs_a_dequeue_that_accepts_it() -> None:
    repo = fixed()
    assert await repo.dequeue("w", 5, 1000) == []
    with pytest.raises(ConfigError, match="handlers"):
        await repo.dequeue("w", 5, 1000, handlers=["a"])


# --- malformed returns ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"id": "x"}, "load_tasks returned dict, not a list"),
        (None, "load_tasks returned NoneType, not a list"),
        ([42], "int at index 0, not a task dict"),
        ([{k: v for k, v in pending_row().items() if k != "handler"}], r"'x'.*field 'handler'"),
        ([pending_row(priority="high")], r"'x'.*field 'priority'"),
        ([pending_row(status="sleeping")], r"'x'.*field 'status'"),
        ([pending_row(run_at="yesterday")], r"'x'.*field 'run_at'"),
        ([pending_row(), pending_row()], "'x' twice"),
    ],
    ids=["dict", "none", "not-a-dict", "missing-field", "wrong-type", "bad-status", "bad-time", "duplicate"],
)
async def test_malformed_load_is_rejected_clearly(value: Any, match: str) -> None:
    with pytest.raises(InvalidTaskError, match=match):
        await fixed(load=value).list()


def claimed_row(**changes: Any) -> dict[str, Any]:
    [row] = claim_due([pending_row()], "w", 5, 30_000)
    row.update(changes)
    return row


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("x", "dequeue returned str, not a list"),
        ([pending_row()], "'x' with status 'pending'"),
        ([claimed_row(worker="other")], "claimed by worker 'other'"),
        ([claimed_row(lease_expires_at=None)], "without lease_expires_at"),
        ([claimed_row(log=[])], "without a start entry"),
        ([claimed_row(), claimed_row()], "'x' twice"),
        ([claimed_row(attempt="one")], r"'x'.*field 'attempt'"),
        ([claimed_row(id=f"x{i}") for i in range(6)], "more than the limit 5"),
    ],
    ids=["not-a-list", "unclaimed", "other-worker", "no-lease", "no-log", "twice", "wrong-type", "over-limit"],
)
async def test_malformed_dequeue_is_rejected_clearly(value: Any, match: str) -> None:
    with pytest.raises(InvalidTaskError, match=match):
        await fixed(dequeue=value).dequeue("w", 5, 30_000)


# --- configuration ------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["load_tasks", "save_tasks", "dequeue"])
def test_from_config_names_a_missing_callable(missing: str) -> None:
    store = DictStore()
    config = {"load_tasks": store.load_tasks, "save_tasks": store.save_tasks, "dequeue": store.dequeue}
    del config[missing]
    with pytest.raises(ConfigError, match=f"'{missing}'"):
        CustomRepository.from_config(config)
    with pytest.raises(ConfigError, match=f"'{missing}'"):
        CustomRepository.from_config(SimpleNamespace(**config))


def test_from_config_rejects_what_is_not_callable_and_unknown_keys() -> None:
    store = DictStore()
    with pytest.raises(ConfigError, match="'dequeue' must be callable"):
        CustomRepository.from_config({"load_tasks": store.load_tasks, "save_tasks": store.save_tasks, "dequeue": 1})
    with pytest.raises(ConfigError, match="loadTasks"):
        CustomRepository.from_config({"loadTasks": store.load_tasks})


def test_from_config_takes_an_object_and_the_atomic_flag() -> None:
    store = DictStore()
    assert CustomRepository.from_config(store).multi_process is False
    assert CustomRepository.from_config(store, atomic=True).multi_process is True
    repo = make_repository(
        {
            "type": "custom",
            "repository": {
                "load_tasks": store.load_tasks,
                "save_tasks": store.save_tasks,
                "dequeue": store.dequeue,
                "atomic": True,
            },
        }
    )
    assert isinstance(repo, CustomRepository) and repo.multi_process and not repo.can_delete


# --- the PostgreSQL example -----------------------------------------------------------


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("custom_postgres_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pg_store(example: ModuleType, pg_dsn: str) -> Iterator[dict[str, Any]]:
    table = f"custom_{uuid.uuid4().hex[:12]}"
    callables = example.make_repository(pg_dsn, table)
    yield callables
    example.drop_table(pg_dsn, table)


def test_example_validates_the_table_name(example: ModuleType) -> None:
    with pytest.raises(InvalidIdentifierError):
        example.make_repository("postgresql://unused", 'tasks"; DROP TABLE x; --')


async def test_example_round_trip_on_postgres(pg_store: dict[str, Any]) -> None:
    repo = CustomRepository.from_config(pg_store, atomic=True)
    await repo.open()
    now = utcnow()
    added = await repo.add(
        [
            NewTask(handler="a", payload={"k": "v", "n": [1, None]}, id="low", extra={"e": 1}),
            NewTask(handler="b", payload={}, id="high", priority=9),
            NewTask(handler="a", payload={}, id="early", run_at=now - timedelta(seconds=5)),
            NewTask(handler="a", payload={}, id="later", run_at=now + timedelta(hours=1)),
            NewTask(handler="a", payload={}, id="same1"),
            NewTask(handler="a", payload={}, id="same2"),
        ]
    )
    assert await repo.get("low") == added[0]
    assert [t.id for t in await repo.dequeue("w", 1, 30_000, handlers=["a"])] == ["early"]
    taken = await repo.dequeue("w", 10, 30_000)
    assert [t.id for t in taken] == ["high", "low", "same1", "same2"]
    assert {(t.status, t.attempt, t.worker) for t in taken} == {(TaskStatus.PROCESSING, 1, "w")}
    assert await repo.complete([Completion("high", 1, result={"ok": True})]) == ["high"]
    assert await repo.complete([Completion("high", 1)]) == []
    assert await repo.fail(Failure("low", 1, "boom", retry_delay_ms=0)) is FailOutcome.RETRIED
    [again] = await repo.dequeue("w", 1, 30_000)
    assert (again.id, again.attempt, again.retry_count) == ("low", 2, 1)
    assert await repo.complete([Completion("low", 1)]) == []  # the stale attempt does not land
    assert await repo.heartbeat("w", [Lease("low", 2)], 60_000) == ["low"]
    assert await repo.release([Lease("same1", 1)]) == ["same1"]
    assert await repo.remove("same2", hard=True)
    stats = await repo.stats()
    assert stats.counts == {"pending": 2, "processing": 2, "completed": 1, "failed": 0, "deleted": 0}
    high = await repo.get("high")
    assert high is not None and high.result == {"ok": True} and high.log[-1]["outcome"] == "completed"


async def test_example_save_never_overwrites_a_newer_attempt(pg_store: dict[str, Any]) -> None:
    repo = CustomRepository.from_config(pg_store, atomic=True)
    [added] = await repo.add(new(1))
    await repo.dequeue("w", 1, 30_000)
    pg_store["save_tasks"]([added.to_json_dict()])  # a late write from before the claim
    got = await repo.get("t0")
    assert got is not None and got.status is TaskStatus.PROCESSING and got.attempt == 1


async def test_example_dequeue_from_several_repositories_takes_each_task_once(pg_store: dict[str, Any]) -> None:
    repos = [CustomRepository.from_config(pg_store, atomic=True) for _ in range(4)]
    await repos[0].add(new(200))

    async def drain(repo: CustomRepository, worker: str) -> list[str]:
        ids: list[str] = []
        while got := await repo.dequeue(worker, 7, 30_000):
            ids.extend(t.id for t in got)
        return ids

    results = await asyncio.gather(*(drain(r, f"w{i}") for i, r in enumerate(repos)))
    taken = [tid for ids in results for tid in ids]
    assert sorted(taken) == sorted(f"t{i}" for i in range(200))


def test_example_demo_runs(example: ModuleType, pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    example._demo(pg_dsn)
    out = capsys.readouterr().out
    assert out.index("took email") < out.index("took resize")
    assert "'completed': 2" in out


def test_claim_due_is_the_repository_claim() -> None:
    handlers: Collection[str] = ["h"]
    [row] = claim_due([pending_row()], "w", 5, 1000, handlers)
    assert (row["status"], row["attempt"], row["worker"]) == ("processing", 1, "w")
    assert row["log"][-1]["attempt"] == 1
    assert claim_due([pending_row()], "w", 5, 1000, ["other"]) == []

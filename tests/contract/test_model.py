"""Property test: random add / dequeue / complete / fail / release / crash /
reclaim sequences, checked step by step against a reference model, per backend."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeque.backends import make_repository
from kubeque.task import Completion, FailOutcome, Failure, Lease, NewTask, TaskStatus

from .conftest import StoreFactory

LEASE_MS = 1  # every lease is already expired by the next step; reclaim decides


@dataclass
class Row:
    priority: int
    max_retries: int
    seq: int
    due: int  # logical time of the event that made it pending
    status: str = "pending"
    attempt: int = 0
    retry_count: int = 0


@dataclass
class Model:
    rows: dict[str, Row] = field(default_factory=dict)
    clock: int = 0
    seq: int = 0
    held: list[Lease] = field(default_factory=list)

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def order(self) -> list[str]:
        pending = [(i, r) for i, r in self.rows.items() if r.status == "pending"]
        pending.sort(key=lambda ir: (-ir[1].priority, ir[1].due, ir[1].seq))
        return [i for i, _ in pending]

    def guard(self, lease: Lease) -> Row | None:
        r = self.rows.get(lease.id)
        if r is None or r.status != "processing" or r.attempt != lease.attempt:
            return None
        return r

    def fail(self, r: Row) -> FailOutcome:
        if r.retry_count < r.max_retries:
            r.status, r.retry_count, r.due = "pending", r.retry_count + 1, self.tick()
            return FailOutcome.RETRIED
        r.status = "failed"
        return FailOutcome.FAILED


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 3), st.integers(-1, 2), st.integers(0, 2)),
        st.tuples(st.just("dequeue"), st.integers(1, 4)),
        st.tuples(st.just("complete"), st.integers(0, 50)),
        st.tuples(st.just("fail"), st.integers(0, 50)),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("reclaim")),
        st.tuples(st.just("stats")),
    ),
    min_size=1,
    max_size=30,
)


async def run_scenario(config: Any, steps: list[tuple[Any, ...]]) -> None:
    repo = make_repository(config)
    await repo.open()
    model = Model()
    n = 0
    try:
        for step in steps:
            kind = step[0]
            if kind == "add":
                _, count, priority, max_retries = step
                news = [
                    NewTask(
                        handler="h",
                        payload={"n": n + i},
                        id=f"task-{n + i}",
                        priority=priority,
                        max_retries=max_retries,
                    )
                    for i in range(count)
                ]
                n += count
                await repo.add(news)
                due = model.tick()
                for t in news:
                    model.seq += 1
                    model.rows[t.id] = Row(priority=priority, max_retries=max_retries, seq=model.seq, due=due)
            elif kind == "dequeue":
                expected = model.order()[: step[1]]
                got = await repo.dequeue("w", step[1], LEASE_MS)
                assert [t.id for t in got] == expected, (steps, kind)
                for t in got:
                    r = model.rows[t.id]
                    r.status, r.attempt = "processing", r.attempt + 1
                    model.tick()
                    assert t.attempt == r.attempt and t.status is TaskStatus.PROCESSING
                    model.held.append(Lease(t.id, t.attempt))
            elif kind in ("complete", "fail", "release"):
                if not model.held:
                    continue
                lease = model.held[step[1] % len(model.held)]
                r = model.guard(lease)
                if kind == "complete":
                    landed = await repo.complete([Completion(lease.id, lease.attempt, {"ok": True})])
                    assert landed == ([lease.id] if r else []), (steps, kind)
                    if r:
                        r.status = "completed"
                elif kind == "fail":
                    out = await repo.fail(Failure(lease.id, lease.attempt, "boom", retry_delay_ms=0))
                    assert out == (model.fail(r) if r else None), (steps, kind)
                else:
                    released = await repo.release([lease])
                    assert released == ([lease.id] if r else []), (steps, kind)
                    if r:
                        r.status = "pending"  # keeps its run_at: it goes back to its place
            elif kind == "reclaim":
                await asyncio.sleep(0.003)  # let the 1 ms leases run out
                expired = await repo.expired(1000)
                assert {t.id for t in expired} == {i for i, r in model.rows.items() if r.status == "processing"}, (
                    steps,
                    kind,
                )
                for t in expired:
                    out = await repo.fail(
                        Failure(t.id, t.attempt, "lost", retry_delay_ms=0, outcome="lost", only_if_expired=True)
                    )
                    assert out == model.fail(model.rows[t.id]), (steps, kind)
            else:
                stats = await repo.stats()
                for status in ("pending", "processing", "completed", "failed"):
                    want = sum(1 for r in model.rows.values() if r.status == status)
                    assert stats.counts[status] == want, (steps, status)
            time.sleep(0.0002)  # keep store timestamps strictly increasing between steps
        # Every stored task agrees with the model at the end.
        for tid, r in model.rows.items():
            t = await repo.get(tid)
            assert t is not None
            assert (t.status.value, t.attempt, t.retry_count) == (r.status, r.attempt, r.retry_count), steps
            assert len(t.log) == r.attempt
            assert t.attempt <= 1 + r.max_retries + sum(1 for e in t.log if e.get("outcome") == "released")
    finally:
        await repo.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=ops)
def test_store_matches_reference_model(store_factory: StoreFactory, steps: list[tuple[Any, ...]]) -> None:
    asyncio.run(run_scenario(store_factory(), steps))

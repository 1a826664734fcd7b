"""Several OS processes dequeuing from one Postgres queue never take a task twice."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections import Counter

import pytest

from kubeque.backends.postgres import PostgresRepository
from kubeque.task import Completion, NewTask, TaskStatus

TASKS = 10_000
PROCESSES = 4


def _drain(dsn: str, schema: str, worker: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    async def main() -> list[str]:
        repo = PostgresRepository(dsn, schema, max_size=2)
        await repo.open()
        taken: list[str] = []
        empty = 0
        try:
            while empty < 3:
                batch = await repo.dequeue(worker, 50, 60_000)
                if not batch:
                    empty += 1
                    await asyncio.sleep(0.05)
                    continue
                empty = 0
                taken += [t.id for t in batch]
                landed = await repo.complete([Completion(t.id, t.attempt, None) for t in batch])
                assert len(landed) == len(batch)
        finally:
            await repo.close()
        return taken

    out.put(asyncio.run(main()))


@pytest.mark.slow
async def test_processes_never_share_a_task(pg_dsn: str, pg_schema: str) -> None:
    repo = PostgresRepository(pg_dsn, pg_schema)
    await repo.open()
    try:
        for start in range(0, TASKS, 2000):
            await repo.add([NewTask(handler="h", payload={"i": i}) for i in range(start, start + 2000)])
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        procs = [ctx.Process(target=_drain, args=(pg_dsn, pg_schema, f"p{i}", out)) for i in range(PROCESSES)]
        for p in procs:
            p.start()
        results = [out.get(timeout=240) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        ids = [i for r in results for i in r]
        dupes = [i for i, c in Counter(ids).items() if c > 1]
        assert dupes == []
        assert len(ids) == TASKS
        assert all(len(r) > 0 for r in results), "every process should have taken work"
        stats = await repo.stats()
        assert stats.counts[TaskStatus.COMPLETED.value] == TASKS
    finally:
        await repo.close()

"""Run the benchmarks and report each as a ratio against a baseline measured in
the same run (these machines are shared and noisy: absolute numbers drift).

    python -m bench [--dsn DSN] [--tasks N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from kubeque import QueueManager
from kubeque.backends.base import Repository
from kubeque.backends.postgres import PostgresRepository
from kubeque.embedded import postgres_reachable, start_embedded_postgres
from kubeque.task import Completion, NewTask

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


class Schemas:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.made: list[str] = []

    async def repo(self) -> PostgresRepository:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        self.made.append(name)
        r = PostgresRepository(self.dsn, name)
        await r.open()
        return r

    def drop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for name in self.made:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def tasks(n: int) -> list[NewTask]:
    return [NewTask(handler="noop", payload={"i": i}) for i in range(n)]


async def drain(repo: Repository, batch: int) -> int:
    done = 0
    while True:
        got = await repo.dequeue("bench", batch, 60_000)
        if not got:
            return done
        await repo.complete([Completion(t.id, t.attempt) for t in got])
        done += len(got)


async def bench_enqueue(s: Schemas, n: int) -> dict[str, Any]:
    single, batched = await s.repo(), await s.repo()
    base = await timed(lambda: _one_by_one(single, n))
    fast = await timed(lambda: _batches(batched, n, 500))
    await single.close()
    await batched.close()
    return _row("enqueue", f"{n} tasks: one add per task", base, "add_tasks in batches of 500", fast, n)


async def _one_by_one(repo: Repository, n: int) -> None:
    for t in tasks(n):
        await repo.add([t])


async def _batches(repo: Repository, n: int, size: int) -> None:
    all_tasks = tasks(n)
    for i in range(0, n, size):
        await repo.add(all_tasks[i : i + size])


async def bench_take(s: Schemas, n: int) -> dict[str, Any]:
    a, b = await s.repo(), await s.repo()
    await _batches(a, n, 1000)
    await _batches(b, n, 1000)
    base = await timed(lambda: drain(a, 1))
    fast = await timed(lambda: drain(b, 50))
    await a.close()
    await b.close()
    return _row("take+complete", f"{n} tasks: batch of 1", base, "batch of 50", fast, n)


async def bench_bloat(s: Schemas, n: int) -> dict[str, Any]:
    clean, bloated = await s.repo(), await s.repo()
    finished = 50_000
    await _batches(bloated, finished, 5000)
    await drain(bloated, 1000)
    # Autovacuum would do this in production; the benchmark asks what finished
    # rows cost, not what dead row versions cost before vacuum.
    with psycopg.connect(s.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM ANALYZE {}.tasks").format(sql.Identifier(s.made[-1])))
    await _batches(clean, n, 1000)
    await _batches(bloated, n, 1000)
    base = await timed(lambda: drain(clean, 10))
    other = await timed(lambda: drain(bloated, 10))
    await clean.close()
    await bloated.close()
    return _row(
        "dequeue vs finished rows", f"{n} tasks, empty table", base, f"same beside {finished} finished rows", other, n
    )


async def bench_worker(s: Schemas, n: int) -> dict[str, Any]:
    async def run(backend: Any) -> float:
        qm = QueueManager(backend, poll_interval=0.05)

        @qm.handler()
        async def noop(p: dict[str, Any]) -> None:
            return None

        await qm.add_tasks([{"handler": "noop", "payload": {"i": i}} for i in range(n)])
        start = time.perf_counter()
        await qm.start_worker(16)
        while (await qm.stats()).counts["completed"] < n:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        await qm.close()
        return elapsed

    base = await run({"type": "memory"})
    repo = await s.repo()
    await repo.close()
    other = await run({"type": "postgres", "dsn": s.dsn, "schema": s.made[-1]})
    return _row("worker end to end", f"{n} no-op tasks, memory store", base, "same on postgres", other, n)


def _row(name: str, base_label: str, base: float, label: str, t: float, n: int) -> dict[str, Any]:
    return {
        "benchmark": name,
        "baseline": base_label,
        "baseline_tasks_per_s": round(n / base, 1),
        "variant": label,
        "variant_tasks_per_s": round(n / t, 1),
        "speedup": round(base / t, 2),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--dsn", default=os.environ.get("KUBEQUE_DSN"))
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dsn = args.dsn or (LOCAL_DSN if postgres_reachable(LOCAL_DSN) else start_embedded_postgres())
    s = Schemas(dsn)
    rows = []
    try:
        for bench in (bench_enqueue, bench_take, bench_bloat, bench_worker):
            rows.append(await bench(s, args.tasks))
    finally:
        s.drop()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="kubeque benchmarks (speedup = baseline time / variant time, same run)")
    for col in ("benchmark", "baseline", "baseline_tasks_per_s", "variant", "variant_tasks_per_s", "speedup"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c]) for c in r))
    Console().print(table)


if __name__ == "__main__":
    asyncio.run(main())

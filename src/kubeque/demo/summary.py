"""The end-of-run summary: computed from the tasks' own log entries, shown as tables or one JSON object."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from ..task import Task, TaskStatus
from .invariants import Invariant, attempts
from .workload import KINDS, KINDS_SHORT


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max by the nearest-rank method, in seconds rounded to the millisecond."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 3)

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": round(ordered[-1], 3)}


def _time(entry: dict[str, Any], key: str) -> datetime | None:
    value = entry.get(key)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _kind(task: Task) -> str:
    kind = task.extra.get("kind")
    return kind if isinstance(kind, str) else task.handler


def finished_at(task: Task) -> datetime | None:
    """When the task's last attempt ended (store clock)."""
    return _time(task.log[-1], "ended_at") if task.log else None


def queue_wait_s(task: Task) -> float | None:
    """From being added to its first start."""
    start = _time(task.log[0], "started_at") if task.log else None
    return (start - task.created_at).total_seconds() if start else None


def run_times_s(task: Task) -> list[float]:
    """The duration of every attempt that ended."""
    out = []
    for entry in task.log:
        start, end = _time(entry, "started_at"), _time(entry, "ended_at")
        if start and end:
            out.append((end - start).total_seconds())
    return out


def priority_order(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """Per priority: where its tasks were added and where they finished, as % of the way through.

    The point: urgent emails added last finish near the start; reports added
    throughout finish at the end.
    """
    added = sorted(tasks, key=lambda t: (t.seq, t.created_at))
    added_pos = {t.id: i / max(1, len(added) - 1) for i, t in enumerate(added)}
    done = [t for t in tasks if t.status is TaskStatus.COMPLETED and finished_at(t) is not None]
    done.sort(key=lambda t: finished_at(t))  # type: ignore[arg-type, return-value]
    done_pos = {t.id: i / max(1, len(done) - 1) for i, t in enumerate(done)}
    t0 = min((t.created_at for t in tasks), default=None)
    groups: dict[int, list[Task]] = defaultdict(list)
    for t in tasks:
        groups[t.priority].append(t)
    rows = []
    for priority in sorted(groups, reverse=True):
        members = groups[priority]
        finished = [t for t in members if t.id in done_pos]
        ends = [(finished_at(t) - t0).total_seconds() for t in finished if t0 is not None]  # type: ignore[operator]
        kinds = sorted({_kind(t) for t in members})
        rows.append(
            {
                "priority": priority,
                "kinds": kinds,
                "tasks": len(members),
                "added_at_pct": round(100 * statistics.fmean(added_pos[t.id] for t in members), 1),
                "finished_at_pct": round(100 * statistics.fmean(done_pos[t.id] for t in finished), 1)
                if finished
                else None,
                "median_finish_s": round(statistics.median(ends), 3) if ends else None,
            }
        )
    return rows


def build_summary(
    tasks: Sequence[Task],
    *,
    elapsed_s: float,
    invariants: Sequence[Invariant],
    run: dict[str, Any],
    outputs: dict[str, Any],
) -> dict[str, Any]:
    """The whole summary as one JSON-ready dict."""
    counts = {s.value: 0 for s in (TaskStatus.PENDING, TaskStatus.PROCESSING, TaskStatus.COMPLETED, TaskStatus.FAILED)}
    by_kind: dict[str, dict[str, int]] = {}
    waits: list[float] = []
    runs: list[float] = []
    timeouts = 0
    for t in tasks:
        counts[t.status.value] = counts.get(t.status.value, 0) + 1
        row = by_kind.setdefault(_kind(t), {"tasks": 0, "completed": 0, "failed": 0, "retries": 0})
        row["tasks"] += 1
        row["retries"] += t.retry_count
        if t.status.value in ("completed", "failed"):
            row[t.status.value] += 1
        wait = queue_wait_s(t)
        if wait is not None:
            waits.append(max(0.0, wait))
        runs.extend(run_times_s(t))
        timeouts += sum(1 for e in t.log if e.get("outcome") == "timeout")
    total = len(tasks)
    return {
        "ok": all(i.ok for i in invariants),
        "tasks": total,
        "elapsed_s": round(elapsed_s, 3),
        "throughput_per_s": round(total / elapsed_s, 1) if elapsed_s > 0 else None,
        "counts": counts,
        "by_kind": dict(sorted(by_kind.items())),
        "attempts": sum(attempts(t) for t in tasks),
        "retries": sum(t.retry_count for t in tasks),
        "failures": counts.get("failed", 0),
        "timeouts": timeouts,
        "wait_s": percentiles(waits),
        "run_s": percentiles(runs),
        "priorities": priority_order(tasks),
        "run": run,
        "outputs": outputs,
        "invariants": [i.as_dict() for i in invariants],
    }


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def render_summary(console: Console, summary: dict[str, Any]) -> None:
    """Print the summary as tables."""
    run = summary["run"]
    counts = summary["counts"]
    main = Table(title="kubeque demo: summary", show_header=False, title_justify="left")
    main.add_column(style="bold")
    main.add_column()
    main.add_row("tasks", f"{summary['tasks']} ({counts['completed']} completed, {counts['failed']} failed)")
    workers = f"{run['workers']} processes x {run['concurrency']} slots, ready in {run['workers_ready_s']:.1f} s"
    main.add_row("workers", workers)
    main.add_row("schema", run["schema"] + (" (kept)" if run["schema_kept"] else " (dropped at the end)"))
    main.add_row("store", run["store"])
    main.add_row("total time", f"{summary['elapsed_s']:.2f} s")
    main.add_row("throughput", f"{summary['throughput_per_s']:.0f} tasks/s")
    main.add_row("attempts", f"{summary['attempts']} ({summary['retries']} retries, {summary['timeouts']} timed out)")
    for label, key in (("queue wait", "wait_s"), ("run time", "run_s")):
        p = summary[key]
        main.add_row(label, f"p50 {_secs(p['p50'])}  p95 {_secs(p['p95'])}  p99 {_secs(p['p99'])}")
    console.print(main)

    kinds = Table(title="by kind", title_justify="left")
    for col in ("kind", "tasks", "completed", "failed", "retries"):
        kinds.add_column(col, justify="left" if col == "kind" else "right")
    for kind, row in summary["by_kind"].items():
        kinds.add_row(KINDS.get(kind, kind), *(str(row[c]) for c in ("tasks", "completed", "failed", "retries")))
    console.print(kinds)

    prio = Table(title="priority reorders work (0% = first, 100% = last)", title_justify="left")
    for col in ("priority", "kinds", "tasks", "added at", "finished at", "median finish"):
        prio.add_column(col, justify="left" if col == "kinds" else "right")
    for row in summary["priorities"]:
        finished = "-" if row["finished_at_pct"] is None else f"{row['finished_at_pct']:.0f}%"
        prio.add_row(
            str(row["priority"]),
            ", ".join(KINDS_SHORT.get(k, k) for k in row["kinds"]),
            str(row["tasks"]),
            f"{row['added_at_pct']:.0f}%",
            finished,
            _secs(row["median_finish_s"]),
        )
    console.print(prio)

    out = summary["outputs"]
    files = Table(title="outputs", show_header=False, title_justify="left")
    files.add_column(style="bold")
    files.add_column()
    files.add_row("folder", out["dir"])
    files.add_row("thumbnails", f"{out['thumbnails']} in thumbs/ (from {out['sources']} source images)")
    files.add_row("emails", f"{out['emails']} in mail/ ({out['greylisted']} first attempts greylisted with 451)")
    files.add_row("reports", f"{out['reports']} in reports/")
    files.add_row("worker logs", "logs/")
    console.print(files)

    checks = Table(title="invariants", show_header=False, title_justify="left")
    checks.add_column()
    checks.add_column(style="bold")
    checks.add_column()
    for inv in summary["invariants"]:
        mark = "[green]ok[/]" if inv["ok"] else "[red]FAILED[/]"
        checks.add_row(mark, inv["name"], inv["detail"])
    console.print(checks)
    if summary["ok"]:
        console.print("[bold green]all invariants hold[/]")
    else:
        failed = ", ".join(i["name"] for i in summary["invariants"] if not i["ok"])
        console.print(f"[bold red]invariant failed: {failed}[/]")

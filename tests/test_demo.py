"""``kubeque demo``: the whole run end to end on a real PostgreSQL, and the checks it makes of itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kubeque import Task, TaskStatus
from kubeque.demo.invariants import Invariant, attempts, check_invariants
from kubeque.demo.mailserver import mailbox_file
from kubeque.demo.summary import percentiles
from kubeque.demo.workload import REPORT_PRIORITY, URGENT_PRIORITY, plan_workload

INVARIANTS = {
    "all tasks stored",
    "every task terminal",
    "attempts <= 1 + max_retries",
    "poison task exhausted its retries",
    "hung task stopped at its deadline",
    "every output file exists",
    "one mail file per completed email",
    "workers drained and exited 0",
}


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kubeque", "demo", *args]


def demo_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KUBEQUE_DSN", None)
    return env


def schema_exists(dsn: str, schema: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    return bool(row and row[0])


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


# --- end to end ------------------------------------------------------------------


def test_demo_runs_real_work_on_worker_processes_and_checks_itself(pg_dsn: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        demo_command(
            "--tasks",
            "120",
            "--workers",
            "2",
            "--concurrency",
            "4",
            "--json",
            "--dsn",
            pg_dsn,
            "--output",
            str(tmp_path),
        ),
        cwd=tmp_path,
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads(proc.stdout)

    assert summary["ok"] is True
    assert summary["tasks"] == 120
    assert summary["counts"] == {"pending": 0, "processing": 0, "completed": 118, "failed": 2}
    kinds = summary["by_kind"]
    assert sum(k["tasks"] for k in kinds.values()) == 120
    assert kinds["poison"] == {"tasks": 1, "completed": 0, "failed": 1, "retries": 2}
    assert kinds["hung"] == {"tasks": 1, "completed": 0, "failed": 1, "retries": 0}
    assert kinds["email"]["retries"] > 0  # greylisted recipients were refused once, then retried
    assert summary["retries"] == sum(k["retries"] for k in kinds.values())
    assert summary["failures"] == 2
    assert summary["timeouts"] == 1
    assert summary["attempts"] == 120 + summary["retries"]
    for key in ("wait_s", "run_s"):
        p = summary[key]
        assert 0 <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"]

    assert {i["name"] for i in summary["invariants"]} == INVARIANTS
    assert all(i["ok"] for i in summary["invariants"]), summary["invariants"]

    out = summary["outputs"]
    run_dir = Path(out["dir"])
    assert run_dir.parent == tmp_path
    assert out["thumbnails"] == kinds["thumbnail"]["completed"] == len(list((run_dir / "thumbs").glob("*.png")))
    sent = kinds["email"]["completed"] + kinds["urgent_email"]["completed"]
    assert out["emails"] == sent == len(list((run_dir / "mail").glob("*.eml")))
    assert out["greylisted"] == kinds["email"]["retries"]
    assert out["reports"] == kinds["report"]["completed"]
    report = json.loads(next((run_dir / "reports").glob("*.json")).read_text())
    assert report["thumbnails"] > 0 and report["thumbnail_bytes"] > 0

    rows = {row["priority"]: row for row in summary["priorities"]}
    assert rows[URGENT_PRIORITY]["added_at_pct"] > 90
    assert rows[REPORT_PRIORITY]["finished_at_pct"] > rows[0]["finished_at_pct"]

    run = summary["run"]
    assert run["worker_exit_codes"] == {"1": 0, "2": 0}
    assert not schema_exists(pg_dsn, run["schema"]), "the run's schema is dropped at the end"
    assert processes_mentioning(run["schema"]) == []


def test_demo_stops_its_workers_when_terminated(pg_dsn: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        demo_command("--tasks", "5000", "--workers", "2", "--json", "--dsn", pg_dsn, "--output", str(tmp_path)),
        cwd=tmp_path,
        env=demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        schema = ""
        while time.monotonic() < deadline:
            runs = list(tmp_path.glob("demo_*"))
            if runs and len(processes_mentioning(runs[0].name)) == 2:
                schema = runs[0].name
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        assert schema, "the workers did not start"
        time.sleep(1.5)  # into the run, with tasks in flight
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert processes_mentioning(schema) == []
    assert not schema_exists(pg_dsn, schema)


# --- invariants ------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_task(
    task_id: str,
    handler: str,
    *,
    status: TaskStatus = TaskStatus.COMPLETED,
    runs: int = 1,
    max_retries: int = 3,
    last_outcome: str | None = None,
    result: Any = None,
) -> Task:
    log = []
    for i in range(runs):
        start = T0 + timedelta(seconds=i)
        final = i == runs - 1
        outcome = (last_outcome or status.value) if final else "error"
        log.append(
            {
                "attempt": i + 1,
                "worker": "w",
                "started_at": start.isoformat(),
                "ended_at": (start + timedelta(milliseconds=50)).isoformat(),
                "outcome": outcome,
            }
        )
    return Task(
        id=task_id,
        handler=handler,
        payload={},
        status=status,
        log=log,
        created_at=T0,
        updated_at=T0,
        max_retries=max_retries,
        max_processing_time=2000,
        retry_count=max(0, runs - 1),
        run_at=T0,
        attempt=runs,
        result=result,
    )


def clean_run(out: Path) -> list[Task]:
    """A finished run as the demo leaves it: outputs on disk, poison failed, hung timed out."""
    for sub in ("thumbs", "mail", "reports"):
        (out / sub).mkdir(parents=True)
    thumb = out / "thumbs" / "t1.png"
    thumb.write_bytes(b"png")
    report = out / "reports" / "report-001.json"
    report.write_text("{}")
    mailbox_file(out / "mail", "<e1@kubeque.example>").write_text("mail")
    return [
        make_task("t1", "make_thumbnail", result={"path": str(thumb)}),
        make_task("e1", "send_email", runs=2, result={"message_id": "<e1@kubeque.example>"}),
        make_task("r1", "write_report", result={"path": str(report)}),
        make_task("poison", "make_thumbnail", status=TaskStatus.FAILED, runs=3, max_retries=2),
        make_task("hung", "verify_address", status=TaskStatus.FAILED, max_retries=0, last_outcome="timeout"),
    ]


def check(tasks: list[Task], out: Path) -> dict[str, Invariant]:
    results = check_invariants(tasks, expected_total=len(tasks), poison_id="poison", hung_id="hung", output_dir=out)
    return {i.name: i for i in results}


def failed(results: dict[str, Invariant]) -> set[str]:
    return {name for name, i in results.items() if not i.ok}


def test_invariants_hold_for_a_clean_run(tmp_path: Path) -> None:
    assert failed(check(clean_run(tmp_path), tmp_path)) == set()


def test_invariants_catch_a_task_that_ran_too_often(tmp_path: Path) -> None:
    tasks = clean_run(tmp_path)
    tasks[0] = make_task("t1", "make_thumbnail", runs=5, max_retries=3, result=tasks[0].result)
    results = check(tasks, tmp_path)
    assert failed(results) == {"attempts <= 1 + max_retries"}
    assert "t1: 5 attempts with max_retries 3" in results["attempts <= 1 + max_retries"].detail


def test_attempts_handed_back_at_shutdown_do_not_count(tmp_path: Path) -> None:
    task = make_task("t1", "make_thumbnail", runs=2, max_retries=0)
    task.log[0]["outcome"] = "released"
    assert attempts(task) == 1
    tasks = clean_run(tmp_path)
    tasks[0] = task.model_copy(update={"result": tasks[0].result})
    assert failed(check(tasks, tmp_path)) == set()


def test_invariants_catch_a_task_left_open(tmp_path: Path) -> None:
    tasks = clean_run(tmp_path)
    tasks.append(make_task("open", "write_report", status=TaskStatus.PENDING, runs=0))
    assert failed(check(tasks, tmp_path)) == {"every task terminal"}


def test_invariants_catch_a_poison_task_that_stopped_early(tmp_path: Path) -> None:
    tasks = clean_run(tmp_path)
    tasks[3] = make_task("poison", "make_thumbnail", status=TaskStatus.FAILED, runs=2, max_retries=2)
    assert failed(check(tasks, tmp_path)) == {"poison task exhausted its retries"}


def test_invariants_catch_a_hung_task_that_failed_otherwise(tmp_path: Path) -> None:
    tasks = clean_run(tmp_path)
    tasks[4] = make_task("hung", "verify_address", status=TaskStatus.FAILED, max_retries=0, last_outcome="error")
    assert failed(check(tasks, tmp_path)) == {"hung task stopped at its deadline"}


def test_invariants_catch_a_missing_output_file(tmp_path: Path) -> None:
    tasks = clean_run(tmp_path)
    (tmp_path / "thumbs" / "t1.png").unlink()
    assert failed(check(tasks, tmp_path)) == {"every output file exists"}


def test_invariants_catch_a_mail_file_without_a_completed_email(tmp_path: Path) -> None:
    tasks = clean_run(tmp_path)
    mailbox_file(tmp_path / "mail", "<stray@kubeque.example>").write_text("mail")
    assert failed(check(tasks, tmp_path)) == {"one mail file per completed email"}


def test_invariants_catch_a_missing_task(tmp_path: Path) -> None:
    tasks = clean_run(tmp_path)
    results = check_invariants(tasks, expected_total=6, poison_id="poison", hung_id="hung", output_dir=tmp_path)
    assert {i.name for i in results if not i.ok} == {"all tasks stored"}


# --- workload and summary --------------------------------------------------------


def test_workload_adds_poison_and_hung_first_and_urgent_emails_last(tmp_path: Path) -> None:
    work = plan_workload(200, [tmp_path / "a.png"], tmp_path / "bad.jpg")
    assert len(work.specs) == 200
    assert [s["id"] for s in work.specs[:2]] == [work.poison_id, work.hung_id]
    urgent = work.counts["urgent_email"]
    assert all(s["priority"] == URGENT_PRIORITY for s in work.specs[-urgent:])
    assert all(s.get("priority", 0) != URGENT_PRIORITY for s in work.specs[:-urgent])
    assert sum(work.counts.values()) == 200
    assert work.counts["poison"] == work.counts["hung"] == 1


def test_percentiles_use_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None}


@pytest.mark.parametrize("total", [20, 2000])
def test_workload_fills_every_kind(total: int, tmp_path: Path) -> None:
    work = plan_workload(total, [tmp_path / "a.png"], tmp_path / "bad.jpg")
    assert set(work.counts) == {"thumbnail", "email", "urgent_email", "address_check", "report", "poison", "hung"}
    assert all(n >= 1 for n in work.counts.values())

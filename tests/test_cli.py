"""The ``kubeque`` command, run as a real process against a real PostgreSQL.

Every error a user can cause ends as one line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.apps.e2e_app:queue"
UNREACHABLE_DSN = "postgresql://nobody@127.0.0.1:1/x"


def kubeque(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("KUBEQUE_DSN", "DATABASE_URL", "KUBEQUE_SCHEMA")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kubeque", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    proc = kubeque(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def ok_json(*args: str) -> Any:
    return json.loads(ok(*args, "--json"))


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def store(pg_dsn: str, pg_schema: str) -> list[str]:
    """``--dsn DSN --schema NAME`` of a freshly migrated queue."""
    ok("migrate", "--dsn", pg_dsn, "--schema", pg_schema)
    return ["--dsn", pg_dsn, "--schema", pg_schema]


# --- help --------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    out = ok("--help")
    for command in ("worker", "migrate", "tasks", "stats", "demo"):
        assert command in out


@pytest.mark.parametrize(
    "command", [["worker"], ["migrate"], ["tasks"], ["tasks", "add"], ["tasks", "ls"], ["tasks", "show"],
                ["tasks", "retry"], ["tasks", "rm"], ["stats"]]
)
def test_every_command_has_help(command: list[str]) -> None:
    assert "Usage:" in ok(*command, "--help")


def test_console_script_runs() -> None:
    script = Path(sys.executable).with_name("kubeque")
    if not script.exists():
        pytest.skip("the kubeque console script is not installed beside this interpreter")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert "worker" in proc.stdout


# --- migrate -----------------------------------------------------------------


def test_migrate_applies_versions_once(pg_dsn: str, pg_schema: str) -> None:
    first = ok_json("migrate", "--dsn", pg_dsn, "--schema", pg_schema)
    assert first["schema"] == pg_schema
    assert first["applied"] and first["applied"][0] == 1
    again = ok_json("migrate", "--dsn", pg_dsn, "--schema", pg_schema)
    assert again["applied"] == []
    assert "up to date" in ok("migrate", "--dsn", pg_dsn, "--schema", pg_schema)


def test_migrate_reads_dsn_and_schema_from_environment(pg_dsn: str, pg_schema: str) -> None:
    out = ok("migrate", env={"KUBEQUE_DSN": pg_dsn, "KUBEQUE_SCHEMA": pg_schema})
    assert "applied migrations" in out
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = 'tasks'",
            [pg_schema],
        ).fetchone()
    assert row is not None and row[0] == 1


# --- tasks -------------------------------------------------------------------


def test_add_then_show_returns_the_stored_task(store: list[str]) -> None:
    added = ok_json("tasks", "add", "ok", '{"n": 1}', "--priority", "5", "--max-retries", "2", "--id", "t-1", *store)
    assert added["id"] == "t-1"
    assert added["payload"] == {"n": 1}
    assert added["priority"] == 5
    assert added["max_retries"] == 2
    assert added["status"] == "pending"
    shown = ok_json("tasks", "show", "t-1", *store)
    assert shown == added
    assert "t-1" in ok("tasks", "show", "t-1", *store)


def test_add_with_delay_schedules_later(store: list[str]) -> None:
    added = ok_json("tasks", "add", "ok", "{}", "--delay", "3600", *store)
    assert added["run_at"] > added["created_at"]
    stats = ok_json("stats", *store)
    assert stats["counts"]["pending"] == 1
    assert stats["oldest_pending_age_s"] is None  # not due yet


def test_add_with_app_validates_against_registered_handlers(store: list[str]) -> None:
    added = ok_json("tasks", "add", "sleep", '{"seconds": 1}', "--app", APP, *store)
    assert added["handler"] == "sleep"


def test_ls_lists_in_insertion_order_and_filters_by_status(store: list[str]) -> None:
    for i in range(3):
        ok("tasks", "add", "ok", json.dumps({"n": i}), "--id", f"t{i}", *store)
    ok("tasks", "rm", "t1", *store)
    listed = ok_json("tasks", "ls", *store)
    assert [t["id"] for t in listed] == ["t0", "t1", "t2"]
    pending = ok_json("tasks", "ls", "--status", "pending", *store)
    assert [t["id"] for t in pending] == ["t0", "t2"]
    assert len(ok_json("tasks", "ls", "--limit", "1", *store)) == 1
    table = ok("tasks", "ls", *store)
    assert "t0" in table and "t2" in table


def test_retry_returns_a_finished_task_to_pending(store: list[str]) -> None:
    ok("tasks", "add", "ok", "{}", "--id", "r1", *store)
    ok("tasks", "rm", "r1", *store)
    assert ok_json("tasks", "show", "r1", *store)["status"] == "deleted"
    retried = ok_json("tasks", "retry", "r1", *store)
    assert retried["status"] == "pending"
    assert "pending again" in ok("tasks", "retry", "r1", *store)


def test_rm_soft_marks_deleted_and_hard_deletes(store: list[str]) -> None:
    ok("tasks", "add", "ok", "{}", "--id", "d1", *store)
    assert "marked deleted" in ok("tasks", "rm", "d1", *store)
    assert ok_json("tasks", "show", "d1", *store)["status"] == "deleted"
    ok("tasks", "rm", "d1", "--hard", *store)
    assert_one_line_error(kubeque("tasks", "show", "d1", *store), "no task with id 'd1'")
    assert_one_line_error(kubeque("tasks", "rm", "d1", *store), "no task with id 'd1'")


def test_stats_counts_by_status(store: list[str]) -> None:
    ok("tasks", "add", "ok", "{}", "--id", "s1", *store)
    ok("tasks", "add", "ok", "{}", "--id", "s2", *store)
    ok("tasks", "rm", "s2", *store)
    stats = ok_json("stats", *store)
    assert stats["counts"]["pending"] == 1
    assert stats["counts"]["deleted"] == 1
    assert stats["oldest_pending_age_s"] is not None
    table = ok("stats", *store)
    assert "pending" in table and "deleted" in table


# --- errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["stats"],
        ["tasks", "ls"],
        ["tasks", "add", "ok", "{}"],
        ["migrate"],
    ],
)
def test_unreachable_server_is_one_line(args: list[str]) -> None:
    line = assert_one_line_error(kubeque(*args, "--dsn", UNREACHABLE_DSN, "--schema", "q"))
    assert "127.0.0.1:1" in line


def test_malformed_dsn_is_one_line() -> None:
    assert_one_line_error(kubeque("stats", "--dsn", "this is not a dsn"), "DSN")


def test_no_dsn_at_all_is_one_line() -> None:
    assert_one_line_error(kubeque("tasks", "ls"), "--dsn")


def test_invalid_json_payload_is_one_line(store: list[str]) -> None:
    assert_one_line_error(kubeque("tasks", "add", "ok", "{not json", *store), "not valid JSON")
    assert_one_line_error(kubeque("tasks", "add", "ok", "[1, 2]", *store), "JSON object")
    assert ok_json("tasks", "ls", *store) == []


def test_unknown_handler_with_app_is_one_line(store: list[str]) -> None:
    assert_one_line_error(kubeque("tasks", "add", "nosuch", "{}", "--app", APP, *store), "'nosuch'")
    assert ok_json("tasks", "ls", *store) == []


def test_missing_schema_is_one_line_and_not_created(pg_dsn: str, pg_schema: str) -> None:
    for args in (["stats"], ["tasks", "ls"], ["tasks", "show", "x"], ["tasks", "add", "ok", "{}"]):
        assert_one_line_error(kubeque(*args, "--dsn", pg_dsn, "--schema", pg_schema), "kubeque migrate")
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s"), [pg_schema]
        ).fetchone()
    assert row is not None and row[0] == 0


def test_invalid_schema_name_is_one_line(pg_dsn: str) -> None:
    assert_one_line_error(kubeque("stats", "--dsn", pg_dsn, "--schema", "Bad-Name"), "invalid schema name")


@pytest.mark.parametrize(
    ("app", "fragment"),
    [
        ("no.such.module:queue", "cannot import"),
        ("tests.apps.e2e_app:nothing", "no attribute"),
        ("tests.apps.e2e_app:ok", "not a kubeque QueueManager"),
        ("missing-colon", "package.module:queue"),
    ],
)
def test_bad_app_is_one_line(store: list[str], app: str, fragment: str) -> None:
    assert_one_line_error(kubeque("tasks", "add", "ok", "{}", "--app", app, *store), fragment)
    assert_one_line_error(kubeque("worker", "--app", app, *store), fragment)


def test_worker_with_unreachable_server_is_one_line() -> None:
    assert_one_line_error(
        kubeque("worker", "--app", APP, "--dsn", UNREACHABLE_DSN, "--log-level", "error"), "127.0.0.1:1"
    )


def test_demo_is_listed_even_if_it_cannot_load() -> None:
    # Whether or not the demo package is importable here, the rest of the CLI works
    # and `kubeque demo` fails (if it does) with one line, not a traceback.
    proc = kubeque("demo", "--help")
    if proc.returncode != 0:
        assert_one_line_error(proc)

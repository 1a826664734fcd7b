"""The ``kubeque`` command, run as a real process against a real PostgreSQL.

Every error a user can cause ends as one line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.apps.e2e_app:queue"
UNREACHABLE_DSN = "postgresql://nobody@127.0.0.1:1/x"
NO_APP_NOTE = "note: without --app the handler name and payload are not checked"
CLOCK = re.compile(r"\b\d\d:\d\d:\d\d\b")


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


def ok_json(*args: str, env: dict[str, str] | None = None) -> Any:
    return json.loads(ok(*args, "--json", env=env))


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


def write_app(folder: Path, module: str, body: str) -> dict[str, str]:
    """Write an app module into ``folder``; return the environment that makes it importable."""
    (folder / f"{module}.py").write_text("from kubeque import QueueManager\n\n" + body)
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(ROOT), str(ROOT / "src")])}


def schema_exists(dsn: str, schema: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", [schema]
        ).fetchone()
    return row is not None and row[0] == 1


# --- help --------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    out = ok("--help")
    for command in ("worker", "migrate", "tasks", "stats", "demo"):
        assert command in out


@pytest.mark.parametrize(
    "command",
    [
        ["worker"],
        ["migrate"],
        ["tasks"],
        ["tasks", "add"],
        ["tasks", "ls"],
        ["tasks", "show"],
        ["tasks", "retry"],
        ["tasks", "rm"],
        ["stats"],
    ],
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
    assert "task r1 is pending again" in ok("tasks", "retry", "r1", *store)
    assert ok_json("tasks", "show", "r1", *store)["status"] == "pending"
    # Retrying a task that is already waiting changes nothing, and says so.
    assert "task r1 is already pending" in ok("tasks", "retry", "r1", *store)


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


def test_add_without_app_notes_on_stderr_that_nothing_was_checked(store: list[str]) -> None:
    proc = kubeque("tasks", "add", "anything", '{"n": 1}', "--json", *store)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["handler"] == "anything"  # stdout stays pure JSON
    assert NO_APP_NOTE in proc.stderr
    assert "--app module:queue" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    with_app = kubeque("tasks", "add", "ok", "{}", "--app", APP, *store)
    assert with_app.returncode == 0, with_app.stderr
    assert NO_APP_NOTE not in with_app.stderr


def add_ids(store: list[str], count: int, handler: str = "ok") -> list[str]:
    return [ok_json("tasks", "add", handler, json.dumps({"n": i}), *store)["id"] for i in range(count)]


def test_ls_table_fits_80_columns_with_short_ids_and_compact_times(store: list[str]) -> None:
    ids = add_ids(store, 3, handler="send_a_welcome_email_to_a_new_customer_account")
    table = ok("tasks", "ls", *store, env={"COLUMNS": "80"})
    lines = table.splitlines()
    assert all(len(line) <= 80 for line in lines), table
    for task_id in ids:
        assert task_id not in table  # whole UUIDs are for --json
        rows = [line for line in lines if line.startswith(task_id[:8])]
        assert len(rows) == 1, table  # one line per task, nothing folded
        assert "pending" in rows[0]
        assert len(CLOCK.findall(rows[0])) == 2, rows[0]  # run at, updated: HH:MM:SS today
        assert "-" not in rows[0].split("pending")[1]  # no dates for today's times
    assert "3 tasks" in table
    assert [t["id"] for t in ok_json("tasks", "ls", *store)] == ids


def test_ls_says_when_the_limit_cut_the_list(store: list[str]) -> None:
    add_ids(store, 3)
    assert "showing 2 of 3 tasks; --limit 0 for all" in ok("tasks", "ls", "--limit", "2", *store)
    proc = kubeque("tasks", "ls", "--limit", "2", "--json", *store)
    assert len(json.loads(proc.stdout)) == 2
    assert "showing 2 of 3 tasks" in proc.stderr
    everything = ok("tasks", "ls", "--limit", "0", *store)
    assert "showing" not in everything and "3 tasks" in everything
    assert "showing" not in ok("tasks", "ls", "--limit", "3", *store)


def test_ls_newest_lists_newest_first(store: list[str]) -> None:
    ids = add_ids(store, 3)
    assert [t["id"] for t in ok_json("tasks", "ls", "--newest", *store)] == ids[::-1]
    assert [t["id"] for t in ok_json("tasks", "ls", "--newest", "--limit", "1", *store)] == [ids[-1]]
    assert "showing the newest 1 of 3 tasks" in ok("tasks", "ls", "--newest", "--limit", "1", *store)


def test_show_retry_and_rm_take_a_unique_id_prefix(store: list[str]) -> None:
    (task_id,) = add_ids(store, 1)
    prefix = task_id[:6]
    assert ok_json("tasks", "show", prefix, *store)["id"] == task_id
    assert f"task {task_id} marked deleted" in ok("tasks", "rm", prefix, *store)
    assert f"task {task_id} is pending again" in ok("tasks", "retry", task_id[:4], *store)
    assert ok_json("tasks", "retry", prefix, *store)["status"] == "pending"
    ok("tasks", "rm", prefix, "--hard", *store)
    assert_one_line_error(kubeque("tasks", "show", prefix, *store), f"no task with id {prefix!r}")


def test_ambiguous_or_short_id_prefix_is_a_clear_error(store: list[str]) -> None:
    for suffix in ("1", "2", "3"):
        ok("tasks", "add", "ok", "{}", "--id", f"same-prefix-{suffix}", *store)
    for command in (["show"], ["retry"], ["rm"]):
        line = assert_one_line_error(kubeque("tasks", *command, "same-pre", *store), "matches 3 tasks")
        assert "same-prefix-1, same-prefix-2, same-prefix-3" in line
    line = assert_one_line_error(kubeque("tasks", "show", "sam", *store), "no task with id 'sam'")
    assert "at least 4 characters" in line
    assert ok_json("tasks", "show", "same-prefix-2", *store)["id"] == "same-prefix-2"  # an exact id wins


def test_show_prints_attempt_times_compactly(pg_dsn: str, pg_schema: str, store: list[str]) -> None:
    from kubeque import QueueManager

    def flaky(payload: dict[str, Any]) -> None:
        raise RuntimeError("no luck")

    qm = QueueManager({"type": "postgres", "dsn": pg_dsn, "schema": pg_schema}, retry_backoff_ms=0)
    qm.register("flaky", flaky)
    try:
        task = qm.sync.add_task("flaky", {}, max_retries=1)
        assert task is not None
        qm.sync.run_worker(until_idle=True)
    finally:
        qm.sync.close()
    shown = ok("tasks", "show", task.id, *store, env={"COLUMNS": "120"})
    attempts = shown[shown.index("attempts") :]
    assert not re.search(r"\d{4}-\d\d-\d\dT", attempts)  # no raw ISO timestamps
    rows = [line for line in attempts.splitlines() if "no luck" in line]
    assert len(rows) == 2, attempts
    for row in rows:
        assert CLOCK.search(row) and ("ms" in row or " s " in row), row
    assert ok_json("tasks", "show", task.id, *store)["log"][0]["started_at"].count("T") == 1  # JSON keeps ISO


def test_app_on_postgres_takes_schema_without_dsn(
    pg_dsn: str, pg_schema: str, store: list[str], tmp_path: Path
) -> None:
    env = write_app(
        tmp_path,
        "pg_app_cli",
        f"queue = QueueManager({{'type': 'postgres', 'dsn': {pg_dsn!r}, "
        f"'schema': 'never_used_by_this_test'}})\n\n@queue.handler()\ndef ok(payload: dict) -> None: ...\n",
    )
    added = json.loads(
        ok("tasks", "add", "ok", "{}", "--app", "pg_app_cli:queue", "--schema", pg_schema, "--json", env=env)
    )
    assert ok_json("tasks", "show", added["id"], *store)["id"] == added["id"]
    assert not schema_exists(pg_dsn, "never_used_by_this_test")


def test_live_progress_ends_its_last_line_off_a_terminal() -> None:
    from rich.console import Console

    from kubeque.demo.progress import LiveProgress, Snapshot

    out = io.StringIO()
    console = Console(file=out, width=100)
    with LiveProgress(console) as progress:
        progress.update(Snapshot(1.0, 10, 10, {"completed": 10}, 3, 3, "running"))
    console.print("kubeque demo: summary")
    assert "\nkubeque demo: summary\n" in out.getvalue()


# --- worker --------------------------------------------------------------------


def test_worker_no_migrate_refuses_a_missing_schema_in_one_line(pg_dsn: str, pg_schema: str) -> None:
    proc = kubeque("worker", "--app", APP, "--dsn", pg_dsn, "--schema", pg_schema, "--no-migrate")
    line = assert_one_line_error(proc, f"kubeque migrate --dsn {pg_dsn} --schema {pg_schema}")
    assert "--no-migrate" in line
    assert not schema_exists(pg_dsn, pg_schema)


def run_worker_until(
    args: list[str], marker: str, log_path: Path, env: dict[str, str] | None = None, timeout: float = 20
) -> tuple[int, str]:
    """Start ``kubeque worker``, wait for ``marker`` in its log, SIGTERM it; return (exit status, log)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("KUBEQUE_DSN", "DATABASE_URL", "KUBEQUE_SCHEMA")}
    full_env.update(env or {})
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubeque", "worker", *args],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout
            while marker not in log_path.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, f"no {marker!r} within {timeout}s:\n{log_path.read_text()}"
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return code, log_path.read_text()


def test_worker_with_schema_but_no_dsn_uses_the_apps_postgres(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    env = write_app(
        tmp_path,
        "pg_app_worker",
        f"queue = QueueManager({{'type': 'postgres', 'dsn': {pg_dsn!r}, "
        f"'schema': 'never_used_by_this_test'}})\n\n@queue.handler()\ndef ok(payload: dict) -> None: ...\n",
    )
    code, log = run_worker_until(
        ["--app", "pg_app_worker:queue", "--schema", pg_schema], "started:", tmp_path / "worker.log", env=env
    )
    assert code == 0, log
    assert f"schema {pg_schema!r}" in log
    assert schema_exists(pg_dsn, pg_schema)
    assert not schema_exists(pg_dsn, "never_used_by_this_test")


def test_worker_refuses_to_start_when_the_app_registers_no_handlers(
    pg_dsn: str, pg_schema: str, tmp_path: Path
) -> None:
    env = write_app(tmp_path, "empty_app", "queue = QueueManager(name='empty')\n")
    proc = kubeque("worker", "--app", "empty_app:queue", "--dsn", pg_dsn, "--schema", pg_schema, env=env)
    assert_one_line_error(proc, "registers no handlers", "--app empty_app:queue")


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


def test_unknown_handler_with_app_names_the_registered_ones_and_gives_shell_advice(store: list[str]) -> None:
    line = assert_one_line_error(kubeque("tasks", "add", "sleeep", "{}", "--app", APP, *store), "'sleeep'")
    assert "registered: boom, ok, sleep, sleep_sync, slow_first" in line
    assert "did you mean 'sleep'" in line
    assert "check" in line and "--app" in line
    assert "validate_handlers" not in line  # a QueueManager argument means nothing in a shell


def test_missing_schema_error_gives_the_migrate_command_not_python_advice(pg_dsn: str, pg_schema: str) -> None:
    line = assert_one_line_error(kubeque("tasks", "ls", "--dsn", pg_dsn, "--schema", pg_schema))
    assert f"kubeque migrate --dsn {pg_dsn} --schema {pg_schema}" in line
    assert "auto_migrate" not in line


def test_missing_schema_advice_never_shows_a_password() -> None:
    from kubeque.app import dsn_for_display

    shown = dsn_for_display("postgresql://app:s3cret@db.example:5432/shop")
    assert "s3cret" not in shown and "***" in shown and "db.example" in shown
    assert dsn_for_display("postgresql://app@db.example/shop") == "postgresql://app@db.example/shop"


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


def test_a_dsn_from_the_environment_keeps_the_apps_own_schema(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    ok("migrate", "--dsn", pg_dsn, "--schema", pg_schema)
    env = write_app(
        tmp_path,
        "pg_app",
        f'queue = QueueManager({{"type": "postgres", "dsn": {pg_dsn!r}, "schema": {pg_schema!r}}})\n'
        "queue.register('ok', lambda p: None)\n",
    )
    for var in ("DATABASE_URL", "KUBEQUE_DSN"):
        added = ok_json("tasks", "add", "ok", "{}", "--app", "pg_app:queue", env={**env, var: pg_dsn})
        listed = ok_json("tasks", "ls", "--dsn", pg_dsn, "--schema", pg_schema)
        assert added["id"] in [t["id"] for t in listed], var


def test_database_url_does_not_move_an_app_off_its_own_store(pg_dsn: str, tmp_path: Path) -> None:
    tasks_file = tmp_path / "tasks.json"
    env = write_app(
        tmp_path,
        "file_app",
        f'queue = QueueManager({{"type": "file", "path": {str(tasks_file)!r}}})\n'
        'queue.register("ok", lambda p: None)\n',
    )
    added = ok_json("tasks", "add", "ok", "{}", "--app", "file_app:queue", env={**env, "DATABASE_URL": pg_dsn})
    assert added["id"] in tasks_file.read_text()

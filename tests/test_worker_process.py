"""End to end: real ``kubeque worker`` processes against a real PostgreSQL.

Each worker runs ``tests.apps.e2e_app:queue`` in a subprocess with its own
application_name, so a test can find (and terminate) exactly its own database
sessions even when other suites share the server. Conditions are polled, never
slept for; every process is killed at teardown whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.rows import dict_row

from kubeque import QueueManager

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.apps.e2e_app:queue"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class WorkerProcess:
    """One ``python -m kubeque worker`` subprocess, its log file and its HTTP port."""

    def __init__(self, dsn: str, schema: str, log_path: Path, app_name: str, *args: str) -> None:
        self.port = free_port()
        self.app_name = app_name
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubeque",
                "worker",
                "--app",
                APP,
                "--dsn",
                dsn,
                "--schema",
                schema,
                "--application-name",
                app_name,
                "--metrics-host",
                "127.0.0.1",
                "--metrics-port",
                str(self.port),
                "--stats-interval",
                "0.3",
                "--log-level",
                "debug",
                *args,
            ],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k not in ("KUBEQUE_DSN", "DATABASE_URL")},
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def wait_ready(self, timeout: float = 20) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            return self.get("/readyz")[0] == 200

        wait_until(ready, timeout, "the worker to become ready")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit within {timeout}s:\n{self.log()}") from None

    def metrics(self) -> dict[str, float]:
        """Every sample as ``name{label=value,...}`` -> value, labels sorted."""
        status, text = self.get("/metrics")
        assert status == 200
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def spawn(pg_dsn: str, pg_schema: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers on the test's queue; all are killed at teardown."""
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        n = len(started)
        app_name = f"kq-{pg_schema}-{n}"
        worker = WorkerProcess(pg_dsn, pg_schema, tmp_path / f"worker-{n}.log", app_name, *args)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture
def queue(pg_dsn: str, pg_schema: str) -> Iterator[QueueManager]:
    """The test's own handle on the queue, for adding tasks (migrates the schema)."""
    qm = QueueManager(
        {"type": "postgres", "dsn": pg_dsn, "schema": pg_schema, "application_name": "kubeque-test"},
        validate_handlers=False,
        retry_backoff_ms=0,
    )
    qm.sync.stats()
    try:
        yield qm
    finally:
        qm.sync.close()


def tasks(dsn: str, schema: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute(sql.SQL("SELECT * FROM {}.tasks ORDER BY seq").format(sql.Identifier(schema))).fetchall()
    return {r["id"]: r for r in rows}


def backends(dsn: str, app_prefix: str) -> list[dict[str, Any]]:
    """This worker's sessions (pool and listener), by application_name prefix."""
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT pid, application_name, query FROM pg_stat_activity WHERE application_name LIKE %s",
            [app_prefix.replace("_", r"\_") + "%"],
        ).fetchall()


def terminate(dsn: str, pids: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])


def statuses(dsn: str, schema: str, *ids: str) -> dict[str, str]:
    found = tasks(dsn, schema)
    return {i: found[i]["status"] for i in ids}


def lines_about(log: str, task_id: str, level: str) -> list[str]:
    """Text log lines at ``level`` that name ``task_id``."""
    return [line for line in log.splitlines() if f" {level} " in line and task_id in line]


# --- shutdown ------------------------------------------------------------------


def test_sigterm_drains_and_returns_unfinished_tasks_without_spending_an_attempt(
    spawn: Callable[..., WorkerProcess], queue: QueueManager, pg_dsn: str, pg_schema: str
) -> None:
    q = queue.sync
    q.add_task("sleep", {"seconds": 1.0}, id="short-1", priority=10)
    q.add_task("sleep", {"seconds": 1.0}, id="short-2", priority=10)
    q.add_task("sleep", {"seconds": 60}, id="long-async", priority=10)
    q.add_task("sleep_sync", {"seconds": 60}, id="long-thread", priority=10)
    q.add_task("ok", {}, id="waiting-1")
    q.add_task("ok", {}, id="waiting-2")
    worker = spawn("--concurrency", "4", "--grace", "2.5")
    running = ("short-1", "short-2", "long-async", "long-thread")
    wait_until(lambda: set(statuses(pg_dsn, pg_schema, *running).values()) == {"processing"}, 20, "four running tasks")

    worker.signal(signal.SIGTERM)
    wait_until(lambda: worker.get("/readyz")[0] != 200, 2, "readiness to drop at SIGTERM")
    started = time.monotonic()
    assert worker.wait_exit(15) == 0, worker.log()
    assert time.monotonic() - started < 2.5 + 3

    found = tasks(pg_dsn, pg_schema)
    assert len(found) == 6
    for tid in ("short-1", "short-2"):
        assert found[tid]["status"] == "completed"
        assert found[tid]["attempt"] == 1
    for tid in ("long-async", "long-thread"):
        assert found[tid]["status"] == "pending"
        assert found[tid]["retry_count"] == 0
        assert found[tid]["log"][-1]["outcome"] == "released"
    for tid in ("waiting-1", "waiting-2"):
        assert found[tid]["status"] == "pending"
        assert found[tid]["attempt"] == 0  # never taken after SIGTERM


def test_second_signal_exits_at_once(
    spawn: Callable[..., WorkerProcess], queue: QueueManager, pg_dsn: str, pg_schema: str
) -> None:
    queue.sync.add_task("sleep", {"seconds": 60}, id="long")
    worker = spawn("--grace", "60")
    wait_until(lambda: statuses(pg_dsn, pg_schema, "long")["long"] == "processing", 20, "the task to start")
    worker.signal(signal.SIGTERM)
    wait_until(lambda: "draining" in worker.log(), 5, "the drain to begin")
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(5) == 128 + signal.SIGTERM
    # Left for lease expiry: still held by the dead worker.
    assert statuses(pg_dsn, pg_schema, "long")["long"] == "processing"


def test_second_ctrl_c_exits_130(
    spawn: Callable[..., WorkerProcess], queue: QueueManager, pg_dsn: str, pg_schema: str
) -> None:
    queue.sync.add_task("sleep", {"seconds": 60}, id="long")
    worker = spawn("--grace", "60")
    wait_until(lambda: statuses(pg_dsn, pg_schema, "long")["long"] == "processing", 20, "the task to start")
    worker.signal(signal.SIGINT)
    wait_until(lambda: "draining" in worker.log(), 5, "the drain to begin")
    worker.signal(signal.SIGINT)
    assert worker.wait_exit(5) == 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C


# --- crashes and lost connections ----------------------------------------------


def test_sigkill_mid_task_is_reclaimed_by_another_worker_within_allowed_attempts(
    spawn: Callable[..., WorkerProcess], queue: QueueManager, pg_dsn: str, pg_schema: str
) -> None:
    queue.sync.add_task("slow_first", {"seconds": 60}, id="retryable", max_retries=1)
    queue.sync.add_task("slow_first", {"seconds": 60}, id="no-retries", max_retries=0)
    first = spawn("--concurrency", "2", "--lease-ms", "1000", "--worker-id", "first")
    wait_until(
        lambda: set(statuses(pg_dsn, pg_schema, "retryable", "no-retries").values()) == {"processing"},
        20,
        "both tasks to start in the first worker",
    )
    first.signal(signal.SIGKILL)
    first.wait_exit(5)

    second = spawn("--concurrency", "2", "--lease-ms", "1000", "--worker-id", "second")
    wait_until(
        lambda: (
            statuses(pg_dsn, pg_schema, "retryable", "no-retries") == {"retryable": "completed", "no-retries": "failed"}
        ),
        20,
        "the second worker to reclaim both tasks",
    )
    found = tasks(pg_dsn, pg_schema)
    retryable, once = found["retryable"], found["no-retries"]
    log = second.log()
    (reclaimed,) = lines_about(log, "retryable", "WARNING")
    assert "reclaimed" in reclaimed and "will be retried" in reclaimed and "outcome=lost" in reclaimed
    (lost,) = lines_about(log, "no-retries", "WARNING")
    assert "failed for good" in lost and "outcome=lost" in lost and "lease expired" in lost
    assert retryable["attempt"] == 2
    assert retryable["retry_count"] == 1
    assert retryable["result"] == {"attempt": 2}
    assert [e["outcome"] for e in retryable["log"]] == ["lost", "completed"]
    assert [e["worker"] for e in retryable["log"]] == ["first", "second"]
    assert once["attempt"] == 1  # max_retries=0: the lost attempt was its only one
    assert [e["outcome"] for e in once["log"]] == ["lost"]


def test_terminated_listener_is_reestablished_and_wakes_the_worker(
    spawn: Callable[..., WorkerProcess], queue: QueueManager, pg_dsn: str, pg_schema: str
) -> None:
    # A 30 s poll interval: only a NOTIFY can make pickup prompt.
    worker = spawn("--poll-interval", "30")
    worker.wait_ready()
    listen_name = f"{worker.app_name}-listen"

    def listener_pid() -> int | None:
        for b in backends(pg_dsn, worker.app_name):
            if b["application_name"] == listen_name and b["query"].upper().startswith("LISTEN"):
                return int(b["pid"])
        return None

    old_pid = wait_until(listener_pid, 10, "the LISTEN session")
    queue.sync.add_task("ok", {}, id="before")
    wait_until(lambda: statuses(pg_dsn, pg_schema, "before")["before"] == "completed", 3, "a notified pickup")

    terminate(pg_dsn, [old_pid])
    wait_until(lambda: (pid := listener_pid()) is not None and pid != old_pid, 10, "a new LISTEN session")
    queue.sync.add_task("ok", {}, id="after")
    wait_until(lambda: statuses(pg_dsn, pg_schema, "after")["after"] == "completed", 3, "a pickup after reconnect")
    assert worker.proc.poll() is None


def test_connections_killed_mid_task_lose_no_completion(
    spawn: Callable[..., WorkerProcess], queue: QueueManager, pg_dsn: str, pg_schema: str
) -> None:
    worker = spawn("--concurrency", "2", "--poll-interval", "0.5")
    worker.wait_ready()
    queue.sync.add_task("sleep", {"seconds": 1.0}, id="survivor")
    wait_until(lambda: statuses(pg_dsn, pg_schema, "survivor")["survivor"] == "processing", 10, "the task to start")

    # Keep cutting every session the worker opens until well after the handler
    # returned, so the completion's first writes meet dead connections.
    killed = 0
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        pids = [int(b["pid"]) for b in backends(pg_dsn, worker.app_name)]
        terminate(pg_dsn, pids)
        killed += len(pids)
        time.sleep(0.05)
    assert killed > 0
    # The completion may land between two kills (the pool replaces a dead
    # connection at checkout): what matters is that it lands, once, on attempt 1.

    wait_until(lambda: statuses(pg_dsn, pg_schema, "survivor")["survivor"] == "completed", 30, "the completion to land")
    survivor = tasks(pg_dsn, pg_schema)["survivor"]
    assert survivor["attempt"] == 1
    assert survivor["retry_count"] == 0
    assert survivor["result"] == {"slept": 1.0}

    queue.sync.add_task("ok", {}, id="later")
    wait_until(lambda: statuses(pg_dsn, pg_schema, "later")["later"] == "completed", 10, "the worker to go on")
    assert worker.proc.poll() is None
    wait_until(lambda: worker.get("/readyz")[0] == 200, 10, "readiness to recover")


# --- metrics and probes ----------------------------------------------------------


def test_metrics_match_the_database_after_a_run(
    spawn: Callable[..., WorkerProcess], queue: QueueManager, pg_dsn: str, pg_schema: str
) -> None:
    q = queue.sync
    for i in range(5):
        q.add_task("ok", {"n": i})
    for i in range(3):
        q.add_task("boom", {"n": i}, max_retries=0)
    for i in range(2):
        q.add_task("boom", {"n": i}, max_retries=1)
    worker = spawn("--concurrency", "4")
    worker.wait_ready()

    def finished() -> bool:
        return all(t["status"] in ("completed", "failed") for t in tasks(pg_dsn, pg_schema).values())

    wait_until(finished, 20, "every task to finish")
    found = list(tasks(pg_dsn, pg_schema).values())
    completed = sum(t["status"] == "completed" for t in found)
    failed = sum(t["status"] == "failed" for t in found)
    retried = sum(t["retry_count"] for t in found)
    attempts = sum(t["attempt"] for t in found)
    assert (completed, failed, retried) == (5, 5, 2)

    wait_until(lambda: worker.metrics()["kubeque_queue_pending{queue=e2e}"] == 0, 5, "the depth gauge to refresh")
    m = worker.metrics()

    def total(name: str, **labels: str) -> float:
        want = [f"{k}={v}" for k, v in labels.items()]
        return sum(v for k, v in m.items() if k.startswith(name + "{") and all(w in k for w in want))

    assert total("kubeque_tasks_total", outcome="completed") == completed
    assert total("kubeque_tasks_total", outcome="failed") == failed
    assert total("kubeque_tasks_total", outcome="retried") == retried
    assert total("kubeque_tasks_total", handler="ok", outcome="completed") == 5
    assert total("kubeque_tasks_total", handler="boom", outcome="failed") == 5
    assert total("kubeque_task_retries_total") == retried
    assert total("kubeque_task_duration_seconds_count") == attempts
    assert total("kubeque_task_wait_seconds_count") == attempts
    assert m["kubeque_worker_slots{queue=e2e}"] == 4
    assert m["kubeque_tasks_in_flight{queue=e2e}"] == 0
    assert m["kubeque_queue_oldest_pending_age_seconds{queue=e2e}"] == 0
    assert all(k.split("{")[0].startswith("kubeque_") for k in m if "queue=" in k)

    assert worker.get("/healthz") == (200, "ok\n")
    assert worker.get("/readyz") == (200, "ok\n")
    assert worker.get("/nope")[0] == 404


def test_json_logs_are_one_object_per_line_and_never_carry_payloads(
    spawn: Callable[..., WorkerProcess], queue: QueueManager, pg_dsn: str, pg_schema: str
) -> None:
    worker = spawn("--log-json")
    worker.wait_ready()
    queue.sync.add_task("ok", {"n": 1, "secret": "secret-payload-marker"}, id="logged")
    queue.sync.add_task("boom", {"n": 2, "secret": "secret-payload-marker"}, id="failing", max_retries=0)
    wait_until(
        lambda: statuses(pg_dsn, pg_schema, "logged", "failing") == {"logged": "completed", "failing": "failed"},
        10,
        "both tasks to finish",
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(10) == 0
    lines = [json.loads(line) for line in worker.log().splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in lines)
    events = [e for e in lines if e.get("task_id") == "logged"]
    assert [e["event"] for e in events] == ["task_started", "task_completed"]
    assert not any("secret-payload-marker" in json.dumps(e) for e in lines)
    (failed,) = [e for e in lines if e.get("task_id") == "failing" and e["level"] == "warning"]
    assert failed["event"] == "task_failed" and failed["handler"] == "boom" and failed["attempt"] == 1
    assert failed["outcome"] == "error" and failed["error"] == "ValueError: boom 2"


def test_problems_are_logged_at_info_level_with_ids_and_errors_but_no_payloads(
    spawn: Callable[..., WorkerProcess], queue: QueueManager, pg_dsn: str, pg_schema: str
) -> None:
    q = queue.sync
    marker = {"secret": "secret-payload-marker"}
    q.add_task("boom", {"n": 1, **marker}, id="fails-for-good", max_retries=1)
    q.add_task("nosuch", marker, id="unknown-handler")
    q.add_task("sleep", {"seconds": 30, **marker}, id="times-out", max_processing_time=300, max_retries=1)
    q.add_task("ok", marker, id="fine")
    worker = spawn("--log-level", "info", "--concurrency", "4")
    ids = ("fails-for-good", "unknown-handler", "times-out", "fine")
    wait_until(
        lambda: (
            statuses(pg_dsn, pg_schema, *ids)
            == {"fails-for-good": "failed", "unknown-handler": "failed", "times-out": "failed", "fine": "completed"}
        ),
        20,
        "every task to finish",
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(10) == 0
    log = worker.log()
    assert "secret-payload-marker" not in log
    assert " DEBUG " not in log

    (boom,) = lines_about(log, "fails-for-good", "WARNING")  # its retry stays at debug
    for fragment in (
        "failed for good",
        "handler=boom",
        "attempt=2",
        "retries=1/1",
        "outcome=error",
        "error='ValueError: boom 1'",
    ):
        assert fragment in boom
    (unknown,) = lines_about(log, "unknown-handler", "WARNING")
    assert "failed for good" in unknown and "outcome=unknown_handler" in unknown and "'nosuch'" in unknown
    stuck, final = lines_about(log, "times-out", "WARNING")
    assert "max_processing_time" in stuck and "will be retried" in stuck and "attempt=1" in stuck
    assert "failed for good" in final and "outcome=timeout" in final and "attempt=2" in final
    assert not lines_about(log, "fine", "WARNING") and not lines_about(log, "fine", "INFO")


# --- startup -------------------------------------------------------------------


def test_worker_says_when_it_created_the_schema_and_names_schema_and_database(
    spawn: Callable[..., WorkerProcess], pg_dsn: str, pg_schema: str
) -> None:
    from kubeque.backends.postgres.connect import describe

    worker = spawn("--log-level", "info")
    worker.wait_ready()
    log = worker.log()
    (created,) = [line for line in log.splitlines() if "created the queue schema" in line]
    assert " WARNING " in created and repr(pg_schema) in created and describe(pg_dsn) in created
    (started,) = [line for line in log.splitlines() if "started:" in line and "kubeque.process" in line]
    assert repr(pg_schema) in started and describe(pg_dsn) in started
    assert "1 slot;" in started and "handlers: boom, ok, sleep" in started

    again = spawn("--log-level", "info")  # the schema exists now: nothing to say
    again.wait_ready()
    assert "created the queue schema" not in again.log()


def test_second_worker_on_the_same_metrics_port_names_the_port(
    spawn: Callable[..., WorkerProcess], queue: QueueManager
) -> None:
    first = spawn()
    first.wait_ready()
    second = spawn("--metrics-port", str(first.port))
    assert second.wait_exit(20) == 1
    log = second.log()
    assert (
        f"Error: cannot serve metrics on port {first.port}: address already in use "
        "(pass another --metrics-port or 0 to disable)"
    ) in log
    assert "Errno" not in log and "Traceback" not in log


# --- the same parts in-process, without the CLI ----------------------------------


async def test_metrics_and_probes_work_in_process_without_the_cli() -> None:
    import asyncio

    from kubeque.worker.health import Health, HealthServer
    from kubeque.worker.metrics import Metrics

    qm = QueueManager(name="inproc", retry_backoff_ms=0, poll_interval=0.05)
    qm.register("ok", lambda payload: None)

    def boom(payload: dict[str, Any]) -> None:
        raise RuntimeError("no")

    qm.register("boom", boom)
    metrics = Metrics(qm)
    health = Health()
    server = HealthServer(metrics.registry, health, host="127.0.0.1", port=0).start()
    try:
        for _ in range(3):
            await qm.add_task("ok", {})
        await qm.add_task("boom", {}, max_retries=1)
        worker = await qm.start_worker(2)
        metrics.attach(worker)
        health.worker = worker
        deadline = time.monotonic() + 10
        while (await qm.stats()).counts.get("pending", 0) or worker.in_flight:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await metrics.refresh()
        health.store_checked(None)

        def sample(name: str, **labels: str) -> float | None:
            return metrics.registry.get_sample_value(name, {"queue": "inproc", **labels})

        assert sample("kubeque_tasks_total", handler="ok", outcome="completed") == 3
        assert sample("kubeque_tasks_total", handler="boom", outcome="retried") == 1
        assert sample("kubeque_tasks_total", handler="boom", outcome="failed") == 1
        assert sample("kubeque_task_retries_total", handler="boom") == 1
        assert sample("kubeque_task_duration_seconds_count", handler="ok") == 3
        assert sample("kubeque_task_wait_seconds_count", handler="boom") == 2
        assert sample("kubeque_worker_slots") == 2
        assert sample("kubeque_queue_pending") == 0
        assert b"kubeque_tasks_in_flight" in metrics.exposition()

        def get(path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=2) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert await asyncio.to_thread(get, "/readyz") == 200
        health.stopping = True
        assert await asyncio.to_thread(get, "/readyz") == 503
        assert await asyncio.to_thread(get, "/healthz") == 200
    finally:
        server.stop()
        metrics.detach()
        await qm.close()

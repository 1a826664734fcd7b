"""The synchronous facade, as a plain script uses it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_script_that_never_closes_exits_cleanly(pg_dsn: str, pg_schema: str) -> None:
    script = textwrap.dedent(
        f"""
        from kubeque import QueueManager
        q = QueueManager({{"type": "postgres", "dsn": {pg_dsn!r}, "schema": {pg_schema!r}}},
                         validate_handlers=False)
        t = q.sync.add_task("email", {{"to": "a@example.com"}})
        print(t.status)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pending"
    assert "Task was destroyed" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_ctrl_c_on_run_worker_drains_without_a_traceback(pg_dsn: str, pg_schema: str) -> None:
    import signal
    import time

    script = textwrap.dedent(
        f"""
        import sys, time
        from kubeque import QueueManager
        q = QueueManager({{"type": "postgres", "dsn": {pg_dsn!r}, "schema": {pg_schema!r}}}, poll_interval=0.1)

        @q.handler()
        def work(p):
            time.sleep(0.5)
            return "done"

        t = q.sync.add_task("work", {{}})
        print(t.id, flush=True)
        q.sync.run_worker(1, grace=5)
        print("drained", q.sync.get_task(t.id).status, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(0.3)  # the task is running
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "drained completed" in out

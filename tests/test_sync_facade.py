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

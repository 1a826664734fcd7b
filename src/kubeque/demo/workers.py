"""The demo's worker processes: real ``kubeque worker`` subprocesses, stopped the way Kubernetes stops a pod."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .ports import free_port


@dataclass
class WorkerProcess:
    """One ``kubeque worker`` subprocess and the file its output goes to."""

    index: int
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    metrics_port: int

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def ready(self) -> bool:
        """Whether the worker's /readyz says it is taking tasks."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as reply:
                return bool(reply.status == 200)
        except (OSError, ValueError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


class WorkerPool:
    """Start ``count`` workers for ``app`` on one schema; stop them all, always."""

    def __init__(
        self,
        *,
        count: int,
        app: str,
        app_dir: Path,
        dsn: str,
        schema: str,
        concurrency: int,
        env: dict[str, str],
        log_dir: Path,
        grace: float = 5.0,
    ) -> None:
        self.count = count
        self.app = app
        self.app_dir = app_dir
        self.dsn = dsn
        self.schema = schema
        self.concurrency = concurrency
        self.extra_env = env
        self.log_dir = log_dir
        self.grace = grace
        self.workers: list[WorkerProcess] = []

    def command(self) -> list[str]:
        """The command line of one worker, less its id and metrics port (the DSN goes by environment)."""
        options = {
            "--app": self.app,
            "--schema": self.schema,
            "--concurrency": str(self.concurrency),
            "--grace": str(self.grace),
            "--metrics-host": "127.0.0.1",
        }
        return [sys.executable, "-m", "kubeque", "worker", *(x for pair in options.items() for x in pair)]

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.extra_env)
        # The DSN goes by environment, not argv, so a password never shows in `ps`.
        env["KUBEQUE_DSN"] = self.dsn
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.app_dir), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        for i in range(self.count):
            log_path = self.log_dir / f"worker-{i + 1}.log"
            log_file = log_path.open("wb")
            port = free_port()
            extra = ["--worker-id", f"demo-worker-{i + 1}", "--metrics-port", str(port)]
            process = subprocess.Popen(
                [*self.command(), *extra],
                cwd=self.app_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Own process group: Ctrl-C reaches the demo only, which then stops each worker with SIGTERM.
                process_group=0,
            )
            self.workers.append(WorkerProcess(i + 1, process, log_path, log_file, port))

    def alive(self) -> int:
        return sum(1 for w in self.workers if w.alive)

    def ready(self) -> int:
        return sum(1 for w in self.workers if w.alive and w.ready())

    def exited(self) -> list[WorkerProcess]:
        return [w for w in self.workers if not w.alive]

    def stop(self, timeout: float | None = None) -> dict[int, int | None]:
        """SIGTERM every worker, wait for the drain, kill what is left; return exit codes by worker index."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.grace + 10)
        for w in self.workers:
            if w.alive:
                w.process.send_signal(signal.SIGTERM)  # a no-op for a process that has already exited
        for w in self.workers:
            try:
                w.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
        for w in self.workers:
            w.log_file.close()
        return {w.index: w.process.returncode for w in self.workers}

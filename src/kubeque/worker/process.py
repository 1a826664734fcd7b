"""The long-running worker process behind ``kubeque worker``.

Loads the application's QueueManager, points it at the store, runs a worker
until SIGTERM or SIGINT, serves metrics and probes, and shuts down the way a
Kubernetes pod should: stop taking at once, let running tasks finish within
the grace period, return the rest to pending without spending an attempt,
flush completions, exit 0. A second signal exits at once (status 128 + its
number: 130 for SIGINT, 143 for SIGTERM); whatever was running then is
reclaimed by another worker when its lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import disable_created_metrics

from ..app import (
    DEFAULT_APPLICATION_NAME,
    describe_store,
    load_app,
    missing_schema_error,
    point_at_store,
)
from ..backends.postgres import PostgresRepository
from ..backends.postgres import migrate as migrate_schema
from ..backends.postgres.connect import describe
from ..backends.postgres.queries import migrations
from ..errors import ConfigError, SchemaMissingError, one_line
from ..manager import QueueManager
from .health import Health, HealthServer
from .metrics import Metrics, queue_label
from .runtime import Worker, first_of, plural
from .tasklog import log_state_changes

logger = logging.getLogger("kubeque.process")

#: Handler names listed in the startup line before "and N more".
STARTUP_HANDLERS_SHOWN = 10


def signal_exit_code(signum: int) -> int:
    """Exit status after a second signal cut the drain short: 128 + its number, as a shell reports it."""
    return 128 + int(signum)


def metrics_server_error(host: str, port: int, exc: OSError) -> ConfigError:
    """Why the metrics server could not bind, naming the port and the way out."""
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            f"cannot serve metrics on port {port}: address already in use (pass another --metrics-port or 0 to disable)"
        )
    reason = exc.strerror or one_line(exc)
    return ConfigError(
        f"cannot serve metrics on {host}:{port}: {reason} (check --metrics-host and --metrics-port, or 0 to disable)"
    )


@dataclass
class WorkerOptions:
    """What ``kubeque worker`` was asked to do."""

    app: str
    dsn: str | None = None
    #: the DSN came from $DATABASE_URL, which does not move an app off its own store
    dsn_from_database_url: bool = False
    schema: str | None = None
    concurrency: int = 1
    grace: float = 30.0
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    lease_ms: int | None = None
    poll_interval: float | None = None
    stats_interval: float = 5.0
    summary_interval: float = 60.0
    application_name: str = DEFAULT_APPLICATION_NAME
    worker_id: str | None = None
    #: Create or upgrade a missing or outdated PostgreSQL schema at startup (``--no-migrate``: refuse instead).
    migrate: bool = True


class WorkerProcess:
    """One worker run: build it with options, ``await run()``, get an exit status."""

    def __init__(self, options: WorkerOptions, queue: QueueManager | None = None) -> None:
        if options.concurrency < 1:
            raise ConfigError(f"--concurrency must be >= 1, not {options.concurrency}")
        if options.grace < 0:
            raise ConfigError(f"--grace must be >= 0 seconds, not {options.grace}")
        if options.stats_interval <= 0:
            raise ConfigError(f"--stats-interval must be > 0 seconds, not {options.stats_interval}")
        self.options = options
        self.queue = queue if queue is not None else load_app(options.app)
        if not self.queue.handlers.names():
            # It would take every task and fail each one as unknown_handler.
            raise ConfigError(
                f"--app {options.app} registers no handlers, so this worker would fail every task it takes; "
                "point --app at the module that registers them (with @queue.handler())"
            )
        own = self.queue.repository
        # An app that set auto_migrate=False on its own store keeps that choice unless --dsn replaces the store.
        app_migrates = (
            (bool(options.dsn) and not options.dsn_from_database_url)
            or not isinstance(own, PostgresRepository)
            or own.auto_migrate
        )
        self.migrate = options.migrate and app_migrates
        # The process migrates (and says so) itself; the store then only checks.
        point_at_store(
            self.queue,
            options.app,
            options.dsn,
            options.schema,
            dsn_from_database_url=options.dsn_from_database_url,
            application_name=options.application_name,
            auto_migrate=False,
        )
        if not self.queue.repository.multi_process:
            logger.warning(
                "the queue of --app %s uses the %s store, which no other process can reach: only tasks added "
                "in this process will run; pass --dsn (or set KUBEQUE_DSN) to work on a PostgreSQL queue",
                options.app,
                self.queue.repository.name,
            )
        self.health = Health(store_stale_after=max(30.0, 3 * options.stats_interval))
        self.metrics: Metrics | None = None
        self.server: HealthServer | None = None
        self.worker: Worker | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._background: list[asyncio.Task[None]] = []

    # --- signals -----------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            # The operator (or kubelet) insists: leave now. Leases expire and
            # another worker reclaims what was running.
            logger.warning("second %s: exiting at once; running tasks will be reclaimed when their leases expire", name)
            _flush_logs()
            os._exit(signal_exit_code(signum))
        logger.info("%s received: draining (grace %.0fs); send it again to exit at once", name, self.options.grace)
        self.health.stopping = True
        self._stop.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    # --- run ---------------------------------------------------------------

    async def run(self) -> int:
        """Run until signalled; return the process exit status."""
        opts = self.options
        self._install_signals()
        try:
            if opts.metrics_port:
                # The *_created series double every counter's cardinality for little use.
                disable_created_metrics()  # type: ignore[no-untyped-call]
                self.metrics = Metrics(self.queue)
                try:
                    server = HealthServer(
                        self.metrics.registry, self.health, host=opts.metrics_host, port=opts.metrics_port
                    )
                except OSError as exc:
                    raise metrics_server_error(opts.metrics_host, opts.metrics_port, exc) from None
                self.server = server.start()
                logger.info("serving /metrics, /healthz and /readyz on %s:%d", opts.metrics_host, self.server.port)
                self._background.append(asyncio.create_task(self.health.run_beat(), name="kubeque-beat"))
            await self._prepare_store()
            log_state_changes(self.queue)
            worker_options: dict[str, Any] = {}
            if opts.lease_ms is not None:
                worker_options["lease_ms"] = opts.lease_ms
            if opts.poll_interval is not None:
                worker_options["poll_interval"] = opts.poll_interval
            if opts.worker_id:
                worker_options["worker_id"] = opts.worker_id
            if self._stop.is_set():
                return 0
            try:
                self.worker = await self.queue.start_worker(opts.concurrency, **worker_options)
            except SchemaMissingError as exc:
                also = " (or start the worker without --no-migrate)" if not opts.migrate else ""
                raise missing_schema_error(self.queue.repository, exc, also) from None
            self._log_started(self.worker)
            self.health.worker = self.worker
            if self.metrics is not None:
                self.metrics.attach(self.worker)
                self._background.append(asyncio.create_task(self._observe(), name="kubeque-observe"))
            self._background.append(asyncio.create_task(self._summarise(), name="kubeque-summary"))
            return await self._serve(self.worker)
        finally:
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            if self.server is not None:
                self.server.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.queue.close(), 15)
            self._remove_signals()

    async def _prepare_store(self) -> None:
        """Create or upgrade a PostgreSQL schema unless --no-migrate, and say so when it did."""
        repo = self.queue.repository
        if not self.migrate or not isinstance(repo, PostgresRepository):
            return
        applied = await asyncio.to_thread(migrate_schema, repo.dsn, repo.schema, application_name=repo.application_name)
        if not applied:
            return
        versions = ", ".join(str(v) for v in applied)
        if applied[0] == migrations()[0].version:  # the first one creates the schema
            logger.warning(
                "created the queue schema %r at %s (migrations %s): it did not exist; "
                "pass --no-migrate to make a missing schema an error instead",
                repo.schema,
                describe(repo.dsn),
                versions,
            )
        else:
            logger.info(
                "upgraded the queue schema %r at %s: applied migrations %s", repo.schema, describe(repo.dsn), versions
            )

    def _log_started(self, worker: Worker) -> None:
        names = self.queue.handlers.names()
        shown = ", ".join(names[:STARTUP_HANDLERS_SHOWN]) or "none"
        if len(names) > STARTUP_HANDLERS_SHOWN:
            shown += f" and {len(names) - STARTUP_HANDLERS_SHOWN} more"
        logger.info(
            "worker %s started: queue %r, %s, %s; handlers: %s",
            worker.id,
            queue_label(self.queue),
            describe_store(self.queue.repository),
            plural(worker.concurrency, "slot"),
            shown,
            extra={"worker_id": worker.id, "queue": queue_label(self.queue), "concurrency": worker.concurrency},
        )

    async def _serve(self, worker: Worker) -> int:
        stop = asyncio.create_task(self._stop.wait())
        ended = asyncio.create_task(worker.wait())
        broken = asyncio.create_task(self._watch(worker))
        await first_of([stop, ended, broken])
        if ended.done() and not ended.cancelled():
            exc = ended.exception()
            if exc is not None:
                logger.error("worker stopped by a task error (crash_on_worker_error): %s: %s", type(exc).__name__, exc)
            else:
                logger.error("worker stopped unexpectedly")
            return 1
        started = time.monotonic()
        await self.queue.stop_worker(self.options.grace)
        if stop.done() and not stop.cancelled():
            logger.info("drained in %.1fs", time.monotonic() - started)
            return 0
        return 1

    async def _watch(self, worker: Worker) -> None:
        """Return if one of the worker's loops dies: the process then drains and exits 1."""
        while worker.dead_loop is None:
            await asyncio.sleep(1.0)
        logger.error(
            "worker loop %s stopped unexpectedly; draining and exiting so the process restarts", worker.dead_loop
        )

    async def _observe(self) -> None:
        """Refresh the queue gauges and the store check every stats interval."""
        assert self.metrics is not None
        while True:
            try:
                await asyncio.wait_for(self.metrics.refresh(), max(5.0, self.options.stats_interval))
                self.health.store_checked(None)
            except Exception as exc:
                self.health.store_checked(one_line(exc))
                logger.debug("store check failed: %s", one_line(exc))
            await asyncio.sleep(self.options.stats_interval)

    async def _summarise(self) -> None:
        """Log at info what was done since the last summary, when anything was."""
        assert self.worker is not None
        last = (0, 0, 0, 0)
        while True:
            await asyncio.sleep(self.options.summary_interval)
            c = self.worker.counters
            now = (c.completed, c.failed, c.retried, c.reclaimed)
            if now != last:
                logger.info(
                    "last %.0fs: %d completed, %d failed, %d retried, %d reclaimed; %d running",
                    self.options.summary_interval,
                    now[0] - last[0],
                    now[1] - last[1],
                    now[2] - last[2],
                    now[3] - last[3],
                    self.worker.in_flight,
                )
                last = now


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def run_worker(options: WorkerOptions) -> int:
    """Run the worker process to the end and return its exit status.

    Handler threads cannot be interrupted; one still running after the grace
    period (its task already returned to pending) must not hold the process
    open, so the process then leaves without waiting for it.
    """
    process = WorkerProcess(options)
    code = asyncio.run(process.run())
    # Idle pool threads are exiting now; give them a moment before deciding.
    deadline = time.monotonic() + 1.0
    lingering = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for t in lingering:
        t.join(max(0.0, deadline - time.monotonic()))
    lingering = [t for t in lingering if t.is_alive()]
    if lingering:
        logger.info(
            "leaving %s still running; %s returned to pending",
            plural(len(lingering), "handler thread"),
            "its task was" if len(lingering) == 1 else "their tasks were",
        )
        _flush_logs()
        os._exit(code)
    return code

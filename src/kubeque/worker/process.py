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
import importlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import disable_created_metrics
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..backends.base import Repository
from ..backends.postgres import PostgresRepository
from ..backends.postgres import migrate as migrate_schema
from ..backends.postgres.connect import describe
from ..backends.postgres.queries import migrations
from ..errors import ConfigError, SchemaMissingError, one_line
from ..events import TaskEvent
from ..manager import QueueManager
from ..task import Task, sanitise_error
from .health import Health, HealthServer
from .metrics import Metrics
from .runtime import Worker, first_of

logger = logging.getLogger("kubeque.process")

DEFAULT_SCHEMA = "kubeque"
DEFAULT_APPLICATION_NAME = "kubeque-worker"
#: Handler names listed in the startup line before "and N more".
STARTUP_HANDLERS_SHOWN = 10


def signal_exit_code(signum: int) -> int:
    """Exit status after a second signal cut the drain short: 128 + its number, as a shell reports it."""
    return 128 + int(signum)


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 task``, ``2 tasks`` (``many`` for irregular plurals)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def load_app(spec: str) -> QueueManager:
    """Import ``module.path:attribute`` and return the QueueManager it names.

    The current directory is importable, as with ``python -m``, so ``--app
    myapp.tasks:queue`` works from the project root. Every failure is a
    one-line :class:`ConfigError`.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--app must look like 'package.module:queue', not {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"cannot import {module_name!r} for --app {spec}: no module named {exc.name!r} "
                "(run from the project root or set PYTHONPATH)"
            ) from None
        raise ConfigError(f"importing {module_name!r} for --app {spec} failed: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"importing {module_name!r} for --app {spec} failed: {type(exc).__name__}: {exc}") from None
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (--app {spec})") from None
    if not isinstance(value, QueueManager):
        raise ConfigError(f"--app {spec} names a {type(value).__name__}, not a kubeque QueueManager")
    return value


def postgres_backend(
    dsn: str, schema: str | None = None, *, application_name: str = DEFAULT_APPLICATION_NAME, **options: Any
) -> dict[str, Any]:
    """The backend config the CLI gives ``configure_backend`` for a DSN."""
    return {
        "type": "postgres",
        "dsn": dsn,
        "schema": schema or DEFAULT_SCHEMA,
        "application_name": application_name,
        **options,
    }


def point_at_store(queue: QueueManager, app: str, dsn: str | None, schema: str | None, **options: Any) -> None:
    """Point the app's queue at the store the command line names.

    ``--dsn`` replaces the app's store. Without it, an app on PostgreSQL keeps
    its own DSN (and pool sizes) and takes ``--schema`` if given; ``options``
    (application_name, auto_migrate, ...) apply either way. ``--schema`` for an
    app on another store is an error.
    """
    repo = queue.repository
    if dsn:
        queue.configure_backend(postgres_backend(dsn, schema, **options))
    elif isinstance(repo, PostgresRepository):
        sizes = {"min_size": repo.min_size, "max_size": repo.max_size}
        queue.configure_backend(postgres_backend(repo.dsn, schema or repo.schema, **{**sizes, **options}))
    elif schema:
        raise ConfigError(
            f"--schema needs a PostgreSQL DSN: the queue of --app {app} uses the {repo.name} store; "
            "pass --dsn or set KUBEQUE_DSN"
        )


def dsn_for_display(dsn: str) -> str:
    """A DSN to show in advice: as given, but with any password replaced by ``***``; shell-quoted."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "DSN"
    if params.get("password"):
        dsn = make_conninfo("", **{**params, "password": "***"})
    return shlex.quote(dsn)


def describe_store(repo: Repository) -> str:
    """Where a store keeps its tasks, for log lines: never a password."""
    if isinstance(repo, PostgresRepository):
        return f"schema {repo.schema!r} at {describe(repo.dsn)}"
    return f"the {repo.name} store"


def missing_schema_error(repo: Repository, exc: SchemaMissingError, also: str = "") -> SchemaMissingError:
    """The SchemaMissingError a shell user should see: which schema, where, and the command that creates it."""
    if not isinstance(repo, PostgresRepository):
        return exc
    return SchemaMissingError(
        f"the queue schema {repo.schema!r} at {describe(repo.dsn)} does not exist or is not fully migrated; "
        f"create it with: kubeque migrate --dsn {dsn_for_display(repo.dsn)} --schema {repo.schema}{also}"
    )


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
        own = self.queue.repository
        # An app that set auto_migrate=False on its own store keeps that choice unless --dsn replaces the store.
        app_migrates = bool(options.dsn) or not isinstance(own, PostgresRepository) or own.auto_migrate
        self.migrate = options.migrate and app_migrates
        # The process migrates (and says so) itself; the store then only checks.
        point_at_store(
            self.queue,
            options.app,
            options.dsn,
            options.schema,
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
            if not self.queue.handlers.names():
                logger.warning(
                    "--app %s registers no handlers: every task this worker takes will fail as unknown_handler; "
                    "check that --app names the module that registers them (with @queue.handler())",
                    opts.app,
                )
            await self._prepare_store()
            _log_state_changes(self.queue)
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
            self.queue.name,
            describe_store(self.queue.repository),
            plural(worker.concurrency, "slot"),
            shown,
            extra={"worker_id": worker.id, "queue": self.queue.name, "concurrency": worker.concurrency},
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


#: Error text in a log line is cut here; the task's own log keeps all of it (``kubeque tasks show``).
LOGGED_ERROR_CHARS = 500

#: What a warning about a stopped attempt that will be retried says happened, by outcome.
_STUCK_WHAT = {
    "timeout": "ran past its max_processing_time and was stopped",
    "lost": "was reclaimed after its worker stopped renewing the lease",
}


def _log_state_changes(queue: QueueManager) -> None:
    """Log task state changes: ids, names, outcomes and error text, never payloads.

    Every change is one debug line. A task that failed for good
    (``task_failed``: errors, timeouts, lost leases, unknown handlers) is also
    one warning, as is an attempt stopped at its deadline or reclaimed after a
    lost lease (``task_stuck``) that will be retried; the error text is
    sanitised and cut. Other retries stay at debug: the periodic summary counts
    them and the task's log keeps their errors.
    """
    task_log = logging.getLogger("kubeque.tasks")

    def listener(event: TaskEvent) -> None:
        debug = task_log.isEnabledFor(logging.DEBUG)
        task = event.task
        warn = event.name == "task_failed" or (event.name == "task_stuck" and not _last_attempt(queue, task))
        if not debug and not (warn and task_log.isEnabledFor(logging.WARNING)):
            return
        fields: dict[str, Any] = {
            "event": event.name,
            "task_id": event.task_id,
            "handler": task.handler if task else None,
            "attempt": task.attempt if task else None,
        }
        if event.outcome:
            fields["outcome"] = event.outcome
        if event.duration_s is not None:
            fields["duration_s"] = round(event.duration_s, 4)
        if event.wait_s is not None:
            fields["wait_s"] = round(event.wait_s, 4)
        fields = {k: v for k, v in fields.items() if v is not None}
        error = sanitise_error(event.error)[:LOGGED_ERROR_CHARS] if event.error else None
        quoted = f" error={error!r}" if error else ""
        if debug:
            task_log.debug("%s%s", " ".join(f"{k}={v}" for k, v in fields.items()), quoted, extra=fields)
        if warn:
            if event.name == "task_failed":
                what = "failed for good"
            else:
                stopped = _STUCK_WHAT.get(event.outcome or "", f"was stopped ({event.outcome})")
                what = f"{stopped}; it will be retried"
            task_log.warning(
                "task %s %s: handler=%s attempt=%s retries=%s outcome=%s%s",
                event.task_id,
                what,
                fields.get("handler"),
                fields.get("attempt"),
                _retries_text(queue, task),
                event.outcome,
                quoted,
                extra={**fields, "error": error},
            )

    for name in ("task_started", "task_completed", "task_retried", "task_failed", "task_stuck"):
        queue.on(name, listener)


def _max_retries(queue: QueueManager, task: Task) -> int | None:
    try:
        return queue.effective(task)[0]
    except Exception:  # a log line must never break a worker
        return None


def _last_attempt(queue: QueueManager, task: Task | None) -> bool:
    """Whether a failure of this attempt ends the task (then ``task_failed`` follows ``task_stuck``)."""
    if task is None:
        return False
    max_retries = _max_retries(queue, task)
    return max_retries is not None and task.retry_count >= max_retries


def _retries_text(queue: QueueManager, task: Task | None) -> str:
    """``1/3``: retries already spent of those allowed (just ``1`` when the limit is unknown)."""
    if task is None:
        return "?"
    max_retries = _max_retries(queue, task)
    return str(task.retry_count) if max_retries is None else f"{task.retry_count}/{max_retries}"


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

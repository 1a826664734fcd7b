"""The ``kubeque`` command: worker, migrate, tasks, stats, demo.

Every failure the user can cause or fix (a bad DSN, an unreachable server, a
missing schema, an unknown handler, invalid JSON) ends as one line on stderr
and exit status 1, never a traceback. ``--json`` prints what a script reads.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import click
import psycopg

from .errors import ConfigError, KubequeError, TaskNotFoundError
from .manager import QueueManager
from .task import QueueStats, Task, TaskStatus

T = TypeVar("T")

DSN_ENV = ["KUBEQUE_DSN", "DATABASE_URL"]
SCHEMA_ENV = "KUBEQUE_SCHEMA"
CLI_APPLICATION_NAME = "kubeque-cli"
STATUSES = [s.value for s in TaskStatus]


def one_line(exc: BaseException) -> str:
    """An exception as a single line of text."""
    return " ".join(str(exc).split()) or type(exc).__name__


class KubequeGroup(click.Group):
    """Turns the errors a user can act on into ``Error: <one line>`` and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KubequeError, psycopg.Error, OSError) as exc:
            raise click.ClickException(one_line(exc)) from None


@click.group(cls=KubequeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kubeque", prog_name="kubeque")
def main() -> None:
    """kubeque: a PostgreSQL task queue at home on Kubernetes.

    The store is given by --dsn (or $KUBEQUE_DSN, $DATABASE_URL) and --schema
    (or $KUBEQUE_SCHEMA, default "kubeque"), or by the QueueManager named with
    --app module.path:queue.
    """


# --- shared options ------------------------------------------------------------


def dsn_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--dsn",
        envvar=DSN_ENV,
        show_envvar=True,
        help="PostgreSQL DSN, e.g. postgresql://user:pass@host:5432/db.",
    )(fn)


def schema_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--schema", envvar=SCHEMA_ENV, show_envvar=True, help='Queue schema in the database (default "kubeque").'
    )(fn)


def app_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--app",
        metavar="MODULE:ATTR",
        envvar="KUBEQUE_APP",
        show_envvar=True,
        help="The application's QueueManager, e.g. myapp.tasks:queue (checks handlers and payloads).",
    )(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    return app_option(schema_option(dsn_option(fn)))


def open_queue(app: str | None, dsn: str | None, schema: str | None) -> QueueManager:
    """The QueueManager the tasks and stats commands work on; never creates a schema."""
    from .worker.process import load_app, postgres_backend

    options: dict[str, Any] = {
        "application_name": CLI_APPLICATION_NAME,
        "auto_migrate": False,
        "min_size": 0,
        "max_size": 2,
    }
    if app:
        queue = load_app(app)
        if dsn:
            queue.configure_backend(postgres_backend(dsn, schema, **options))
        elif schema:
            raise ConfigError("--schema needs a PostgreSQL DSN: pass --dsn or set KUBEQUE_DSN")
        elif not queue.repository.multi_process:
            raise ConfigError(
                f"the queue of --app {app} uses the {queue.repository.name} store, which other processes "
                "cannot see; pass --dsn (or set KUBEQUE_DSN) to reach its database"
            )
        return queue
    if not dsn:
        raise ConfigError("no database given: pass --dsn, set KUBEQUE_DSN or DATABASE_URL, or pass --app")
    return QueueManager(postgres_backend(dsn, schema, **options), validate_handlers=False)


def run(queue: QueueManager, op: Callable[[QueueManager], Awaitable[T]]) -> T:
    """Run one operation on the queue in a fresh event loop, closing the store after."""

    async def go() -> T:
        try:
            return await op(queue)
        finally:
            await queue.close()

    return asyncio.run(go())


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _console() -> Any:
    from rich.console import Console

    return Console()


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


# --- worker --------------------------------------------------------------------


@main.command()
@click.option("--app", required=True, metavar="MODULE:ATTR", envvar="KUBEQUE_APP", show_envvar=True,
              help="The application's QueueManager, e.g. myapp.tasks:queue.")
@dsn_option
@schema_option
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=1, show_default=True,
              envvar="KUBEQUE_CONCURRENCY", show_envvar=True, help="Tasks run at once.")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds running tasks get to finish after SIGTERM before they return to pending.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              envvar="KUBEQUE_METRICS_PORT", show_envvar=True,
              help="Serve /metrics, /healthz and /readyz on this port (0: off).")
@click.option("--metrics-host", default="0.0.0.0", show_default=True, help="Address the metrics server binds.")
@click.option("--lease-ms", type=click.IntRange(min=100), default=None,
              help="Lease length in ms (default: the QueueManager's, 30000). A crashed worker's tasks are "
              "reclaimed this long after it stopped renewing.")
@click.option("--poll-interval", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds between polls when no notification arrives (default: the QueueManager's).")
@click.option("--stats-interval", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds between refreshes of the queue depth gauges and the store check.")
@click.option("--application-name", default="kubeque-worker", show_default=True,
              help="application_name of the worker's PostgreSQL connections (see pg_stat_activity).")
@click.option("--worker-id", default=None, help="Worker id recorded on tasks (default: host:pid:random).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              default="info", show_default=True, envvar="KUBEQUE_LOG_LEVEL", show_envvar=True)
@click.option("--log-json", is_flag=True, envvar="KUBEQUE_LOG_JSON", show_envvar=True,
              help="Log one JSON object per line.")
def worker(
    app: str,
    dsn: str | None,
    schema: str | None,
    concurrency: int,
    grace: float,
    metrics_port: int,
    metrics_host: str,
    lease_ms: int | None,
    poll_interval: float | None,
    stats_interval: float,
    application_name: str,
    worker_id: str | None,
    log_level: str,
    log_json: bool,
) -> None:
    """Run a worker for the application's queue until SIGTERM or SIGINT.

    On the first signal it stops taking tasks, lets running ones finish
    within --grace, returns the rest to pending without spending an attempt
    and exits 0. A second signal exits at once.
    """
    from .logging import setup_logging
    from .worker.process import WorkerOptions, run_worker

    setup_logging(log_level, json_lines=log_json)
    code = run_worker(
        WorkerOptions(
            app=app,
            dsn=dsn,
            schema=schema,
            concurrency=concurrency,
            grace=grace,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            lease_ms=lease_ms,
            poll_interval=poll_interval,
            stats_interval=stats_interval,
            application_name=application_name,
            worker_id=worker_id,
        )
    )
    sys.exit(code)


# --- migrate -------------------------------------------------------------------


@main.command()
@dsn_option
@schema_option
@click.option("--json", "as_json", is_flag=True, help='Print {"schema": ..., "applied": [...]} as JSON.')
def migrate(dsn: str | None, schema: str | None, as_json: bool) -> None:
    """Create or upgrade a queue's schema; print the versions applied."""
    from .backends.postgres import migrate as run_migrate

    if not dsn:
        raise ConfigError("no database given: pass --dsn or set KUBEQUE_DSN or DATABASE_URL")
    name = schema or "kubeque"
    applied = run_migrate(dsn, name)
    if as_json:
        echo_json({"schema": name, "applied": applied})
    elif applied:
        click.echo(f"schema {name}: applied migrations {', '.join(str(v) for v in applied)}")
    else:
        click.echo(f"schema {name}: already up to date")


# --- tasks ---------------------------------------------------------------------


@main.group()
def tasks() -> None:
    """Add, list, show, retry and remove tasks."""


@tasks.command("add")
@click.argument("handler")
@click.argument("payload_json", default="{}", required=False)
@click.option("--priority", type=int, default=None, help="Higher runs first (default 0).")
@click.option("--delay", type=click.FloatRange(min=0), default=None, help="Seconds before it may run.")
@click.option("--max-retries", type=click.IntRange(min=0), default=None, help="Retries after a failed attempt.")
@click.option("--id", "task_id", default=None, help="Task id (default: a new UUID).")
@store_options
@json_option
def tasks_add(
    handler: str,
    payload_json: str,
    priority: int | None,
    delay: float | None,
    max_retries: int | None,
    task_id: str | None,
    app: str | None,
    dsn: str | None,
    schema: str | None,
    as_json: bool,
) -> None:
    """Add a task for HANDLER with PAYLOAD_JSON (a JSON object, default {})."""
    try:
        payload = json.loads(payload_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"PAYLOAD_JSON is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"PAYLOAD_JSON must be a JSON object like '{{\"to\": \"a@b.c\"}}', not {payload_json!r}")
    options: dict[str, Any] = {}
    for key, value in (("priority", priority), ("delay", delay), ("max_retries", max_retries), ("id", task_id)):
        if value is not None:
            options[key] = value
    queue = open_queue(app, dsn, schema)
    task = run(queue, lambda q: q.add_task(handler, payload, **options))
    if task is None:
        raise ConfigError("the handler skipped this payload (skip_on_payload_error); nothing was stored")
    if as_json:
        echo_json(task.to_json_dict())
    else:
        click.echo(f"added task {task.id} ({task.handler}, priority {task.priority}, runs at {_when(task.run_at)})")


@tasks.command("ls")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only tasks in this state.")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True, help="At most this many (0: all).")
@store_options
@json_option
def tasks_ls(
    status: str | None, limit: int, app: str | None, dsn: str | None, schema: str | None, as_json: bool
) -> None:
    """List tasks in insertion order."""
    queue = open_queue(app, dsn, schema)
    found = run(queue, lambda q: q.get_all_tasks(status, limit or None))
    if as_json:
        echo_json([t.to_json_dict() for t in found])
        return
    from rich.table import Table

    table = Table(title=f"{len(found)} tasks" + (f" ({status})" if status else ""))
    table.add_column("id", no_wrap=True)
    for column in ("handler", "status", "prio", "attempt", "retries", "run at", "updated"):
        table.add_column(column, overflow="fold")
    for t in found:
        table.add_row(
            t.id,
            t.handler,
            t.status.value,
            str(t.priority),
            str(t.attempt),
            f"{t.retry_count}/{t.max_retries}",
            _when(t.run_at),
            _when(t.updated_at),
        )
    _console().print(table)


@tasks.command("show")
@click.argument("task_id", metavar="ID")
@store_options
@json_option
def tasks_show(task_id: str, app: str | None, dsn: str | None, schema: str | None, as_json: bool) -> None:
    """Show one task, its payload, result and attempt log."""
    queue = open_queue(app, dsn, schema)
    task = run(queue, lambda q: q.get_task(task_id))
    if task is None:
        raise TaskNotFoundError(f"no task with id {task_id!r}")
    if as_json:
        echo_json(task.to_json_dict())
        return
    _print_task(task)


def _print_task(task: Task) -> None:
    from rich.table import Table

    info = Table(show_header=False, box=None)
    info.add_column(style="bold")
    info.add_column(overflow="fold")
    rows: list[tuple[str, str]] = [
        ("id", task.id),
        ("handler", task.handler),
        ("status", task.status.value),
        ("priority", str(task.priority)),
        ("attempt", str(task.attempt)),
        ("retries", f"{task.retry_count} of {task.max_retries}"),
        ("max processing time", f"{task.max_processing_time} ms"),
        ("created", _when(task.created_at)),
        ("updated", _when(task.updated_at)),
        ("run at", _when(task.run_at)),
        ("worker", task.worker or ""),
        ("lease expires", _when(task.lease_expires_at)),
        ("payload", json.dumps(task.payload, ensure_ascii=False)),
        ("result", "" if task.result is None else json.dumps(task.result, ensure_ascii=False)),
    ]
    if task.extra:
        rows.append(("extra", json.dumps(task.extra, ensure_ascii=False)))
    for key, value in rows:
        info.add_row(key, value)
    console = _console()
    console.print(info, markup=False)
    if task.log:
        log = Table(title="attempts")
        for column in ("attempt", "worker", "started", "ended", "outcome", "error"):
            log.add_column(column, overflow="fold")
        for entry in task.log:
            log.add_row(*(str(entry.get(k, "") or "") for k in ("attempt", "worker", "started_at", "ended_at",
                                                                  "outcome", "error")))
        console.print(log)


@tasks.command("retry")
@click.argument("task_id", metavar="ID")
@store_options
@json_option
def tasks_retry(task_id: str, app: str | None, dsn: str | None, schema: str | None, as_json: bool) -> None:
    """Run a finished (completed, failed or deleted) task again, with its retries reset."""
    queue = open_queue(app, dsn, schema)
    task = run(queue, lambda q: q.update_task(task_id, status="pending"))
    if as_json:
        echo_json(task.to_json_dict())
    else:
        click.echo(f"task {task.id} is pending again")


@tasks.command("rm")
@click.argument("task_id", metavar="ID")
@click.option("--hard", is_flag=True, help="Delete the row instead of marking the task deleted.")
@store_options
def tasks_rm(task_id: str, hard: bool, app: str | None, dsn: str | None, schema: str | None) -> None:
    """Remove a task: mark it deleted, or with --hard delete it."""
    queue = open_queue(app, dsn, schema)
    removed = run(queue, lambda q: q.remove_task(task_id, hard=hard))
    if not removed:
        raise TaskNotFoundError(f"no task with id {task_id!r}")
    click.echo(f"task {task_id} {'deleted' if hard else 'marked deleted'}")


# --- stats ---------------------------------------------------------------------


@main.command()
@store_options
@json_option
def stats(app: str | None, dsn: str | None, schema: str | None, as_json: bool) -> None:
    """Counts by status and the age of the oldest due pending task."""
    queue = open_queue(app, dsn, schema)
    st: QueueStats = run(queue, lambda q: q.stats())
    if as_json:
        echo_json(st.as_dict())
        return
    from rich.table import Table

    table = Table(title="queue")
    table.add_column("status")
    table.add_column("tasks", justify="right")
    for status in STATUSES:
        table.add_row(status, str(st.counts.get(status, 0)))
    age = st.oldest_pending_age_s
    console = _console()
    console.print(table)
    console.print("no due task waiting" if age is None else f"oldest due pending task has waited {age:.1f}s")


# --- demo ----------------------------------------------------------------------


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run the end-to-end demo (kubeque demo --help for its options)."""
    # Imported here so that the rest of the CLI works even if the demo cannot load.
    try:
        from .demo.command import demo as demo_command
    except Exception as exc:
        raise click.ClickException(f"the demo is not available: {one_line(exc)}") from None
    demo_command.main(list(ctx.args), prog_name="kubeque demo", standalone_mode=True)

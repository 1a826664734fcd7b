"""The ``kubeque`` command: worker, migrate, tasks, stats, demo.

Every failure the user can cause or fix (a bad DSN, an unreachable server, a
missing schema, an unknown handler, invalid JSON) ends as one line on stderr
and exit status 1, never a traceback. ``--json`` prints what a script reads.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import click
import psycopg

from .errors import ConfigError, KubequeError, SchemaMissingError, TaskNotFoundError, UnknownHandlerError, one_line
from .manager import QueueManager
from .task import QueueStats, Task, TaskStatus

T = TypeVar("T")

DSN_ENV = ["KUBEQUE_DSN", "DATABASE_URL"]
SCHEMA_ENV = "KUBEQUE_SCHEMA"
CLI_APPLICATION_NAME = "kubeque-cli"
STATUSES = [s.value for s in TaskStatus]
#: The table shows ids cut to this many characters; commands take any unique prefix at least MIN_PREFIX long.
SHORT_ID = 8
MIN_PREFIX = 4
#: Matches an ambiguous prefix error lists before "and N more".
PREFIX_MATCHES_SHOWN = 5
NO_APP_NOTE = "note: without --app the handler name and payload are not checked; pass --app module:queue to check them"


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


def schema_option(fn: Callable[..., Any], *, with_app: bool = True) -> Callable[..., Any]:
    default = 'the --app queue\'s, if it is on PostgreSQL, else "kubeque"' if with_app else '"kubeque"'
    return click.option(
        "--schema",
        envvar=SCHEMA_ENV,
        show_envvar=True,
        help=f"Queue schema in the database (default: {default}).",
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


def dsn_from_database_url() -> bool:
    """Whether this command's --dsn came from $DATABASE_URL (not the flag or $KUBEQUE_DSN)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.get_parameter_source("dsn") is not click.core.ParameterSource.ENVIRONMENT:
        return False
    return not os.environ.get("KUBEQUE_DSN")


def open_queue(app: str | None, dsn: str | None, schema: str | None) -> QueueManager:
    """The QueueManager the tasks and stats commands work on; never creates a schema.

    With --app and no --dsn, an app on PostgreSQL is reached through its own
    DSN (with --schema if given).
    """
    from .app import load_app, point_at_store, postgres_backend

    options: dict[str, Any] = {
        "application_name": CLI_APPLICATION_NAME,
        "auto_migrate": False,
        "min_size": 0,
        "max_size": 2,
    }
    if app:
        queue = load_app(app)
        point_at_store(queue, app, dsn, schema, dsn_from_database_url=dsn_from_database_url(), **options)
        if not queue.repository.multi_process:
            raise ConfigError(
                f"the queue of --app {app} uses the {queue.repository.name} store, which other processes "
                "cannot see; pass --dsn (or set KUBEQUE_DSN) to reach its database"
            )
        return queue
    if not dsn:
        raise ConfigError("no database given: pass --dsn, set KUBEQUE_DSN or DATABASE_URL, or pass --app")
    return QueueManager(postgres_backend(dsn, schema, **options), validate_handlers=False)


def run(queue: QueueManager, op: Callable[[QueueManager], Awaitable[T]]) -> T:
    """Run one operation on the queue in a fresh event loop, closing the store after.

    A missing schema is reported with the ``kubeque migrate`` command that creates it.
    """
    from .app import missing_schema_error

    async def go() -> T:
        try:
            return await op(queue)
        finally:
            await queue.close()

    try:
        return asyncio.run(go())
    except SchemaMissingError as exc:
        raise missing_schema_error(queue.repository, exc) from None


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _console() -> Any:
    from rich.console import Console

    return Console()


def _when(value: datetime | None) -> str:
    """A full local time with its zone, e.g. ``2026-12-03 16:44:08 CET``."""
    return "" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _short_when(value: datetime | None, now: datetime | None = None) -> str:
    """A compact local time: ``16:44:08`` today, ``12-03 16:44`` this year, else ``2025-12-03``."""
    if value is None:
        return ""
    local = value.astimezone()
    today = (now or datetime.now().astimezone()).astimezone()
    if local.date() == today.date():
        return local.strftime("%H:%M:%S")
    if local.year == today.year:
        return local.strftime("%m-%d %H:%M")
    return local.strftime("%Y-%m-%d")


def _iso_time(value: Any) -> datetime | None:
    """A log entry's ISO timestamp as a datetime (None if absent or malformed)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.astimezone()


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _limit_of(queue: QueueManager, task: Task) -> int | None:
    """The task's max_retries, or what the app's handler sets when the task left it unset (None if unknown)."""
    if task.max_retries is not None:
        return task.max_retries
    if task.handler in queue.handlers:
        return queue.effective(task)[0]
    return None


async def find_task(queue: QueueManager, given: str) -> Task:
    """The task with id ``given``, else the one task whose id starts with it (at least MIN_PREFIX characters).

    Raises TaskNotFoundError if none matches and ConfigError if several do.
    """
    task = await queue.get_task(given)
    if task is not None:
        return task
    if len(given) < MIN_PREFIX:
        raise TaskNotFoundError(f"no task with id {given!r} (an id prefix needs at least {MIN_PREFIX} characters)")
    # The store has no prefix lookup; a CLI call may read every task once.
    matches = [t for t in await queue.get_all_tasks() if t.id.startswith(given)]
    if not matches:
        raise TaskNotFoundError(f"no task with id {given!r} or an id starting with it")
    if len(matches) > 1:
        shown = ", ".join(t.id for t in matches[:PREFIX_MATCHES_SHOWN])
        more = len(matches) - PREFIX_MATCHES_SHOWN
        shown += f" and {more} more" if more > 0 else ""
        raise ConfigError(f"id prefix {given!r} matches {len(matches)} tasks ({shown}); give more of the id")
    return matches[0]


# --- worker --------------------------------------------------------------------


@main.command()
@click.option(
    "--app",
    required=True,
    metavar="MODULE:ATTR",
    envvar="KUBEQUE_APP",
    show_envvar=True,
    help="The application's QueueManager, e.g. myapp.tasks:queue.",
)
@dsn_option
@schema_option
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar="KUBEQUE_CONCURRENCY",
    show_envvar=True,
    help="Tasks run at once.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds running tasks get to finish after SIGTERM before they return to pending.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    envvar="KUBEQUE_METRICS_PORT",
    show_envvar=True,
    help="Serve /metrics, /healthz and /readyz on this port (0: off).",
)
@click.option("--metrics-host", default="0.0.0.0", show_default=True, help="Address the metrics server binds.")
@click.option(
    "--lease-ms",
    type=click.IntRange(min=100),
    default=None,
    help="Lease length in ms (default: the QueueManager's, 30000). A crashed worker's tasks are "
    "reclaimed this long after it stopped renewing.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds between polls when no notification arrives (default: the QueueManager's).",
)
@click.option(
    "--stats-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds between refreshes of the queue depth gauges and the store check.",
)
@click.option(
    "--application-name",
    default="kubeque-worker",
    show_default=True,
    help="application_name of the worker's PostgreSQL connections (see pg_stat_activity).",
)
@click.option("--worker-id", default=None, help="Worker id recorded on tasks (default: host:pid:random).")
@click.option(
    "--migrate/--no-migrate",
    "migrate_schema",
    default=True,
    show_default=True,
    help="Create or upgrade the queue's PostgreSQL schema at startup (logged); with --no-migrate "
    "a missing schema is an error.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    envvar="KUBEQUE_LOG_LEVEL",
    show_envvar=True,
)
@click.option(
    "--log-json", is_flag=True, envvar="KUBEQUE_LOG_JSON", show_envvar=True, help="Log one JSON object per line."
)
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
    migrate_schema: bool,
    log_level: str,
    log_json: bool,
) -> None:
    """Run a worker for the application's queue until SIGTERM or SIGINT.

    The store is --dsn and --schema, else the app's own (an app on PostgreSQL
    takes --schema alone). On the first signal it stops taking tasks, lets
    running ones finish within --grace, returns the rest to pending without
    spending an attempt and exits 0. A second signal exits at once (130 after
    SIGINT, 143 after SIGTERM).
    """
    from .logging import setup_logging
    from .worker.process import WorkerOptions, run_worker, signal_exit_code

    setup_logging(log_level, json_lines=log_json)
    options = WorkerOptions(
        app=app,
        dsn=dsn,
        dsn_from_database_url=dsn_from_database_url(),
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
        migrate=migrate_schema,
    )
    try:
        code = run_worker(options)
    except KeyboardInterrupt:
        # Ctrl-C before the worker installed its own handlers: nothing was taken yet.
        code = signal_exit_code(signal.SIGINT)
    sys.exit(code)


# --- migrate -------------------------------------------------------------------


@main.command()
@dsn_option
@functools.partial(schema_option, with_app=False)
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
        raise ConfigError(f'PAYLOAD_JSON must be a JSON object like \'{{"to": "a@b.c"}}\', not {payload_json!r}')
    options: dict[str, Any] = {}
    for key, value in (("priority", priority), ("delay", delay), ("max_retries", max_retries), ("id", task_id)):
        if value is not None:
            options[key] = value
    queue = open_queue(app, dsn, schema)
    try:
        task = run(queue, lambda q: q.add_task(handler, payload, **options))
    except UnknownHandlerError:
        if not app:
            raise
        raise ConfigError(_unknown_handler(queue, app, handler)) from None
    if task is None:
        raise ConfigError("the handler skipped this payload (skip_on_payload_error); nothing was stored")
    if as_json:
        echo_json(task.to_json_dict())
    else:
        click.echo(f"added task {task.id} ({task.handler}, priority {task.priority}, runs at {_when(task.run_at)})")
    if not app:
        click.echo(NO_APP_NOTE, err=True)
    elif task.handler not in queue.handlers:
        click.echo(
            f"note: --app {app} does not register {task.handler!r} (it adds tasks for another process's "
            "handlers), so the handler name and payload were not checked",
            err=True,
        )


def _unknown_handler(queue: QueueManager, app: str, handler: str) -> str:
    names = queue.handlers.names()
    close = difflib.get_close_matches(handler, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"the app {app} has no handler named {handler!r} (registered: {', '.join(names) or 'none'}); "
        f"{hint}check the handler name, and that --app names the application whose worker runs it"
    )


@tasks.command("ls")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only tasks in this state.")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True, help="At most this many (0: all).")
@click.option("--newest", is_flag=True, help="Newest first (reads every matching task to find them).")
@store_options
@json_option
def tasks_ls(
    status: str | None,
    limit: int,
    newest: bool,
    app: str | None,
    dsn: str | None,
    schema: str | None,
    as_json: bool,
) -> None:
    """List tasks, oldest first (ids cut to 8 characters; --json has them whole)."""
    queue = open_queue(app, dsn, schema)

    async def listing(q: QueueManager) -> tuple[list[Task], int]:
        if newest:
            every = await q.get_all_tasks(status)
            return every[::-1][: limit or None], len(every)
        found = await q.get_all_tasks(status, limit or None)
        total = len(found)
        if limit and total == limit:
            counts = (await q.stats()).counts
            total = max(total, counts.get(status, 0) if status else sum(counts.values()))
        return found, total

    found, total = run(queue, listing)
    which = f" {status}" if status else ""
    cut = (
        f"showing {'the newest ' if newest else ''}{len(found)} of {total}{which} tasks; --limit 0 for all"
        if len(found) < total
        else None
    )
    if as_json:
        echo_json([t.to_json_dict() for t in found])
        if cut:
            click.echo(cut, err=True)
        return
    console = _console()
    if not found:
        console.print(f"no{which} tasks", markup=False, highlight=False)
        return
    console.print(_task_table(queue, found), markup=False)
    console.print(cut or _count(len(found), f"{which.strip()} task".strip()), markup=False, highlight=False)


def _task_table(queue: QueueManager, found: list[Task]) -> Any:
    """The ls table: fixed narrow columns, the handler takes what is left (fits 80 columns)."""
    from rich import box
    from rich.table import Table

    now = datetime.now().astimezone()
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=SHORT_ID)
    table.add_column("handler", overflow="ellipsis", min_width=7)
    table.add_column("status", no_wrap=True, min_width=10)
    table.add_column("prio", no_wrap=True, justify="right")
    table.add_column("tries", no_wrap=True, justify="right")
    table.add_column("run at", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    for t in found:
        most = _limit_of(queue, t)
        table.add_row(
            t.id[:SHORT_ID],
            t.handler,
            t.status.value,
            str(t.priority),
            f"{t.attempt}/{1 + most}" if most is not None else str(t.attempt),
            _short_when(t.run_at, now),
            _short_when(t.updated_at, now),
        )
    return table


@tasks.command("show")
@click.argument("task_id", metavar="ID")
@store_options
@json_option
def tasks_show(task_id: str, app: str | None, dsn: str | None, schema: str | None, as_json: bool) -> None:
    """Show one task (ID or a unique prefix of it), its payload, result and attempts."""
    queue = open_queue(app, dsn, schema)
    task = run(queue, lambda q: find_task(q, task_id))
    if as_json:
        echo_json(task.to_json_dict())
        return
    _print_task(queue, task)


def _print_task(queue: QueueManager, task: Task) -> None:
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
        ("retries", _retries_shown(task.retry_count, _limit_of(queue, task))),
        ("max processing time", _or_handlers(_processing_time_of(queue, task), " ms")),
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
        now = datetime.now().astimezone()
        log = Table(title="attempts", title_justify="left")
        log.add_column("#", justify="right", no_wrap=True)
        log.add_column("started", no_wrap=True)
        log.add_column("took", justify="right", no_wrap=True)
        log.add_column("outcome", no_wrap=True)
        log.add_column("worker", overflow="fold")
        log.add_column("error", overflow="fold")
        for entry in task.log:
            started, ended = _iso_time(entry.get("started_at")), _iso_time(entry.get("ended_at"))
            took = _seconds((ended - started).total_seconds()) if started and ended else ""
            log.add_row(
                str(entry.get("attempt", "")),
                _short_when(started, now),
                took,
                str(entry.get("outcome") or ("running" if ended is None else "")),
                str(entry.get("worker") or ""),
                str(entry.get("error") or ""),
            )
        console.print(log, markup=False)


HANDLERS_SETTING = "set by the handler (pass --app to see it)"


def _retries_shown(spent: int, most: int | None) -> str:
    return f"{spent} of {most}" if most is not None else f"{spent} (limit {HANDLERS_SETTING})"


def _or_handlers(value: int | None, unit: str = "") -> str:
    return HANDLERS_SETTING if value is None else f"{value}{unit}"


def _processing_time_of(queue: QueueManager, task: Task) -> int | None:
    if task.max_processing_time is not None:
        return task.max_processing_time
    if task.handler in queue.handlers:
        return queue.effective(task)[1]
    return None


@tasks.command("retry")
@click.argument("task_id", metavar="ID")
@store_options
@json_option
def tasks_retry(task_id: str, app: str | None, dsn: str | None, schema: str | None, as_json: bool) -> None:
    """Run a finished (completed, failed or deleted) task again, with its retries reset.

    ID may be a unique prefix of the id.
    """
    queue = open_queue(app, dsn, schema)

    async def retry(q: QueueManager) -> tuple[Task, bool]:
        found = await find_task(q, task_id)
        return await q.update_task(found.id, status="pending"), found.status is TaskStatus.PENDING

    task, already = run(queue, retry)
    if as_json:
        echo_json(task.to_json_dict())
    elif already:
        click.echo(f"task {task.id} is already pending (runs at {_when(task.run_at)}); nothing changed")
    else:
        click.echo(f"task {task.id} is pending again")


@tasks.command("rm")
@click.argument("task_id", metavar="ID")
@click.option("--hard", is_flag=True, help="Delete the row instead of marking the task deleted.")
@store_options
def tasks_rm(task_id: str, hard: bool, app: str | None, dsn: str | None, schema: str | None) -> None:
    """Remove a task (ID or a unique prefix of it): mark it deleted, or with --hard delete it."""
    queue = open_queue(app, dsn, schema)

    async def remove(q: QueueManager) -> tuple[str, bool]:
        found = await find_task(q, task_id)
        return found.id, await q.remove_task(found.id, hard=hard)

    full_id, removed = run(queue, remove)
    if not removed:
        raise TaskNotFoundError(f"no task with id {full_id!r}")
    click.echo(f"task {full_id} {'deleted' if hard else 'marked deleted'}")


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

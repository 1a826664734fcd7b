"""``kubeque demo``: the one command that shows kubeque working on real work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import psycopg
from rich.console import Console

from ..errors import KubequeError
from .runner import DemoOptions, run_demo
from .summary import render_summary
from .workload import MIN_TASKS

EXIT_INVARIANT_FAILED = 1
EXIT_INTERRUPTED = 130


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--tasks", "-n", type=click.IntRange(min=MIN_TASKS), default=2000, show_default=True, help="How many tasks to add."
)
@click.option(
    "--workers",
    "-w",
    type=click.IntRange(1, 16),
    default=3,
    show_default=True,
    help="Worker processes (`kubeque worker` subprocesses).",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Task slots per worker process.",
)
@click.option(
    "--dsn",
    envvar="KUBEQUE_DSN",
    show_envvar=True,
    help="PostgreSQL to use (default: start an embedded one for the run).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-output"),
    show_default=True,
    help="Folder for the run's images, thumbnails, mail, reports and logs.",
)
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Make thumbnails of the images in this folder instead of generated ones.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object; no live display.")
@click.option("--keep", is_flag=True, help="Keep the run's schema (demo_<timestamp>) instead of dropping it.")
@click.option(
    "--timeout", type=click.FloatRange(min=1), default=300.0, show_default=True, help="Give up after this many seconds."
)
@click.option(
    "--app-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder holding the demo application (default: examples/demo of this checkout).",
)
def demo(
    tasks: int,
    workers: int,
    concurrency: int,
    dsn: str | None,
    output: Path,
    images: Path | None,
    as_json: bool,
    keep: bool,
    timeout: float,
    app_dir: Path | None,
) -> None:
    """Run a small shop's background work through kubeque and check the result.

    Adds a mix of real tasks (thumbnails with Pillow, emails over SMTP to a
    local server that greylists some recipients, async address checks, reports)
    plus one poison task and one hung task, runs them on worker processes over
    PostgreSQL, shows live progress and a summary, and exits non-zero if any of
    its invariants fails.
    """
    console = Console(stderr=as_json)
    err = Console(stderr=True)

    def status(line: str) -> None:
        (err if as_json else console).print(f"[dim]{line}[/]", highlight=False)

    options = DemoOptions(
        tasks=tasks,
        workers=workers,
        concurrency=concurrency,
        dsn=dsn,
        output=output,
        images=images,
        json=as_json,
        keep=keep,
        timeout_s=timeout,
        app_dir=app_dir,
    )
    try:
        summary = run_demo(options, console, status)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: workers, SMTP server and store stopped[/]")
        sys.exit(EXIT_INTERRUPTED)
    except (KubequeError, psycopg.Error, OSError) as exc:
        raise click.ClickException(" ".join(str(exc).splitlines()[:1]) + _rest(exc)) from None
    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False))
        if not summary["ok"]:
            failed = ", ".join(i["name"] for i in summary["invariants"] if not i["ok"])
            err.print(f"invariant failed: {failed}", highlight=False)
    else:
        render_summary(console, summary)
    if not summary["ok"]:
        sys.exit(EXIT_INVARIANT_FAILED)


def _rest(exc: BaseException) -> str:
    # Worker log tails follow the first line; keep them, on their own lines.
    lines = str(exc).splitlines()[1:]
    return ("\n" + "\n".join(lines)) if lines else ""

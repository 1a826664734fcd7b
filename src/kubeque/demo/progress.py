"""The live view while the demo runs: tasks by status, throughput, in flight, workers."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


@dataclass
class Snapshot:
    """What the queue and the workers look like at one moment."""

    elapsed_s: float  # since the demo started its workers: one clock for every phase
    total: int
    added: int
    counts: dict[str, int]
    workers_alive: int
    workers_total: int
    phase: str

    @property
    def finished(self) -> int:
        return self.counts.get("completed", 0) + self.counts.get("failed", 0)


@dataclass
class Throughput:
    """Tasks finished per second over the last few seconds."""

    window_s: float = 2.0
    _points: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, at: float, finished: int) -> float:
        self._points.append((at, finished))
        while len(self._points) > 2 and at - self._points[0][0] > self.window_s:
            self._points.popleft()
        t0, n0 = self._points[0]
        return (finished - n0) / (at - t0) if at > t0 else 0.0


class LiveProgress:
    """A rich Live display, refreshed by :meth:`update`."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._live = Live(console=console, refresh_per_second=8, transient=False)
        self._rate = Throughput()
        self._shown = False

    def __enter__(self) -> LiveProgress:
        self._live.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._live.__exit__(exc_type, exc, tb)
        # Off a terminal, rich writes the last frame without a line end; whatever
        # is printed next (the summary) must start on a line of its own.
        if self._shown and not self.console.is_terminal and not self.console.is_jupyter:
            self.console.line()

    def update(self, snap: Snapshot) -> None:
        self._shown = True
        self._live.update(self.render(snap, self._rate.add(snap.elapsed_s, snap.finished)))

    @staticmethod
    def render(snap: Snapshot, rate: float) -> RenderableType:
        c = snap.counts
        head = Text.assemble(
            ("kubeque demo ", "bold"),
            (snap.phase, "cyan"),
            f"   {snap.elapsed_s:5.1f} s   ",
            (f"{snap.finished}/{snap.total} done", "bold"),
            f"   added {snap.added}/{snap.total}",
        )
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(1, snap.total), completed=snap.finished, width=60),
            f"{100 * snap.finished / max(1, snap.total):3.0f}%",
        )
        table = Table(box=None, padding=(0, 2), show_edge=False)
        for col in ("pending", "in flight", "completed", "failed", "throughput", "workers"):
            table.add_column(col, justify="right")
        workers_style = "green" if snap.workers_alive == snap.workers_total else "red"
        table.add_row(
            str(c.get("pending", 0)),
            str(c.get("processing", 0)),
            Text(str(c.get("completed", 0)), style="green"),
            Text(str(c.get("failed", 0)), style="red" if c.get("failed") else ""),
            f"{rate:6.0f}/s",
            Text(f"{snap.workers_alive}/{snap.workers_total}", style=workers_style),
        )
        return Group(head, bar, table)


class NoProgress:
    """Stands in for :class:`LiveProgress` under --json: shows nothing."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, snap: Snapshot) -> None:
        return None

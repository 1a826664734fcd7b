"""What must hold at the end of a demo run, checked from the tasks as the store holds them and the files written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..task import DEFAULT_MAX_RETRIES, Task, TaskStatus
from .mailserver import mailbox_file

_SHOW = 3  # offending task ids named in a failed check's detail


@dataclass(frozen=True)
class Invariant:
    """One check: its name, whether it held, and what was seen."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def attempts(task: Task) -> int:
    """Attempts the task spent: starts, less those handed back at shutdown (which spend none)."""
    return sum(1 for entry in task.log if entry.get("outcome") != "released")


def last_outcome(task: Task) -> str | None:
    outcome = task.log[-1].get("outcome") if task.log else None
    return outcome if isinstance(outcome, str) else None


def check_invariants(
    tasks: Sequence[Task], *, expected_total: int, poison_id: str, hung_id: str, output_dir: Path
) -> list[Invariant]:
    """Every check, in a fixed order; a run passes when all hold."""
    by_id = {t.id: t for t in tasks}
    checks = [
        _count(tasks, expected_total),
        _all_terminal(tasks),
        _attempts_bounded(tasks),
        _poison(by_id.get(poison_id)),
        _hung(by_id.get(hung_id)),
        _outputs_exist(tasks, output_dir),
        _emails_match(tasks, output_dir),
    ]
    return checks


def _ids(tasks: Sequence[Task]) -> str:
    shown = ", ".join(t.id for t in tasks[:_SHOW])
    return shown + (f" and {len(tasks) - _SHOW} more" if len(tasks) > _SHOW else "")


def _count(tasks: Sequence[Task], expected: int) -> Invariant:
    ok = len(tasks) == expected
    return Invariant("all tasks stored", ok, f"{len(tasks)} of {expected} tasks found in the queue")


def _all_terminal(tasks: Sequence[Task]) -> Invariant:
    done = (TaskStatus.COMPLETED, TaskStatus.FAILED)
    open_ = [t for t in tasks if t.status not in done]
    if not open_:
        return Invariant("every task terminal", True, f"all {len(tasks)} tasks completed or failed")
    return Invariant("every task terminal", False, f"{len(open_)} tasks not completed or failed: {_ids(open_)}")


def _max_retries(task: Task) -> int:
    # The demo adds every task where its handler is registered, so the limit is stored.
    return task.max_retries if task.max_retries is not None else DEFAULT_MAX_RETRIES


def _attempts_bounded(tasks: Sequence[Task]) -> Invariant:
    over = [t for t in tasks if attempts(t) > 1 + _max_retries(t)]
    if not over:
        top = max((attempts(t) for t in tasks), default=0)
        return Invariant("attempts <= 1 + max_retries", True, f"most attempts by one task: {top}")
    worst = max(over, key=lambda t: attempts(t) - _max_retries(t))
    return Invariant(
        "attempts <= 1 + max_retries",
        False,
        f"{len(over)} tasks ran too often, e.g. {worst.id}: {attempts(worst)} attempts with max_retries "
        f"{_max_retries(worst)} ({_ids(over)})",
    )


def _poison(task: Task | None) -> Invariant:
    name = "poison task exhausted its retries"
    if task is None:
        return Invariant(name, False, "the poison task is missing")
    want = 1 + _max_retries(task)
    ok = task.status is TaskStatus.FAILED and attempts(task) == want
    return Invariant(name, ok, f"status {task.status}, {attempts(task)} attempts (expected failed after {want})")


def _hung(task: Task | None) -> Invariant:
    name = "hung task stopped at its deadline"
    if task is None:
        return Invariant(name, False, "the hung task is missing")
    outcome = last_outcome(task)
    ok = task.status is TaskStatus.FAILED and outcome == "timeout"
    return Invariant(
        name, ok, f"status {task.status}, last outcome {outcome} after {task.max_processing_time} ms deadline"
    )


def _output_path(task: Task, output_dir: Path) -> Path | None:
    result = task.result if isinstance(task.result, dict) else {}
    if task.handler == "send_email":
        message_id = result.get("message_id")
        return mailbox_file(output_dir / "mail", message_id) if isinstance(message_id, str) else None
    path = result.get("path")
    return Path(path) if isinstance(path, str) else None


_HAS_OUTPUT = frozenset({"make_thumbnail", "send_email", "write_report"})


def _outputs_exist(tasks: Sequence[Task], output_dir: Path) -> Invariant:
    done = [t for t in tasks if t.status is TaskStatus.COMPLETED and t.handler in _HAS_OUTPUT]
    missing = [t for t in done if (p := _output_path(t, output_dir)) is None or not p.is_file()]
    if not missing:
        return Invariant("every output file exists", True, f"{len(done)} thumbnails, emails and reports on disk")
    return Invariant("every output file exists", False, f"{len(missing)} completed tasks lack output: {_ids(missing)}")


def _emails_match(tasks: Sequence[Task], output_dir: Path) -> Invariant:
    sent = sum(1 for t in tasks if t.handler == "send_email" and t.status is TaskStatus.COMPLETED)
    files = sum(1 for _ in (output_dir / "mail").glob("*.eml"))
    return Invariant(
        "one mail file per completed email", files == sent, f"{files} message files, {sent} completed email tasks"
    )

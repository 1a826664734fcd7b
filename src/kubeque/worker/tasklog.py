"""The task log of a worker process: one line per state change, never a payload."""

from __future__ import annotations

import logging
from typing import Any

from ..events import TaskEvent
from ..manager import QueueManager
from ..task import Task, sanitise_error

#: Error text in a log line is cut here; the task's own log keeps all of it (``kubeque tasks show``).
LOGGED_ERROR_CHARS = 500

#: What a warning about a stopped attempt that will be retried says happened, by outcome.
_STUCK_WHAT = {
    "timeout": "ran past its max_processing_time and was stopped",
    "lost": "was reclaimed after its worker stopped renewing the lease",
}


def log_state_changes(queue: QueueManager) -> None:
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

"""Prometheus metrics for a queue and its worker, fed by the manager's events.

Counters and histograms follow the task events (one listener each); gauges
read the worker at scrape time, and the queue's depth comes from a periodic
``depth()`` call (:meth:`Metrics.refresh`), never from a scrape. Labels are
``queue`` and ``handler`` only, plus ``outcome`` on ``kubeque_tasks_total``.

Usable without the CLI::

    metrics = Metrics(queue)              # its own CollectorRegistry
    metrics.attach(await queue.start_worker(4))
    await metrics.refresh()               # now and then
    text = metrics.exposition()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..events import TaskEvent
from ..task import QueueDepth

if TYPE_CHECKING:
    from ..manager import QueueManager
    from .runtime import Worker

#: Values of the ``outcome`` label: each ended attempt counts once, as
#: completed, retried (failed, will run again) or failed (failed for good).
OUTCOMES = ("completed", "retried", "failed")

# Seconds; tasks range from milliseconds to the 10-minute default deadline.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def queue_label(manager: QueueManager) -> str:
    """The ``queue`` label: the manager's name if one was given, else the store's
    own queue name (the Postgres schema, the Redis queue)."""
    if manager.name != "default":
        return manager.name
    for attr in ("schema", "queue"):
        value = getattr(manager.repository, attr, None)
        if isinstance(value, str) and value:
            return value
    return manager.name


class Metrics:
    """The kubeque metric families of one queue, registered in ``registry``."""

    def __init__(
        self, manager: QueueManager, registry: CollectorRegistry | None = None, *, queue: str | None = None
    ) -> None:
        self.manager = manager
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.queue = queue or queue_label(manager)
        reg = self.registry
        self.tasks = Counter(
            "kubeque_tasks",
            "Task attempts that ended, by outcome: completed, retried (failed, will run again), failed (for good).",
            ["queue", "handler", "outcome"],
            registry=reg,
        )
        self.retries = Counter(
            "kubeque_task_retries",
            "Failed attempts that were scheduled to run again.",
            ["queue", "handler"],
            registry=reg,
        )
        self.duration = Histogram(
            "kubeque_task_duration_seconds",
            "How long attempts ran in this worker, whatever their outcome.",
            ["queue", "handler"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.wait = Histogram(
            "kubeque_task_wait_seconds",
            "How long tasks waited between becoming due and being started.",
            ["queue", "handler"],
            buckets=WAIT_BUCKETS,
            registry=reg,
        )
        self.in_flight = Gauge("kubeque_tasks_in_flight", "Tasks this worker is running now.", ["queue"], registry=reg)
        self.slots = Gauge("kubeque_worker_slots", "Tasks this worker may run at once.", ["queue"], registry=reg)
        self.pending = Gauge(
            "kubeque_queue_pending", "Pending tasks in the queue, due or scheduled later.", ["queue"], registry=reg
        )
        self.oldest_age = Gauge(
            "kubeque_queue_oldest_pending_age_seconds",
            "How long the oldest due pending task has waited (0 when none is due).",
            ["queue"],
            registry=reg,
        )
        for gauge in (self.in_flight, self.slots, self.pending, self.oldest_age):
            gauge.labels(self.queue).set(0)
        self._known_handlers: set[str] = set()
        self._init_handlers()
        self._listeners = {
            "task_started": self._on_started,
            "task_completed": self._on_completed,
            "task_retried": self._on_retried,
            "task_failed": self._on_failed,
        }
        for name, listener in self._listeners.items():
            manager.on(name, listener)

    # --- wiring ------------------------------------------------------------

    def attach(self, worker: Worker) -> None:
        """Read in-flight tasks and slots from ``worker`` (at scrape time)."""
        self._init_handlers()
        self.slots.labels(self.queue).set(worker.concurrency)
        self.in_flight.labels(self.queue).set_function(lambda: worker.in_flight)

    def _init_handlers(self) -> None:
        # Series that exist at 0 from the start make rate() and alerts work
        # before the first task of a handler ends.
        for handler in self.manager.handlers.names():
            if handler in self._known_handlers:
                continue
            self._known_handlers.add(handler)
            for outcome in OUTCOMES:
                self.tasks.labels(self.queue, handler, outcome)
            self.retries.labels(self.queue, handler)

    def detach(self) -> None:
        """Stop listening to the manager's events (the families stay registered)."""
        for name, listener in self._listeners.items():
            self.manager.off(name, listener)
        self.in_flight.labels(self.queue).set(0)

    async def refresh(self) -> QueueDepth:
        """Read the queue's depth from the store and set the queue gauges; raises if the store is away."""
        depth = await self.manager.depth()
        self.pending.labels(self.queue).set(depth.pending)
        self.oldest_age.labels(self.queue).set(depth.oldest_pending_age_s or 0.0)
        return depth

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    # --- listeners ---------------------------------------------------------

    def _handler(self, event: TaskEvent) -> str:
        return event.task.handler if event.task is not None else "unknown"

    def _on_started(self, event: TaskEvent) -> None:
        if event.wait_s is not None:
            self.wait.labels(self.queue, self._handler(event)).observe(event.wait_s)

    def _ended(self, event: TaskEvent, outcome: str) -> None:
        handler = self._handler(event)
        self.tasks.labels(self.queue, handler, outcome).inc()
        # Reclaimed attempts ran elsewhere: no duration is known for them.
        if event.duration_s is not None:
            self.duration.labels(self.queue, handler).observe(event.duration_s)

    def _on_completed(self, event: TaskEvent) -> None:
        self._ended(event, "completed")

    def _on_retried(self, event: TaskEvent) -> None:
        self._ended(event, "retried")
        self.retries.labels(self.queue, self._handler(event)).inc()

    def _on_failed(self, event: TaskEvent) -> None:
        self._ended(event, "failed")

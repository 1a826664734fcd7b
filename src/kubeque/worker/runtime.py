"""The worker: takes tasks into free slots, runs them, records the outcome.

Sync handlers run in a thread pool, async ones on the loop. Each attempt runs
under its deadline (``max_processing_time``). Shutdown stops taking at once,
waits for running tasks within the grace period and returns the rest to
pending without spending an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..errors import KubequeError, PayloadError, one_line
from ..events import TaskEvent
from ..handlers import describe_validation
from ..task import Completion, FailOutcome, Failure, Lease, Task, backoff_ms, encode_json, sanitise_error
from .completions import CompletionBatcher, CompletionRefused
from .leases import LeaseKeeper, Reclaimer
from .pruner import Pruner

if TYPE_CHECKING:
    from ..manager import QueueManager


@dataclass
class Running:
    task: Task
    started: float
    job: asyncio.Task[None] | None = None
    finishing: bool = False  # the handler is done and its outcome is being written: never cancelled
    lost: bool = False  # removed, changed or reclaimed elsewhere while it ran
    released: bool = False  # handed back to pending at shutdown
    thread: Future[Any] | None = None  # a sync handler's thread, which may outlive the attempt

    @property
    def key(self) -> Lease:
        return Lease(self.task.id, self.task.attempt)


@dataclass
class WorkerCounters:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    reclaimed: int = 0
    released: int = 0
    started: int = 0


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        manager: QueueManager,
        concurrency: int = 1,
        *,
        worker_id: str | None = None,
        lease_ms: int | None = None,
        poll_interval: float | None = None,
        reclaim_interval: float | None = None,
        reclaim: bool = True,
    ) -> None:
        if not isinstance(concurrency, int) or concurrency < 1:
            raise KubequeError(f"concurrency must be an integer >= 1, not {concurrency!r}")
        self.manager = manager
        self.repo = manager.repository
        self.logger: logging.Logger = manager.logger
        self.concurrency = concurrency
        self.id = worker_id or default_worker_id()
        self.lease_ms = lease_ms or manager.lease_ms
        self.poll_interval = poll_interval or manager.poll_interval
        self.counters = WorkerCounters()
        self.running = False
        # Keyed by attempt: a task reclaimed elsewhere may come back to this
        # worker while its earlier attempt is still stopping here.
        self._in_flight: dict[Lease, Running] = {}
        self._stuck_threads = 0  # sync handlers past their deadline or cancelled, still running
        self._give_up_at: float | None = None  # at shutdown: stop retrying store writes after this
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._crash: BaseException | None = None
        self._threads = ThreadPoolExecutor(max_workers=concurrency + 4, thread_name_prefix="kubeque-task")
        self._completions = CompletionBatcher(self.repo, self.logger)
        self._leases = LeaseKeeper(self.repo, self.id, self.lease_ms, self._held, self._on_lost, self.logger)
        self._reclaimer = (
            Reclaimer(
                self.repo,
                reclaim_interval or max(0.2, self.lease_ms / 2000),
                self._on_reclaimed,
                self.logger,
                effective=manager.effective,
            )
            if reclaim
            else None
        )
        self._pruner = (
            Pruner(manager, manager.retention_ms, manager.prune_interval, self.logger)
            if manager.retention_ms is not None
            else None
        )
        self._loops: list[asyncio.Task[None]] = []
        self._done = asyncio.Event()

    # --- public ------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def free_slots(self) -> int:
        # A thread cannot be interrupted: it keeps its slot until it returns.
        return self.concurrency - len(self._in_flight) - self._stuck_threads

    @property
    def dead_loop(self) -> str | None:
        """The name of a background loop that ended while not stopping (a bug; for liveness probes), else None."""
        if self._stopping.is_set():
            return None
        loops = [*self._loops, *([self._completions.task] if self._completions.task else [])]
        return next((t.get_name() for t in loops if t.done()), None)

    async def start(self) -> None:
        self.running = True
        self._completions.start()
        self._loops = [
            asyncio.create_task(self._take_loop(), name="kubeque-take"),
            asyncio.create_task(self._leases.run(), name="kubeque-leases"),
        ]
        if self._reclaimer is not None:
            self._loops.append(asyncio.create_task(self._reclaimer.run(), name="kubeque-reclaim"))
        if self._pruner is not None:
            self._loops.append(asyncio.create_task(self._pruner.run(), name="kubeque-prune"))
        self.logger.debug("worker %s started with %s", self.id, plural(self.concurrency, "slot"))

    async def wait(self) -> None:
        """Block until the worker stops; re-raise a handler error under crash_on_worker_error."""
        await self._done.wait()
        if self._crash is not None:
            raise self._crash

    async def stop(self, grace: float = 30.0) -> None:
        if not self.running:
            return
        self._stopping.set()
        take = self._loops[0]
        with contextlib.suppress(asyncio.CancelledError):
            await take
        jobs = [r.job for r in self._in_flight.values() if r.job is not None]
        if jobs:
            self.logger.info("waiting up to %.0fs for %s", grace, plural(len(jobs), "running task"))
            await asyncio.wait(jobs, timeout=grace)
        # Handlers still running go back to pending at once (a late result of a
        # released attempt fails its guard); outcomes already being written are
        # let through, or a finished task would run again.
        leftover = [r for r in self._in_flight.values() if not r.finishing]
        if leftover:
            for r in leftover:
                r.released = True
                if r.job is not None:
                    r.job.cancel()
            try:
                released = await self.repo.release([r.key for r in leftover])
                self.counters.released += len(released)
                self.logger.info("returned %s to pending", plural(len(released), "unfinished task"))
            except Exception as exc:
                self.logger.warning(
                    "could not release %s (%s); their leases will expire", plural(len(leftover), "task"), exc
                )
        # One deadline for everything still being written or cancelled.
        loop = asyncio.get_running_loop()
        self._give_up_at = loop.time() + self._completions.give_up_after
        self._completions.begin_close(self._give_up_at)
        remaining = [r.job for r in self._in_flight.values() if r.job is not None]
        if remaining:
            await asyncio.wait(remaining, timeout=self._completions.give_up_after + 1)
            stuck = [j for j in remaining if not j.done()]
            for j in stuck:
                j.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=1)
        await self._completions.close()
        for loop_task in self._loops[1:]:
            loop_task.cancel()
        await asyncio.gather(*self._loops[1:], return_exceptions=True)
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.running = False
        self._done.set()
        self.logger.info(
            "worker %s stopped: %d completed, %d failed, %d retried",
            self.id,
            self.counters.completed,
            self.counters.failed,
            self.counters.retried,
        )

    # --- taking ------------------------------------------------------------

    def _held(self) -> list[Lease]:
        # Finishing runs too: their outcome may wait on a store that is away.
        return list(self._in_flight)

    def _on_lost(self, lease: Lease) -> None:
        """The store no longer gives us this attempt: stop its handler, write nothing."""
        run = self._in_flight.get(lease)
        if run is None or run.finishing or run.lost:
            return
        run.lost = True
        self.logger.warning(
            "task %s (attempt %d) was removed, changed or reclaimed elsewhere while it ran; stopping it",
            lease.id,
            lease.attempt,
        )
        if run.job is not None:
            run.job.cancel()

    async def _take_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self.free_slots
            got = 0
            if free > 0:
                try:
                    tasks = await self.repo.dequeue(self.id, free, self.lease_ms)
                    failures = 0
                except Exception as exc:
                    failures += 1
                    delay = min(0.1 * 2**failures, 5.0)
                    why = one_line(exc)
                    if not why.startswith("could not"):
                        why = f"could not take tasks: {why}"
                    self.logger.warning("%s; trying again in %.1fs", why, delay)
                    await self._sleep_unless_stopping(delay)
                    continue
                got = len(tasks)
                for t in tasks:
                    self._spawn(t)
                if got == free:
                    continue  # there may be more waiting
            await self._wait_for_reason(want_work=self.free_slots > 0)

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    async def _wait_for_reason(self, want_work: bool) -> None:
        """Sleep until new work is announced, a slot frees up, the poll interval passes, or stop."""
        self._slot_free.clear()
        waits: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._stopping.wait()),
            asyncio.create_task(self._slot_free.wait()),
        ]
        if want_work:
            waits.append(asyncio.create_task(self.repo.wait_for_work(self.poll_interval)))
        else:
            waits.append(asyncio.create_task(asyncio.sleep(self.poll_interval)))
        await first_of(waits)

    def _spawn(self, task: Task) -> None:
        run = Running(task=task, started=time.monotonic())
        self._in_flight[run.key] = run
        self.counters.started += 1
        run.job = asyncio.create_task(self._run(run), name=f"kubeque-task-{task.id}")

    # --- running -----------------------------------------------------------

    async def _run(self, run: Running) -> None:
        task = run.task
        try:
            await self._emit("task_started", task, wait_s=_wait_seconds(task))
            await self._execute(run)
        except asyncio.CancelledError:
            if not (run.released or run.lost):
                raise
        except Exception:
            # A bug in kubeque itself must not kill the worker; the lease will
            # expire and the task will be reclaimed.
            self.logger.exception("internal error while running task %s", task.id)
        finally:
            self._in_flight.pop(run.key, None)
            if run.thread is not None and not run.thread.done():
                self._hold_slot_for(run)
            self._slot_free.set()

    async def _execute(self, run: Running) -> None:
        task = run.task
        handler = self.manager.handlers.get(task.handler)
        if handler is None:
            known = ", ".join(self.manager.handlers.names()) or "none"
            await self._fail(
                run,
                f"no handler named {task.handler!r} is registered in this worker (registered: {known})",
                outcome="unknown_handler",
                final=True,
            )
            return
        try:
            arg = handler.decode(task.payload)
        except Exception as exc:
            await self._fail(
                run,
                f"the payload does not match the handler's schema (it was added where the handler was not "
                f"registered, or the schema changed since): {describe_validation(handler.name, exc)}",
                outcome="invalid_payload",
                final=True,
            )
            return
        args: tuple[Any, ...] = (arg, task) if handler.wants_task else (arg,)
        _, max_processing_time, _ = self.manager.effective(task)
        deadline = max_processing_time / 1000
        try:
            if handler.is_async:
                result = await _within(handler.fn(*args), deadline)
            else:
                result = await self._call_in_thread(run, functools.partial(handler.fn, *args), deadline)
        except DeadlineExceeded:
            error = f"attempt exceeded max_processing_time of {max_processing_time} ms and was stopped"
            await self._fail(run, error, outcome="timeout", stuck=True)
            return
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if run.released or run.lost or (current is not None and current.cancelling()):
                raise  # the worker cancelled it: shutdown or a lost lease
            # The handler raised CancelledError itself: an error like any other.
            await self._fail(run, f"CancelledError raised by the handler: {exc}", outcome="error")
            self._crash_if_asked(exc)
            return
        except Exception as exc:
            if run.released or run.lost:
                # Cancelled by the worker, and the handler turned that into
                # another error: still not a failed attempt.
                raise asyncio.CancelledError from exc
            await self._fail(run, f"{type(exc).__name__}: {exc}", outcome="error")
            self._crash_if_asked(exc)
            return
        if run.released or run.lost:
            return  # it ignored being stopped; its attempt is no longer this worker's
        run.finishing = True
        try:
            stored = json.loads(encode_json(result, what="handler result")) if result is not None else None
        except PayloadError as exc:
            await self._fail(run, str(exc), outcome="error")
            return
        duration = time.monotonic() - run.started
        try:
            landed = await self._completions.complete(Completion(task.id, task.attempt, stored))
        except CompletionRefused as exc:
            await self._fail(run, str(exc), outcome="error")
            return
        if landed:
            self.counters.completed += 1
            await self._emit("task_completed", task, result=stored, duration_s=duration, outcome="completed")
        else:
            self.logger.warning(
                "result of task %s (attempt %d) not stored: the task was removed, changed or reclaimed while it ran",
                task.id,
                task.attempt,
            )

    def _crash_if_asked(self, exc: BaseException) -> None:
        if self.manager.crash_on_worker_error and self._crash is None:
            self._crash = exc
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.stop(0)))

    async def _call_in_thread(self, run: Running, call: functools.partial[Any], deadline: float) -> Any:
        run.thread = self._threads.submit(call)
        waiting = asyncio.wrap_future(run.thread)
        try:
            done, _ = await asyncio.wait({waiting}, timeout=deadline)
        except asyncio.CancelledError:
            waiting.cancel()  # cancels the thread's work if it has not started
            raise
        if not done:
            waiting.cancel()
            raise DeadlineExceeded
        return waiting.result()  # the handler's own TimeoutError is an ordinary error

    def _hold_slot_for(self, run: Running) -> None:
        """A thread cannot be interrupted: its slot stays taken until it returns."""
        assert run.thread is not None
        loop = asyncio.get_running_loop()
        self._stuck_threads += 1
        self.logger.warning(
            "the thread running task %s (attempt %d) cannot be interrupted; its slot stays taken until it "
            "returns (%s stuck)",
            run.task.id,
            run.task.attempt,
            plural(self._stuck_threads, "thread"),
        )
        run.thread.add_done_callback(lambda _: _call_soon(loop, self._thread_returned))

    def _thread_returned(self) -> None:
        self._stuck_threads -= 1
        self._slot_free.set()

    async def _fail(
        self, run: Running, error: str, *, outcome: str, final: bool = False, stuck: bool = False
    ) -> FailOutcome | None:
        """Record a failed attempt; ``stuck``: it was stopped at its deadline."""
        run.finishing = True
        task = run.task
        error = sanitise_error(error)  # also done by Failure; the events carry this text
        self.logger.debug("task %s attempt %d failed: %s", task.id, task.attempt, outcome)
        max_retries, _, backoff = self.manager.effective(task)
        failure = Failure(
            id=task.id,
            attempt=task.attempt,
            error=error,
            retry_delay_ms=backoff_ms(backoff, task.retry_count),
            outcome=outcome,
            final=final,
            max_retries=max_retries,
        )
        result: FailOutcome | None = await self._with_retries(lambda: self.repo.fail(failure))
        duration = time.monotonic() - run.started
        if stuck and result is not None:
            self.counters.timed_out += 1
            await self._emit("task_stuck", task, error=error, outcome=outcome)
        if result is FailOutcome.RETRIED:
            self.counters.retried += 1
            await self._emit("task_retried", task, error=error, duration_s=duration, outcome=outcome)
        elif result is FailOutcome.FAILED:
            self.counters.failed += 1
            await self._emit("task_failed", task, error=error, duration_s=duration, outcome=outcome)
        else:
            self.logger.warning(
                "failure of task %s (attempt %d) not stored: the task was removed, changed or reclaimed while it ran",
                task.id,
                task.attempt,
            )
        return result

    async def _with_retries(self, op: Any) -> Any:
        """Retry a store write through a passing fault (about 15 s), less at shutdown."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        for attempt in range(9):
            try:
                return await op()
            except Exception as exc:
                out_of_time = self._give_up_at is not None and loop.time() + delay > self._give_up_at
                if attempt == 8 or out_of_time:
                    raise
                self.logger.warning("store call failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 3.0)
        raise AssertionError("unreachable")

    async def _on_reclaimed(self, task: Task, outcome: FailOutcome, error: str) -> None:
        self.counters.reclaimed += 1
        await self._emit("task_stuck", task, error=error, outcome="lost")
        name = "task_retried" if outcome is FailOutcome.RETRIED else "task_failed"
        await self._emit(name, task, error=error, outcome="lost")

    async def _emit(self, name: str, task: Task, **data: Any) -> None:
        if self.manager.events.has_listeners(name):
            await self.manager.events.emit(TaskEvent(name, task=task, task_id=task.id, **data))


async def first_of(waits: list[asyncio.Task[Any]]) -> None:
    """Wait until one of the tasks ends, then cancel and reap the others."""
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


class DeadlineExceeded(Exception):
    """An attempt ran past its max_processing_time (not a TimeoutError of the handler's own)."""


async def _within(coro: Any, deadline: float) -> Any:
    """Await a handler under its deadline, telling the deadline from the handler's own timeouts."""
    try:
        async with asyncio.timeout(deadline) as scope:
            return await coro
    except TimeoutError:
        if scope.expired():
            raise DeadlineExceeded from None
        raise


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any) -> None:
    # From a handler thread; the loop may be gone if the worker has stopped.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


def plural(count: int, word: str) -> str:
    """``1 task``, ``2 tasks``."""
    return f"{count} {word if count == 1 else word + 's'}"


def _wait_seconds(task: Task) -> float | None:
    if not task.log:
        return None
    started = task.log[-1].get("started_at")
    if not isinstance(started, str):
        return None
    try:
        return max(0.0, (datetime.fromisoformat(started) - task.run_at).total_seconds())
    except ValueError:
        return None

"""Batched completion: results written in one statement per batch.

Whatever accumulates while one write is in flight goes out in the next, so
batches grow with load and add no latency when the queue is quiet. A batch
never holds two attempts of one task: the store answers with ids.

A failed batch is written again one completion at a time, so one result the
store refuses cannot hold back the others. A single failed write is retried
while the store is away or busy; it is refused for good only when the store
keeps answering a probe (``depth()``) and keeps rejecting that write.
At shutdown everything left is given one deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..backends.base import Repository
from ..errors import BackendError
from ..task import Completion

# Failed writes of one result, with the store answering each time, before it is refused.
REFUSALS_BEFORE_GIVING_UP = 3


class CompletionRefused(BackendError):
    """The store is reachable but refuses to record this result."""


Pending = tuple[Completion, "asyncio.Future[bool]"]


class CompletionBatcher:
    def __init__(self, repository: Repository, logger: logging.Logger, max_batch: int = 500) -> None:
        self._repo = repository
        self._logger = logger
        self._max_batch = max_batch
        self._queue: list[Pending] = []
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._give_up_at: float | None = None
        self.task: asyncio.Task[None] | None = None
        #: at shutdown, how long to keep trying to store results while the store is away
        self.give_up_after = 15.0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="kubeque-completions")

    async def complete(self, c: Completion) -> bool:
        """Queue one completion; True once stored, False if its guard failed (or the
        store stayed away through shutdown). Raises CompletionRefused."""
        if self._closing.is_set() and (self.task is None or self.task.done()):
            return False  # closed: nobody would write it
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((c, fut))
        self._wake.set()
        return await fut

    def begin_close(self, deadline: float) -> None:
        """Shutdown: keep writing, but give up on an absent store at ``deadline`` (loop time)."""
        self._give_up_at = deadline
        self._closing.set()
        self._wake.set()

    async def close(self) -> None:
        """Flush everything queued (within the deadline), then stop."""
        if not self._closing.is_set():
            self.begin_close(asyncio.get_running_loop().time() + self.give_up_after)
        if self.task is not None:
            await self.task
            self.task = None

    def _next_batch(self) -> list[Pending]:
        batch: list[Pending] = []
        rest: list[Pending] = []
        ids: set[str] = set()
        for item in self._queue:
            if len(batch) < self._max_batch and item[0].id not in ids:
                ids.add(item[0].id)
                batch.append(item)
            else:
                rest.append(item)
        self._queue = rest
        return batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._write(self._next_batch())
            if self._closing.is_set():
                return

    def _past_deadline(self) -> bool:
        return self._give_up_at is not None and asyncio.get_running_loop().time() >= self._give_up_at

    async def _write(self, batch: list[Pending]) -> None:
        if self._past_deadline():
            self._give_up(batch, "the shutdown deadline passed")
            return
        try:
            landed = set(await self._repo.complete([c for c, _ in batch]))
        except Exception as exc:
            self._logger.warning("could not store %d completions (%s); writing them one by one", len(batch), exc)
            for item in batch:
                await self._write_one(*item)
            return
        for c, fut in batch:
            if not fut.done():
                fut.set_result(c.id in landed)

    async def _write_one(self, c: Completion, fut: asyncio.Future[bool]) -> None:
        delay, refusals = 0.05, 0
        while not fut.done():
            if self._past_deadline():
                self._give_up([(c, fut)], "the store stayed away through shutdown")
                return
            try:
                fut.set_result(c.id in await self._repo.complete([c]))
                return
            except Exception as exc:
                if await self._store_answers():
                    refusals += 1
                    if refusals >= REFUSALS_BEFORE_GIVING_UP:
                        fut.set_exception(CompletionRefused(f"the store refused the result of task {c.id}: {exc}"))
                        return
                # Away or busy (a lock, a dropped connection): keep the result
                # and try again, so a passing fault does not lose a completion.
                self._logger.warning("could not store a completion (%s); retrying in %.2fs", exc, delay)
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)

    def _give_up(self, items: list[Pending], why: str) -> None:
        if items:
            self._logger.error(
                "gave up storing %d results (%s); their leases will expire and they will be retried",
                len(items),
                why,
            )
        for _, fut in items:
            if not fut.done():
                fut.set_result(False)

    async def _sleep(self, delay: float) -> None:
        """Back off, but no further than the shutdown deadline."""
        if self._give_up_at is not None:
            delay = max(0.0, min(delay, self._give_up_at - asyncio.get_running_loop().time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing_or_never(), delay)

    async def _closing_or_never(self) -> None:
        # Wakes a backoff when shutdown begins, so the deadline is applied at once.
        if self._give_up_at is None:
            await self._closing.wait()
        else:
            await asyncio.Event().wait()

    async def _store_answers(self) -> bool:
        try:
            await self._repo.depth()  # a real round trip on every store
            return True
        except Exception:
            return False

"""Batched completion: results written in one statement per batch.

Whatever accumulates while one write is in flight goes out in the next, so
batches grow with load and add no latency when the queue is quiet.

A failed batch is written again one completion at a time, so one result the
store refuses cannot hold back the others. A single failed write is retried
while the store itself is away (a cheap probe fails) and refused for good when
the store answers the probe but still rejects that completion.
"""

from __future__ import annotations

import asyncio
import logging

from ..backends.base import Repository
from ..errors import BackendError
from ..task import Completion


class CompletionRefused(BackendError):
    """The store is reachable but refuses to record this result."""


class CompletionBatcher:
    def __init__(self, repository: Repository, logger: logging.Logger, max_batch: int = 500) -> None:
        self._repo = repository
        self._logger = logger
        self._max_batch = max_batch
        self._queue: list[tuple[Completion, asyncio.Future[bool]]] = []
        self._wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._closing = False
        #: at shutdown, stop waiting for an unreachable store after this many seconds
        self.give_up_after = 15.0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="kubeque-completions")

    async def complete(self, c: Completion) -> bool:
        """Queue one completion; True once stored, False if its guard failed (or the
        store stayed away through shutdown). Raises CompletionRefused."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((c, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                await self._write(batch)
            if self._closing:
                return

    async def _write(self, batch: list[tuple[Completion, asyncio.Future[bool]]]) -> None:
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
        loop = asyncio.get_running_loop()
        started, delay = loop.time(), 0.05
        while not fut.done():
            try:
                fut.set_result(c.id in await self._repo.complete([c]))
                return
            except Exception as exc:
                if await self._store_answers():
                    fut.set_exception(CompletionRefused(f"the store refused the result of task {c.id}: {exc}"))
                    return
                if self._closing and loop.time() - started > self.give_up_after:
                    self._logger.error(
                        "gave up storing the result of task %s at shutdown (%s); its lease will expire "
                        "and it will be retried",
                        c.id,
                        exc,
                    )
                    fut.set_result(False)
                    return
                # The store is away: keep the result and try again, so a
                # dropped connection does not lose a completion.
                self._logger.warning("store unreachable (%s); retrying a completion in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _store_answers(self) -> bool:
        try:
            await self._repo.now()
            return True
        except Exception:
            return False

    async def close(self) -> None:
        """Flush everything queued, then stop."""
        self._closing = True
        self._wake.set()
        if self.task is not None:
            await self.task
            self.task = None

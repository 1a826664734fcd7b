"""Batched completion: results written in one statement per batch.

Whatever accumulates while one write is in flight goes out in the next, so
batches grow with load and add no latency when the queue is quiet.
"""

from __future__ import annotations

import asyncio
import logging

from ..backends.base import Repository
from ..task import Completion


class CompletionBatcher:
    def __init__(self, repository: Repository, logger: logging.Logger, max_batch: int = 500) -> None:
        self._repo = repository
        self._logger = logger
        self._max_batch = max_batch
        self._queue: list[tuple[Completion, asyncio.Future[bool]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.give_up_after = 15.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kubeque-completions")

    async def complete(self, c: Completion) -> bool:
        """Queue one completion; resolve True once stored, False if its guard failed."""
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
        delay = 0.05
        loop = asyncio.get_running_loop()
        started = loop.time()
        landed: set[str] = set()
        while True:
            try:
                landed = set(await self._repo.complete([c for c, _ in batch]))
                break
            except Exception as exc:
                # The store is away: keep the results and try again, so a dropped
                # connection does not lose a completion.
                if self._closing and loop.time() - started > self.give_up_after:
                    self._logger.error(
                        "gave up storing %d completions at shutdown (%s); their leases will expire "
                        "and they will be retried",
                        len(batch),
                        exc,
                    )
                    break
                self._logger.warning("could not store %d completions (%s); retrying", len(batch), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for c, fut in batch:
            if not fut.done():
                fut.set_result(c.id in landed)

    async def close(self) -> None:
        """Flush everything queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

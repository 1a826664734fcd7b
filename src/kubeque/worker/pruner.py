"""Pruning: delete finished tasks older than the queue's retention, in bounded batches."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .chores import only_one

if TYPE_CHECKING:
    from ..manager import QueueManager


class Pruner:
    def __init__(self, manager: QueueManager, retention_ms: int, interval: float, logger: logging.Logger) -> None:
        self._manager = manager
        self._retention_ms = retention_ms
        self.interval = interval
        self._logger = logger

    async def prune_once(self) -> int:
        async with only_one(self._manager.repository, "prune") as mine:
            if not mine:
                return 0
            removed = await self._manager.purge(older_than=self._retention_ms)
            if removed:
                self._logger.info("pruned %d finished tasks older than %d ms", removed, self._retention_ms)
            return removed

    async def run(self) -> None:
        while True:
            try:
                await self.prune_once()
            except Exception as exc:
                self._logger.warning("could not prune finished tasks: %s", exc)
            await asyncio.sleep(self.interval)

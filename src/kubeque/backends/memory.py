"""In-process store: fast, lost at exit, one process only."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar

from ..task import utcnow
from .table import Op, TableRepository, TaskTable

__all__ = ["MemoryRepository", "TaskTable"]

_R = TypeVar("_R")


class MemoryRepository(TableRepository):
    """Tasks in a dict; refuses to be shared between processes."""

    name = "memory"
    multi_process = False

    def __init__(self) -> None:
        self._table = TaskTable()
        self._wake = asyncio.Event()

    async def _apply(self, op: Op[_R]) -> _R:
        return op(self._table, utcnow())

    def _wake_up(self) -> None:
        self._wake.set()

    async def wait_for_work(self, timeout: float) -> None:
        due = self._table.next_due()
        if due is not None:
            timeout = max(0.0, min(timeout, (due - utcnow()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

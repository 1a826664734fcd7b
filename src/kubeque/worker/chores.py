"""One process at a time for a queue's chores (reclaiming, pruning).

Stores that can lock across processes offer ``exclusive(chore)``; the others
need no lock because every state change is guarded anyway, and the lock only
saves duplicate work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..backends.base import Repository


@asynccontextmanager
async def only_one(repository: Repository, chore: str) -> AsyncIterator[bool]:
    exclusive = getattr(repository, "exclusive", None)
    if exclusive is None:
        yield True
        return
    async with exclusive(chore) as mine:
        yield bool(mine)

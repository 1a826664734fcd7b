"""Lease upkeep: renew what this worker runs, reclaim what dead workers left.

Renewal runs every third of the lease, so two renewals can fail before a live
worker's task looks abandoned. Reclaim counts the lost attempt as a failure,
guarded so that only one reclaimer's write lands for each attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from ..backends.base import Repository
from ..task import FailOutcome, Failure, Lease, Task, backoff_ms
from .chores import only_one


class LeaseKeeper:
    def __init__(
        self,
        repository: Repository,
        worker_id: str,
        lease_ms: int,
        held: Callable[[], Sequence[Lease]],
        on_lost: Callable[[Lease], None],
        logger: logging.Logger,
    ) -> None:
        self._repo = repository
        self._worker_id = worker_id
        self._lease_ms = lease_ms
        self._held = held
        self._on_lost = on_lost
        self._logger = logger

    @property
    def interval(self) -> float:
        return self._lease_ms / 3000

    async def renew(self) -> None:
        leases = list(self._held())
        if not leases:
            return
        renewed = set(await self._repo.heartbeat(self._worker_id, leases, self._lease_ms))
        # The store holds one attempt per task: an older attempt of a task this
        # worker took again is lost even though the id was renewed.
        newest: dict[str, int] = {}
        for lease in leases:
            newest[lease.id] = max(lease.attempt, newest.get(lease.id, 0))
        for lease in leases:
            if lease.id not in renewed or lease.attempt < newest[lease.id]:
                self._on_lost(lease)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.renew()
            except Exception as exc:
                self._logger.warning("could not renew leases: %s", exc)


OnReclaimed = Callable[[Task, FailOutcome, str], Awaitable[None]]


class Reclaimer:
    """Fails attempts whose lease ran out: their worker died or was cut off."""

    def __init__(
        self,
        repository: Repository,
        interval: float,
        on_reclaimed: OnReclaimed,
        logger: logging.Logger,
        batch: int = 100,
        *,
        effective: Callable[[Task], tuple[int, int, int]],
    ) -> None:
        self._repo = repository
        self._effective = effective
        self.interval = interval
        self._on_reclaimed = on_reclaimed
        self._logger = logger
        self._batch = batch

    async def reclaim_once(self) -> int:
        async with only_one(self._repo, "reclaim") as mine:
            return await self._reclaim() if mine else 0

    async def _reclaim(self) -> int:
        count = 0
        for task in await self._repo.expired(self._batch):
            error = f"lease expired: worker {task.worker} stopped renewing it (crashed or cut off)"
            max_retries, _, backoff = self._effective(task)
            outcome = await self._repo.fail(
                Failure(
                    id=task.id,
                    attempt=task.attempt,
                    error=error,
                    retry_delay_ms=backoff_ms(backoff, task.retry_count),
                    outcome="lost",
                    only_if_expired=True,
                    max_retries=max_retries,
                )
            )
            if outcome is not None:
                count += 1
                await self._on_reclaimed(task, outcome, error)
        return count

    async def run(self) -> None:
        while True:
            try:
                await self.reclaim_once()
            except Exception as exc:
                self._logger.warning("could not reclaim expired leases: %s", exc)
            await asyncio.sleep(self.interval)

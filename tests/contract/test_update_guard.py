"""A status change (a manual retry) never lands on a task that is processing.

The guard sits in the same atomic step as the change in every store, so a
worker that takes the task just before the retry keeps its attempt: the retry
is refused with TaskBusyError instead of turning the running attempt back to
pending while a second worker starts the next one. Only the status is guarded:
other fields of a processing task may still change.

Each test pairs what stays allowed with what the guard refuses, so each one
fails on a store without the guard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from kubeque.backends import make_repository
from kubeque.backends.base import Repository
from kubeque.errors import TaskBusyError, TaskNotFoundError
from kubeque.task import Completion, Failure, NewTask, Task, TaskStatus

from .conftest import StoreFactory

LEASE_MS = 60_000
RETRY = {"status": TaskStatus.PENDING, "retry_count": 0}


@pytest.fixture
async def repo(store_factory: StoreFactory) -> AsyncIterator[Repository]:
    r = make_repository(store_factory())
    await r.open()
    yield r
    await r.close()


async def take(repo: Repository, task_id: str, **kw: Any) -> Task:
    """Add one task and take it: it is now processing, held by worker 'w'."""
    await repo.add([NewTask(handler="h", payload={}, id=task_id, **kw)])
    [t] = await repo.dequeue("w", 1, LEASE_MS)
    assert (t.id, t.status) == (task_id, TaskStatus.PROCESSING)
    return t


async def assert_still_running(repo: Repository, taken: Task) -> Task:
    now = await repo.get(taken.id)
    assert now is not None
    assert (now.status, now.attempt, now.worker, now.lease_expires_at, now.retry_count) == (
        TaskStatus.PROCESSING,
        taken.attempt,
        taken.worker,
        taken.lease_expires_at,
        taken.retry_count,
    )
    return now


@pytest.mark.parametrize("fields", [RETRY, {"status": TaskStatus.PENDING}], ids=["with_retry_count", "status_only"])
async def test_retrying_a_processing_task_is_refused_and_its_attempt_runs_on(
    repo: Repository, fields: dict[str, Any]
) -> None:
    taken = await take(repo, "busy")
    with pytest.raises(TaskBusyError, match=r"busy.*processing"):
        await repo.update("busy", fields)
    await assert_still_running(repo, taken)
    assert await repo.dequeue("w2", 1, LEASE_MS) == []  # no second attempt starts beside it
    # The running attempt still owns the task: its completion lands.
    assert await repo.complete([Completion("busy", taken.attempt, {"ok": True})]) == ["busy"]


async def test_only_the_status_of_a_processing_task_is_guarded(repo: Repository) -> None:
    taken = await take(repo, "busy")
    changed = await repo.update("busy", {"priority": 7})
    assert changed.priority == 7
    await assert_still_running(repo, taken)
    with pytest.raises(TaskBusyError):
        await repo.update("busy", {**RETRY, "priority": 9})
    after = await assert_still_running(repo, taken)
    assert after.priority == 7  # a refused update changes nothing, not even its other fields


async def test_a_missing_task_is_not_found_and_a_processing_one_is_busy(repo: Repository) -> None:
    with pytest.raises(TaskNotFoundError):
        await repo.update("nope", RETRY)
    with pytest.raises(TaskNotFoundError):
        await repo.update("nope", {"priority": 1})
    await take(repo, "busy")
    with pytest.raises(TaskBusyError):
        await repo.update("busy", RETRY)


async def test_a_failed_task_can_still_be_retried_until_it_is_taken_again(repo: Repository) -> None:
    taken = await take(repo, "f", max_retries=0)
    assert await repo.fail(Failure("f", taken.attempt, "boom", 0)) is not None
    failed = await repo.get("f")
    assert failed is not None and failed.status is TaskStatus.FAILED
    again = await repo.update("f", RETRY)
    assert (again.status, again.retry_count, again.worker, again.lease_expires_at) == (
        TaskStatus.PENDING,
        0,
        None,
        None,
    )
    [second] = await repo.dequeue("w", 1, LEASE_MS)
    assert (second.id, second.attempt) == ("f", taken.attempt + 1)
    with pytest.raises(TaskBusyError):
        await repo.update("f", RETRY)
    await assert_still_running(repo, second)

"""QueueManager configuration and API rules that do not depend on the store."""

from __future__ import annotations

import asyncio
from datetime import UTC
from typing import Any

import pytest
from pydantic import BaseModel

from kubeque import ConfigError, QueueManager, TaskEvent, TaskStatus
from kubeque.task import backoff_ms, sanitise_error


class Order(BaseModel):
    sku: str
    qty: int


def test_memory_refuses_multi_atomic() -> None:
    with pytest.raises(ConfigError, match="cannot be shared between processes"):
        QueueManager({"type": "memory"}, process_type="multi-atomic")


def test_unknown_backend_type_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown backend type 'mongo'"):
        QueueManager({"type": "mongo"})


def test_postgres_backend_needs_a_dsn() -> None:
    with pytest.raises(ConfigError, match="needs a 'dsn'"):
        QueueManager({"type": "postgres"})


def test_bad_process_type() -> None:
    with pytest.raises(ConfigError, match="process_type"):
        QueueManager(process_type="many")  # type: ignore[arg-type]


def test_get_instance_is_a_singleton() -> None:
    QueueManager.reset_instance()
    try:
        a = QueueManager.get_instance({"type": "memory"})
        b = QueueManager.get_instance()
        assert a is b
    finally:
        QueueManager.reset_instance()


def test_decorator_registers_under_function_name_and_inspect_shows_settings() -> None:
    qm = QueueManager()

    @qm.handler(max_retries=5, max_processing_time=2000)
    async def place(order: Order) -> None:
        return None

    info = qm.inspect_handler("place")
    assert info["async"] is True
    assert info["schema"] == "Order"
    assert info["max_retries"] == 5
    assert info["effective"] == {"max_retries": 5, "max_processing_time": 2000, "retry_backoff_ms": 1000}


def test_unknown_event_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown event 'task_exploded'"):
        QueueManager().on("task_exploded", lambda e: None)


async def test_bad_task_options_are_refused_clearly() -> None:
    qm = QueueManager(validate_handlers=False)
    with pytest.raises(ConfigError, match="priority"):
        await qm.add_task("h", {}, priority="high")
    with pytest.raises(ConfigError, match="timezone-aware"):
        from datetime import datetime

        await qm.add_task("h", {}, run_at=datetime(2030, 1, 1))
    with pytest.raises(ConfigError, match="run_at or delay"):
        from datetime import datetime

        await qm.add_task("h", {}, run_at=datetime.now(UTC), delay=1)
    with pytest.raises(ConfigError, match="max_retries"):
        await qm.add_task("h", {}, max_retries=-1)
    assert await qm.get_all_tasks() == []


async def test_handler_receives_its_model_and_the_task_when_it_asks() -> None:
    qm = QueueManager(poll_interval=0.05)
    got: list[Any] = []

    @qm.handler()
    def place(order: Order, task: Any) -> int:
        got.append((order, task.id))
        return order.qty * 2

    t = await qm.add_task("place", {"sku": "x", "qty": "3"})
    assert t is not None and t.payload == {"sku": "x", "qty": 3}
    await qm.start_worker(1)
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.02)
    await qm.stop_worker()
    assert got == [(Order(sku="x", qty=3), t.id)]
    done = await qm.get_task(t.id)
    assert done is not None and done.status is TaskStatus.COMPLETED and done.result == 6


async def test_crash_on_worker_error_stops_the_worker_and_raises() -> None:
    qm = QueueManager(crash_on_worker_error=True, poll_interval=0.05)

    @qm.handler(max_retries=0)
    def broken(p: dict[str, Any]) -> None:
        raise KeyError("missing")

    await qm.add_task("broken", {})
    worker = await qm.start_worker(1)
    with pytest.raises(KeyError):
        await asyncio.wait_for(worker.wait(), 10)


async def test_a_failing_listener_does_not_stop_the_queue() -> None:
    qm = QueueManager(validate_handlers=False)
    seen: list[TaskEvent] = []

    def bad(e: TaskEvent) -> None:
        raise RuntimeError("listener bug")

    qm.on("task_added", bad)
    qm.on("task_added", seen.append)
    t = await qm.add_task("h", {})
    assert t is not None and [e.task_id for e in seen] == [t.id]


def test_backoff_grows_and_is_jittered() -> None:
    samples = [backoff_ms(1000, 0) for _ in range(50)]
    assert all(500 <= s <= 1000 for s in samples) and len(set(samples)) > 1
    assert all(2000 <= backoff_ms(1000, 2) <= 4000 for _ in range(20))
    assert backoff_ms(1000, 100) <= 60 * 60 * 1000
    assert backoff_ms(0, 5) == 0


def test_sanitise_error_survives_a_broken_str() -> None:
    class Broken:
        def __str__(self) -> str:
            raise ValueError("no")

    assert sanitise_error(Broken()) == "<unprintable Broken>"


async def test_misspelt_option_is_refused_not_stored_as_extra() -> None:
    qm = QueueManager(validate_handlers=False)
    for typo, meant in (("priorty", "priority"), ("max_retry", "max_retries"), ("delay_s", "delay")):
        with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
            await qm.add_task("h", {}, **{typo: 1})
    assert await qm.get_all_tasks() == []
    t = await qm.add_task("h", {}, tenant="acme", extra={"priorty": 5})
    assert t is not None and t.extra == {"tenant": "acme", "priorty": 5} and t.priority == 0


def test_a_backend_object_missing_methods_is_named() -> None:
    class Partial:
        name = "partial"
        multi_process = False

        async def open(self) -> None:
            return None

    with pytest.raises(ConfigError, match="lacks add, close, complete"):
        QueueManager(Partial())  # type: ignore[arg-type]


def test_failure_text_is_sanitised_where_it_is_made() -> None:
    from kubeque.task import Failure

    f = Failure("t", 1, "bad\x00" + "x" * 10_000, retry_delay_ms=0)
    assert "\x00" not in f.error and len(f.error) <= 4000

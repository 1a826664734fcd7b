"""The application end-to-end worker tests run: ``--app tests.apps.e2e_app:queue``.

Handlers take their timing from the payload so each test sets its own pace.
Retries have no backoff so retried attempts run at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kubeque import QueueManager, Task

queue = QueueManager(name="e2e", retry_backoff_ms=0, poll_interval=0.5)


@queue.handler()
def ok(payload: dict[str, Any]) -> dict[str, Any]:
    """Succeeds at once."""
    return {"ok": True, "n": payload.get("n")}


@queue.handler()
def boom(payload: dict[str, Any]) -> None:
    """Fails every attempt."""
    raise ValueError(f"boom {payload.get('n')}")


@queue.handler()
async def sleep(payload: dict[str, Any]) -> dict[str, Any]:
    """Sleeps on the event loop for payload["seconds"]."""
    await asyncio.sleep(float(payload.get("seconds", 1)))
    return {"slept": payload.get("seconds", 1)}


@queue.handler()
def sleep_sync(payload: dict[str, Any]) -> dict[str, Any]:
    """Sleeps in a worker thread for payload["seconds"] (cannot be cancelled)."""
    time.sleep(float(payload.get("seconds", 1)))
    return {"slept": payload.get("seconds", 1)}


@queue.handler()
async def slow_first(payload: dict[str, Any], task: Task) -> dict[str, Any]:
    """Hangs on its first attempt (for payload["seconds"]), succeeds on later ones."""
    if task.attempt == 1:
        await asyncio.sleep(float(payload.get("seconds", 60)))
    return {"attempt": task.attempt}

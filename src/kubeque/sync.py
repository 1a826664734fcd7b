"""The QueueManager API for synchronous code.

``qm.sync.add_task(...)`` runs the coroutine on a private event loop in a
daemon thread and waits for it, so a Flask or Django view can add tasks
without an event loop of its own. One manager serves either async code or
this facade, not both (its connections belong to one loop).
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .manager import QueueManager
    from .task import QueueStats, Task

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kubeque-sync", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "qm.sync cannot be called from inside a kubeque handler or listener; await the async API"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


class SyncQueueManager:
    """Blocking twins of the QueueManager coroutines."""

    def __init__(self, manager: QueueManager) -> None:
        self._qm = manager
        self._loop: _LoopThread | None = None
        self._lock = threading.Lock()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = _LoopThread()
                # Close connections cleanly when a script ends without close().
                atexit.register(self.close)
        return self._loop.run(coro)

    def add_task(self, handler: str, payload: Any = None, *, connection: Any = None, **options: Any) -> Task | None:
        return self._run(self._qm.add_task(handler, payload, connection=connection, **options))

    def add_tasks(self, tasks: Any, *, connection: Any = None) -> list[Task]:
        return self._run(self._qm.add_tasks(tasks, connection=connection))

    def get_task(self, task_id: str) -> Task | None:
        return self._run(self._qm.get_task(task_id))

    def get_all_tasks(self, status: Any = None, limit: int | None = None) -> list[Task]:
        return self._run(self._qm.get_all_tasks(status, limit))

    def update_task(self, task_id: str, **fields: Any) -> Task:
        return self._run(self._qm.update_task(task_id, **fields))

    def remove_task(self, task_id: str, hard: bool = False) -> bool:
        return self._run(self._qm.remove_task(task_id, hard))

    def stats(self) -> QueueStats:
        return self._run(self._qm.stats())

    def purge(self, *args: Any, **kwargs: Any) -> int:
        return self._run(self._qm.purge(*args, **kwargs))

    def run_worker(self, concurrency: int = 1, *, until_idle: bool = False, grace: float = 30.0) -> None:
        """Run a worker in the calling thread until interrupted (or until no work is left)."""

        async def main() -> None:
            worker = await self._qm.start_worker(concurrency)
            try:
                if until_idle:
                    while True:
                        st = await self._qm.stats()
                        if (
                            st.counts.get("pending", 0) == 0
                            and worker.in_flight == 0
                            and st.counts.get("processing", 0) == 0
                        ):
                            break
                        await asyncio.sleep(0.1)
                else:
                    await worker.wait()
            finally:
                await self._qm.stop_worker(grace)

        try:
            self._run(main())
        except KeyboardInterrupt:
            # Ctrl-C: drain as SIGTERM does (the loop thread keeps running it).
            assert self._loop is not None
            asyncio.run_coroutine_threadsafe(self._qm.stop_worker(grace), self._loop.loop).result()

    def close(self) -> None:
        """Stop any worker, close the store's connections and the private loop."""
        if self._loop is not None:
            atexit.unregister(self.close)
            self._run(self._qm.close())
            self._loop.stop()
            self._loop = None

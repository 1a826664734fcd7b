"""File store: every task of a queue in one JSON file, shared safely between processes.

Each operation takes an inter-process lock (``<path>.lock``), reads the file,
applies the operation with the same state machine as the memory store
(:class:`~kubeque.backends.memory.TaskTable`) and, if anything changed, writes
the file again atomically: a temporary file in the same directory is written,
flushed and fsynced, moved over the old one with ``os.replace`` and the
directory is fsynced. A crash at any point leaves either the old file or the
new one, never a mix. The blocking work runs in a thread so the event loop
keeps running.

Format (one task per line, so a process can re-read only the lines another
process changed; the document is ordinary JSON)::

    {"version":1,"next_seq":3,"tasks":[
    {"id":"a","handler":"h",...},
    {"id":"b","handler":"h",...}
    ]}

A file that exists but is not this format (an empty file included) raises
BackendError and is never overwritten. Times come from this machine's clock, which all processes share.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from ..errors import BackendError, InvalidTaskError
from ..task import (
    Task,
    TaskStatus,
    utcnow,
)
from .table import Op, TableRepository, TaskTable

__all__ = ["FORMAT_VERSION", "FileRepository"]

FORMAT_VERSION = 1

_R = TypeVar("_R")
# The only header the fast line-by-line reader accepts; anything else goes through json.loads.
_HEADER = re.compile(rb'\{"version":1,"next_seq":([1-9][0-9]{0,18}),"tasks":\[\Z')
_FOOTER = b"]}"
_TMP_SUFFIX = ".tmp"

# (inode, mtime in ns, size): cheap to read, changes on every replace.
_Signature = tuple[int, int, int]


class FileRepository(TableRepository):
    """Tasks in one JSON file; several processes may use the same file at once."""

    name = "file"
    multi_process = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_timeout: float = 60.0,
        poll_interval: float = 0.05,
    ) -> None:
        """``path`` is the task file (created, with its directory, on first use).

        ``lock_timeout`` bounds the wait for another process's operation, in seconds;
        ``poll_interval`` is how often ``wait_for_work`` looks at the file's mtime.
        """
        self.path = Path(os.fspath(path)).absolute()
        self.lock_path = Path(f"{self.path}.lock")
        self.lock_timeout = lock_timeout
        self.poll_interval = poll_interval
        self._file_lock = FileLock(self.lock_path, timeout=lock_timeout)
        # Serialises this instance's operations (they run in executor threads) and guards the cache.
        self._mutex = threading.Lock()
        # Cache of the last version read or written: the table, the raw bytes, and each task's line.
        self._table: TaskTable | None = None
        self._data: bytes | None = None
        self._lines: dict[str, tuple[Task, bytes]] = {}
        self._by_line: dict[bytes, Task] = {}
        self._seen: _Signature | None = None  # the file version this instance last read or wrote
        self._wake = False  # set when due work may have appeared; cleared by dequeue

    def __repr__(self) -> str:
        return f"FileRepository({str(self.path)!r})"

    # --- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        """Check the file (BackendError if it is not a task file), create it if missing."""
        await asyncio.to_thread(self._run, self._prepare)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._mutex:
            self._forget()

    # --- the Repository operations ----------------------------------------------

    async def dequeue(
        self, worker: str, limit: int, lease_ms: int, handlers: Collection[str] | None = None
    ) -> list[Task]:
        if limit <= 0:
            return []

        def op(table: TaskTable, now: datetime) -> list[Task]:
            self._wake = False  # this look at the queue answers every wakeup so far
            return table.dequeue(worker, limit, lease_ms, now, handlers)

        return await self._apply(op)

    async def wait_for_work(self, timeout: float) -> None:
        """Sleep up to ``timeout`` s; return early once another process changes the file."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._wake:
                self._wake = False
                return
            # os.stat is one cheap syscall; a changed signature means a write we have not read yet.
            if self._signature() != self._seen:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(self.poll_interval, remaining))

    # --- one locked read-apply-write cycle ----------------------------------------

    def _wake_up(self) -> None:
        self._wake = True

    async def _apply(self, op: Op[_R]) -> _R:
        return await asyncio.to_thread(self._run, lambda table: op(table, utcnow()))

    def _run(self, op: Callable[[TaskTable], _R]) -> _R:
        with self._mutex:
            try:
                with self._locked():
                    table = self._read()
                    before = dict(table.tasks)
                    next_seq = table.next_seq
                    result = op(table)
                    # TaskTable replaces a task object on every change, so identity shows what changed.
                    if (
                        table.next_seq != next_seq
                        or before.keys() != table.tasks.keys()
                        or any(table.tasks[k] is not v for k, v in before.items())
                    ):
                        self._write(table)
                    return result
            except BaseException:
                # The in-memory table may now be ahead of the file: re-read next time.
                self._forget()
                raise

    def _prepare(self, table: TaskTable) -> None:
        # We hold the lock and every writer holds it while its temp file exists: leftovers are from crashes.
        for leftover in self.path.parent.glob(f".{glob.escape(self.path.name)}.*{_TMP_SUFFIX}"):
            with suppress(OSError):
                leftover.unlink()
        if self._data is None:
            self._write(table)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create the directory of the task file {self.path}: {exc}") from None
        try:
            self._file_lock.acquire()
        except Timeout:
            raise BackendError(
                f"could not lock {self.lock_path} within {self.lock_timeout} s: another process holds it; "
                "raise lock_timeout or look for a stuck process using this task file"
            ) from None
        except OSError as exc:
            raise BackendError(
                f"cannot create the lock file {self.lock_path}: {exc}; check that the directory exists and is writable"
            ) from None
        try:
            yield
        finally:
            self._file_lock.release()

    def _forget(self) -> None:
        self._table = None
        self._data = None
        self._lines = {}
        self._by_line = {}

    def _signature(self) -> _Signature | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    # --- reading -------------------------------------------------------------------

    def _read(self) -> TaskTable:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            self._forget()
            self._seen = None
            self._table = TaskTable()
            return self._table
        except OSError as exc:
            raise BackendError(f"cannot read the task file {self.path}: {exc}") from None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig != self._seen:
            self._wake = True  # another process wrote since we last looked
        self._seen = sig
        if self._table is not None and data == self._data:
            return self._table
        tasks, next_seq, lines = self._parse(data)
        self._table = self._refresh(tasks, next_seq)
        self._data = data
        self._lines = lines
        self._by_line = {line: t for t, line in lines.values()}
        return self._table

    def _refresh(self, tasks: dict[str, Task], next_seq: int) -> TaskTable:
        """Bring the cached table up to date with what was read, or build a new one."""
        table = self._table
        if table is None:
            return TaskTable(tasks, next_seq)
        for tid in [tid for tid in table.tasks if tid not in tasks]:
            del table.tasks[tid]
        for tid, t in tasks.items():
            if table.tasks.get(tid) is not t:
                table.tasks[tid] = t
                if t.status is TaskStatus.PENDING:
                    # TaskTable checks heap entries against the task when popping them (lazy deletion),
                    # so scheduling the new version is all a replaced task needs.
                    table._schedule(t)
        table.next_seq = max([next_seq, *(t.seq + 1 for t in tasks.values())])
        return table

    def _parse(self, data: bytes) -> tuple[dict[str, Task], int, dict[str, tuple[Task, bytes]]]:
        fast = self._parse_lines(data)
        if fast is not None:
            return fast
        return self._parse_document(data)

    def _parse_lines(self, data: bytes) -> tuple[dict[str, Task], int, dict[str, tuple[Task, bytes]]] | None:
        """Read the layout this module writes, re-parsing only lines not seen before; None if it differs."""
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if len(lines) < 2 or lines[-1] != _FOOTER:
            return None
        header = _HEADER.match(lines[0])
        if header is None:
            return None
        body = lines[1:-1]
        last = len(body) - 1
        tasks: dict[str, Task] = {}
        out: dict[str, tuple[Task, bytes]] = {}
        for i, line in enumerate(body):
            if i < last:
                if not line.endswith(b","):
                    return None
                line = line[:-1]
            t = self._by_line.get(line)
            if t is None:
                try:
                    raw = json.loads(line)
                except ValueError:
                    return None
                t = self._parse_task(raw)
            if t.id in tasks:
                raise self._corrupt(f"task id {t.id!r} appears twice")
            tasks[t.id] = t
            out[t.id] = (t, line)
        return tasks, int(header[1]), out

    def _parse_document(self, data: bytes) -> tuple[dict[str, Task], int, dict[str, tuple[Task, bytes]]]:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise self._corrupt(f"invalid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise self._corrupt(f"the top level is a JSON {type(doc).__name__}, not an object")
        if doc.keys() != {"version", "next_seq", "tasks"}:
            raise self._corrupt(f"expected the keys version, next_seq and tasks, found {sorted(doc)}")
        if doc["version"] != FORMAT_VERSION:
            raise self._corrupt(f"format version {doc['version']!r}; this kubeque reads version {FORMAT_VERSION}")
        next_seq = doc["next_seq"]
        if not isinstance(next_seq, int) or isinstance(next_seq, bool) or next_seq < 1:
            raise self._corrupt(f"next_seq must be a positive integer, not {next_seq!r}")
        if not isinstance(doc["tasks"], list):
            raise self._corrupt("tasks must be a list")
        tasks: dict[str, Task] = {}
        for raw in doc["tasks"]:
            t = self._parse_task(raw)
            if t.id in tasks:
                raise self._corrupt(f"task id {t.id!r} appears twice")
            tasks[t.id] = t
        # No reusable lines: every task is serialised afresh on the next write.
        return tasks, next_seq, {}

    def _parse_task(self, raw: Any) -> Task:
        try:
            return Task.parse(raw, source=f"the task file {self.path}")
        except InvalidTaskError as exc:
            raise self._corrupt(str(exc)) from None

    def _corrupt(self, why: str) -> BackendError:
        return BackendError(
            f"{self.path} is not a valid kubeque task file: {why}. kubeque will not overwrite it: "
            "repair or move the file, or point the file backend at another path"
        )

    # --- writing -------------------------------------------------------------------

    def _write(self, table: TaskTable) -> None:
        lines: dict[str, tuple[Task, bytes]] = {}
        body: list[bytes] = []
        for t in sorted(table.tasks.values(), key=lambda t: t.seq):
            cached = self._lines.get(t.id)
            if cached is not None and cached[0] is t:
                line = cached[1]
            else:
                try:
                    # ensure_ascii: the file is always valid UTF-8, whatever text a task holds.
                    line = json.dumps(t.to_json_dict(), allow_nan=False, separators=(",", ":")).encode()
                except ValueError as exc:
                    raise BackendError(f"task {t.id!r} cannot be written as JSON: {exc}") from None
            lines[t.id] = (t, line)
            body.append(line)
        header = b'{"version":%d,"next_seq":%d,"tasks":[\n' % (FORMAT_VERSION, table.next_seq)
        data = header + b",\n".join(body) + (b"\n" if body else b"") + _FOOTER + b"\n"
        self._replace(data)
        self._data = data
        self._lines = lines
        self._by_line = {line: t for t, line in lines.values()}

    def _replace(self, data: bytes) -> None:
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=_TMP_SUFFIX, dir=directory)
        except OSError as exc:
            raise BackendError(f"cannot write the task file {self.path}: {exc}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                with suppress(OSError):
                    # Keep the permissions the user gave the file (mkstemp creates 0600).
                    os.fchmod(f.fileno(), stat.S_IMODE(os.stat(self.path).st_mode))
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            with suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise BackendError(f"cannot write the task file {self.path}: {exc}") from exc
            raise
        self._fsync_directory(directory)
        st = os.stat(self.path)
        self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)

    @staticmethod
    def _fsync_directory(directory: Path) -> None:
        # Makes the rename itself durable; not every platform can open a directory.
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

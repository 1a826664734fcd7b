"""One fixture, five stores: every contract test runs against each backend.

``store_factory`` makes a fresh, empty store config each time it is called
(several per test are allowed: they are all cleaned up afterwards).
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

BACKENDS = ["memory", "file", "postgres", "redis", "custom"]
ROOT = Path(__file__).resolve().parents[2]

StoreFactory = Callable[[], Any]


def load_custom_example() -> Any:
    spec = importlib.util.spec_from_file_location("custom_postgres", ROOT / "examples" / "custom_postgres.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_factory(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    cleanups: list[Callable[[], None]] = []
    counter = iter(range(1_000_000))

    if backend_name == "memory":

        def make() -> Any:
            return {"type": "memory"}

    elif backend_name == "file":

        def make() -> Any:
            return {"type": "file", "path": str(tmp_path / f"tasks-{next(counter)}.json")}

    elif backend_name == "postgres":
        dsn = request.getfixturevalue("pg_dsn")

        def make() -> Any:
            schema = f"t_{uuid.uuid4().hex[:12]}"
            cleanups.append(lambda: _drop_schema(dsn, schema))
            return {"type": "postgres", "dsn": dsn, "schema": schema}

    elif backend_name == "redis":
        url = request.getfixturevalue("redis_url")

        def make() -> Any:
            queue = f"t_{uuid.uuid4().hex[:12]}"
            cleanups.append(lambda: _drop_redis(url, queue))
            return {"type": "redis", "url": url, "queue": queue}

    else:
        dsn = request.getfixturevalue("pg_dsn")
        example = load_custom_example()

        def make() -> Any:
            table = f"c_{uuid.uuid4().hex[:12]}"
            cleanups.append(lambda: _drop_table(dsn, table))
            return {"type": "custom", "repository": example.make_repository(dsn, table)}

    yield make
    for fn in cleanups:
        fn()


def _drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _drop_table(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(table)))


def _drop_redis(url: str, queue: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter(match=f"kubeque:{queue}:*"))
    if keys:
        r.delete(*keys)

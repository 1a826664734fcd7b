"""Numbered schema migrations, safe to run from many processes at once.

Each call takes a transaction-scoped advisory lock keyed by the schema name,
creates the schema and its ``migrations`` table if needed, applies the
migrations not yet recorded and records them, all in one transaction. A
process that finds everything applied returns without taking the lock or
issuing DDL, so workers without CREATE rights start fine on a migrated schema.
"""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg

from ...errors import SchemaMissingError
from .connect import backend_error, connect_kwargs
from .queries import check_identifier, migrations, query

__all__ = ["ensure_migrated", "latest_version", "migrate", "pending_versions"]


def latest_version() -> int:
    """The newest migration this version of kubeque ships."""
    return max(m.version for m in migrations())


def lock_key(schema: str) -> int:
    """The advisory lock key of a schema's migrations: a stable signed 64-bit hash."""
    digest = hashlib.blake2b(f"kubeque.migrate:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def migrate(dsn: str, schema: str, *, application_name: str = "kubeque-migrate") -> list[int]:
    """Bring ``schema`` up to date; return the versions this call applied (empty if none).

    Raises InvalidIdentifierError for a bad schema name and BackendError when
    the server cannot be reached or refuses.
    """
    check_identifier(schema)
    with _connect(dsn, schema, application_name) as conn:
        try:
            return _apply(conn, schema)
        except psycopg.Error as exc:
            raise backend_error(exc, dsn, schema, f"migrate schema {schema!r}") from exc


def pending_versions(dsn: str, schema: str, *, application_name: str = "kubeque") -> list[int]:
    """Versions not yet applied to ``schema`` (all of them if it does not exist)."""
    check_identifier(schema)
    with _connect(dsn, schema, application_name) as conn:
        try:
            return _pending(conn, schema)
        except psycopg.Error as exc:
            raise backend_error(exc, dsn, schema, f"inspect schema {schema!r}") from exc


def drop_schema(dsn: str, schema: str, *, application_name: str = "kubeque") -> None:
    """Delete a queue's schema and every task in it (absent is fine)."""
    check_identifier(schema)
    with _connect(dsn, schema, application_name) as conn:
        try:
            conn.execute(query("drop_schema", schema))
        except psycopg.Error as exc:
            raise backend_error(exc, dsn, schema, f"drop schema {schema!r}") from exc


def ensure_migrated(dsn: str, schema: str, *, auto_migrate: bool, application_name: str) -> list[int]:
    """Migrate (``auto_migrate``) or check that nothing is missing, else raise SchemaMissingError."""
    if auto_migrate:
        return migrate(dsn, schema, application_name=application_name)
    missing = pending_versions(dsn, schema, application_name=application_name)
    if missing:
        raise SchemaMissingError(
            f"the queue schema {schema!r} is missing or lacks migrations {missing}; "
            "run `kubeque migrate` for it, or let the queue migrate itself (auto_migrate=True)"
        )
    return []


def _connect(dsn: str, schema: str, application_name: str) -> psycopg.Connection[tuple[Any, ...]]:
    try:
        return psycopg.connect(dsn, autocommit=True, **connect_kwargs(dsn, application_name))
    except psycopg.Error as exc:
        raise backend_error(exc, dsn, schema, "connect") from exc


def _pending(conn: psycopg.Connection[tuple[Any, ...]], schema: str) -> list[int]:
    wanted = [m.version for m in migrations()]
    row = conn.execute(query("migrations_table_exists", schema), {"schema": schema}).fetchone()
    if not row or not row[0]:
        return wanted
    done = {r[0] for r in conn.execute(query("migrations_applied", schema))}
    return [v for v in wanted if v not in done]


def _apply(conn: psycopg.Connection[tuple[Any, ...]], schema: str) -> list[int]:
    if not _pending(conn, schema):
        return []
    applied: list[int] = []
    with conn.transaction():
        conn.execute(query("migrate_lock", schema), {"key": lock_key(schema)})
        # Under the lock: another process may have finished while we waited.
        conn.execute(query("migrate_prepare", schema))
        done = {r[0] for r in conn.execute(query("migrations_applied", schema))}
        for mig in migrations():
            if mig.version in done:
                continue
            conn.execute(mig.statement(schema))
            conn.execute(query("migration_record", schema), {"version": mig.version, "name": mig.name})
            applied.append(mig.version)
    return applied

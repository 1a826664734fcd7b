"""Connection settings shared by the pool, the listener and migrations, and
the translation of driver failures into :class:`kubeque.errors.BackendError`."""

from __future__ import annotations

import os
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from ...errors import BackendError, SchemaMissingError, one_line

DEFAULT_CONNECT_TIMEOUT_S = 10


def connect_kwargs(dsn: str, application_name: str, *, keepalives: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``psycopg.connect`` on top of ``dsn``.

    Sessions run in UTC so timestamps come back in UTC; a connect timeout is
    set unless the DSN or environment sets one, so an unreachable host fails
    instead of hanging.
    """
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        detail = one_line(exc)
        raise BackendError(
            f"the PostgreSQL DSN is not valid: {detail}; expected postgresql://user@host:port/db"
        ) from exc
    kwargs: dict[str, Any] = {
        "application_name": application_name[:63],
        "options": f"{params.get('options') or ''} -c TimeZone=UTC".strip(),
    }
    if "connect_timeout" not in params and "PGCONNECT_TIMEOUT" not in os.environ:
        kwargs["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT_S
    if keepalives:
        # A listener only reads; keepalives are how it notices a vanished peer.
        kwargs.update(keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
    return kwargs


def describe(dsn: str) -> str:
    """Where a DSN points, without its password: ``user@host:port/dbname``."""
    try:
        p = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the configured PostgreSQL server"
    host = p.get("host") or p.get("hostaddr") or os.environ.get("PGHOST") or "localhost"
    port = p.get("port") or os.environ.get("PGPORT") or "5432"
    user = p.get("user") or os.environ.get("PGUSER")
    db = p.get("dbname") or os.environ.get("PGDATABASE") or user or ""
    who = f"{user}@" if user else ""
    return f"{who}{host}:{port}/{db}"


def backend_error(exc: BaseException, dsn: str, schema: str, doing: str) -> BackendError:
    """A BackendError (or SchemaMissingError) that says what failed and what to do."""
    where = describe(dsn)
    detail = one_line(exc)
    if isinstance(exc, pg_errors.UndefinedTable | pg_errors.InvalidSchemaName | pg_errors.UndefinedFunction):
        return SchemaMissingError(
            f"the queue schema {schema!r} at {where} is missing or not migrated ({detail}); "
            "run `kubeque migrate` for it"
        )
    if isinstance(exc, psycopg.OperationalError):
        return BackendError(
            f"could not {doing}: PostgreSQL at {where} is unreachable or refused the connection: {detail}"
        )
    return BackendError(f"could not {doing}: PostgreSQL at {where} refused it: {detail}")

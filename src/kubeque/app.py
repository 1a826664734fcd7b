"""The user's application as the command line finds it: ``--app module:queue``,
pointed at the store that ``--dsn`` / ``--schema`` name."""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import sys
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .backends.base import Repository
from .backends.postgres import PostgresRepository, describe
from .errors import ConfigError, SchemaMissingError
from .manager import QueueManager

log = logging.getLogger("kubeque.app")

DEFAULT_SCHEMA = "kubeque"
DEFAULT_APPLICATION_NAME = "kubeque-worker"


def load_app(spec: str) -> QueueManager:
    """Import ``module.path:attribute`` and return the QueueManager it names.

    The current directory is importable, as with ``python -m``, so ``--app
    myapp.tasks:queue`` works from the project root. Every failure is a
    one-line :class:`ConfigError`.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--app must look like 'package.module:queue', not {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"cannot import {module_name!r} for --app {spec}: no module named {exc.name!r} "
                "(run from the project root or set PYTHONPATH)"
            ) from None
        raise ConfigError(f"importing {module_name!r} for --app {spec} failed: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"importing {module_name!r} for --app {spec} failed: {type(exc).__name__}: {exc}") from None
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (--app {spec})") from None
    if not isinstance(value, QueueManager):
        raise ConfigError(f"--app {spec} names a {type(value).__name__}, not a kubeque QueueManager")
    return value


def postgres_backend(
    dsn: str, schema: str | None = None, *, application_name: str = DEFAULT_APPLICATION_NAME, **options: Any
) -> dict[str, Any]:
    """The backend config the CLI gives ``configure_backend`` for a DSN."""
    return {
        "type": "postgres",
        "dsn": dsn,
        "schema": schema or DEFAULT_SCHEMA,
        "application_name": application_name,
        **options,
    }


def point_at_store(
    queue: QueueManager,
    app: str,
    dsn: str | None,
    schema: str | None,
    *,
    dsn_from_database_url: bool = False,
    **options: Any,
) -> None:
    """Point the app's queue at the store the command line names.

    An app on PostgreSQL keeps its schema (and pool sizes) unless ``--schema``
    is given, and takes ``--dsn`` if given. An app on another store is moved to
    PostgreSQL only by ``--dsn`` or ``$KUBEQUE_DSN``: a ``$DATABASE_URL`` that
    happens to be set (for the web framework, say) does not move it.
    ``options`` (application_name, auto_migrate, ...) apply either way.
    ``--schema`` for an app on another store is an error.
    """
    repo = queue.repository
    on_postgres = isinstance(repo, PostgresRepository)
    if dsn and dsn_from_database_url and not on_postgres:
        log.info("ignoring $DATABASE_URL: the queue of --app %s uses the %s store (--dsn replaces it)", app, repo.name)
        dsn = None
    if dsn and isinstance(repo, PostgresRepository):
        sizes = {"min_size": repo.min_size, "max_size": repo.max_size}
        queue.configure_backend(postgres_backend(dsn, schema or repo.schema, **{**sizes, **options}))
    elif dsn:
        queue.configure_backend(postgres_backend(dsn, schema, **options))
    elif isinstance(repo, PostgresRepository):
        sizes = {"min_size": repo.min_size, "max_size": repo.max_size}
        queue.configure_backend(postgres_backend(repo.dsn, schema or repo.schema, **{**sizes, **options}))
    elif schema:
        raise ConfigError(
            f"--schema needs a PostgreSQL DSN: the queue of --app {app} uses the {repo.name} store; "
            "pass --dsn or set KUBEQUE_DSN"
        )


def dsn_for_display(dsn: str) -> str:
    """A DSN to show in advice: as given, but with any password replaced by ``***``; shell-quoted."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "DSN"
    if params.get("password"):
        dsn = make_conninfo("", **{**params, "password": "***"})
    return shlex.quote(dsn)


def describe_store(repo: Repository) -> str:
    """Where a store keeps its tasks, for log lines: never a password."""
    if isinstance(repo, PostgresRepository):
        return f"schema {repo.schema!r} at {describe(repo.dsn)}"
    return f"the {repo.name} store"


def missing_schema_error(repo: Repository, exc: SchemaMissingError, also: str = "") -> SchemaMissingError:
    """The SchemaMissingError a shell user should see: which schema, where, and the command that creates it."""
    if not isinstance(repo, PostgresRepository):
        return exc
    return SchemaMissingError(
        f"the queue schema {repo.schema!r} at {describe(repo.dsn)} does not exist or is not fully migrated; "
        f"create it with: kubeque migrate --dsn {dsn_for_display(repo.dsn)} --schema {repo.schema}{also}"
    )

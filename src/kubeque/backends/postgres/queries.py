"""Named SQL statements, read from ``queries/*.sql`` and ``migrations/*.sql``.

Statements name the queue's schema as ``{schema}`` (and LISTEN its channel as
``{channel}``); these are filled only with :class:`psycopg.sql.Identifier`, so
no name is ever formatted into SQL text. Values are ``%(name)s`` parameters.
Because the files go through ``SQL.format``, a literal brace must be doubled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from psycopg import sql

from ...errors import InvalidIdentifierError

# fullmatch, not match: "$" would accept a trailing newline.
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Postgres truncates identifiers (LISTEN channels included) beyond 63 bytes.
MAX_IDENTIFIER = 63
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def check_identifier(name: object, what: str = "schema") -> str:
    """Return ``name`` if it is a safe schema/table name, else raise InvalidIdentifierError."""
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
        raise InvalidIdentifierError(
            f"invalid {what} name {name!r}: use 1-63 characters of lower-case letters, digits and "
            "underscores, not starting with a digit (^[a-z_][a-z0-9_]{0,62}$)"
        )
    return name


def channel_name(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a queue (schemas sharing a long prefix may share it harmlessly)."""
    return f"kubeque_{schema}"[:MAX_IDENTIFIER]


@cache
def text(name: str) -> str:
    """The text of ``queries/<name>.sql``."""
    return resources.files(__package__).joinpath("queries").joinpath(f"{name}.sql").read_text(encoding="utf-8")


@cache
def query(name: str, schema: str) -> sql.Composed:
    """The named statement with ``{schema}`` bound to the (validated) schema identifier."""
    return sql.SQL(text(name)).format(schema=sql.Identifier(check_identifier(schema)))


def listen(schema: str) -> sql.Composed:
    """``LISTEN`` on the queue's channel, the channel quoted as an identifier."""
    return sql.SQL(text("listen")).format(channel=sql.Identifier(channel_name(check_identifier(schema))))


@dataclass(frozen=True)
class Migration:
    """One numbered migration file."""

    version: int
    name: str
    text: str

    def statement(self, schema: str) -> sql.Composed:
        return sql.SQL(self.text).format(schema=sql.Identifier(check_identifier(schema)))


@cache
def migrations() -> tuple[Migration, ...]:
    """All migrations shipped with this version, in version order."""
    found: list[Migration] = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m is None:
            continue
        found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version number: {versions}")
    return tuple(found)

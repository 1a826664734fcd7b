"""The PostgreSQL store: one schema per queue, all SQL in ``*.sql`` files beside this module."""

from .connect import describe
from .migrate import drop_schema, migrate
from .repository import PostgresRepository

__all__ = ["PostgresRepository", "describe", "drop_schema", "migrate"]

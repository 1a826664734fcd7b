"""The PostgreSQL store: one schema per queue, all SQL in ``*.sql`` files beside this module."""

from .migrate import migrate
from .repository import PostgresRepository

__all__ = ["PostgresRepository", "migrate"]

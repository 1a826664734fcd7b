"""One hierarchy for every error kubeque raises; each message says what to do."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception as a single line of text (libpq messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class KubequeError(Exception):
    """Base class of every kubeque error."""


class ConfigError(KubequeError):
    """The queue, backend or worker was configured wrongly."""


class InvalidIdentifierError(ConfigError):
    """A schema or table name does not match ``^[a-z_][a-z0-9_]{0,62}$``."""


class PayloadError(KubequeError):
    """A payload (or a handler's result) is not storable JSON; nothing was stored."""


class PayloadValidationError(PayloadError):
    """A payload does not match its handler's declared schema."""


class UnknownHandlerError(KubequeError):
    """No handler of that name is registered."""


class DuplicateTaskError(KubequeError):
    """A task with that id already exists; nothing was stored."""


class TaskNotFoundError(KubequeError):
    """No task has that id."""


class TaskBusyError(KubequeError):
    """A task is processing, so its status cannot be changed (say, to retry it)
    until its attempt ends; nothing was changed. ``task_id`` names the task."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id!r} is processing; wait for it to finish (or remove it) before retrying it")


class InvalidTaskError(KubequeError):
    """A store (usually a custom backend) returned a malformed task."""


class BackendError(KubequeError):
    """The store could not be reached or refused the operation."""


class SchemaMissingError(BackendError):
    """The queue's schema has not been migrated; run ``kubeque migrate``."""

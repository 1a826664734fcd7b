"""kubeque: a PostgreSQL task queue at home on Kubernetes."""

from .errors import (
    BackendError,
    ConfigError,
    DuplicateTaskError,
    InvalidIdentifierError,
    InvalidTaskError,
    KubequeError,
    PayloadError,
    PayloadValidationError,
    SchemaMissingError,
    TaskBusyError,
    TaskNotFoundError,
    UnknownHandlerError,
)
from .events import TaskEvent
from .manager import QueueManager
from .task import QueueStats, Task, TaskStatus

__all__ = [
    "BackendError",
    "ConfigError",
    "DuplicateTaskError",
    "InvalidIdentifierError",
    "InvalidTaskError",
    "KubequeError",
    "PayloadError",
    "PayloadValidationError",
    "QueueManager",
    "QueueStats",
    "SchemaMissingError",
    "Task",
    "TaskBusyError",
    "TaskEvent",
    "TaskNotFoundError",
    "TaskStatus",
    "UnknownHandlerError",
]
__version__ = "0.1.0"

"""The worker runtime: slots, leases, deadlines, wakeups, shutdown."""

from .runtime import Worker

__all__ = ["Worker"]

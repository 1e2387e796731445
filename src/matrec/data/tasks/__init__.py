"""Tasks: every source of training batches, behind one interface (:class:`Task`) and one registry."""
from .base import TASKS, Task, build_task
from . import copy as _copy  # noqa: F401  (registers "copy")

__all__ = ["TASKS", "Task", "build_task"]

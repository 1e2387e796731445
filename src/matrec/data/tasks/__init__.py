"""Tasks: every source of training batches, behind one interface (:class:`Task`) and one registry."""
from .base import TASKS, Task, build_task, describe_tasks, parse_task_options
from . import copy as _copy  # noqa: F401  (each import registers its tasks)
from . import adding as _adding  # noqa: F401
from . import recall as _recall  # noqa: F401
from . import digits as _digits  # noqa: F401
from . import lm as _lm  # noqa: F401
from . import forecast as _forecast  # noqa: F401
from . import regime as _regime  # noqa: F401
from . import passkey as _passkey  # noqa: F401
from . import documents as _documents  # noqa: F401

__all__ = ["TASKS", "Task", "build_task", "describe_tasks", "parse_task_options"]

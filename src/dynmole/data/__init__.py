"""Tasks, prompts and loaders."""

from .example import Example
from .loaders import load_examples, load_mixture
from .local import LocalLoad, read_local
from .split import id_fraction, split_description
from .tasks import TASKS, TaskSpec, UnknownTaskError, get_task, multiple_choice_prompt

__all__ = [
    "Example",
    "LocalLoad",
    "TASKS",
    "TaskSpec",
    "UnknownTaskError",
    "get_task",
    "id_fraction",
    "load_examples",
    "load_mixture",
    "multiple_choice_prompt",
    "read_local",
    "split_description",
]

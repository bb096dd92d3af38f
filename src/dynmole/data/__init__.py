"""Tasks, prompts and loaders."""

from .example import Example
from .formats import PROTOCOLS, format_examples, label_format, scoring_protocol
from .loaders import load_examples, load_mixture
from .local import LocalLoad, read_local
from .split import id_fraction, split_description
from .tasks import ALL_TASKS, TASKS, TaskSpec, UnknownTaskError, get_task

__all__ = [
    "ALL_TASKS",
    "Example",
    "LocalLoad",
    "PROTOCOLS",
    "TASKS",
    "TaskSpec",
    "UnknownTaskError",
    "format_examples",
    "get_task",
    "id_fraction",
    "label_format",
    "load_examples",
    "load_mixture",
    "read_local",
    "scoring_protocol",
    "split_description",
]

"""Tasks, prompts and loaders."""

from .example import Example

__all__ = ["Example"]

"""The one record every task loader produces and every trainer/evaluator consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """A multiple-choice example.

    Attributes:
        id: stable identifier, unique within its task and the same across runs and machines
            (e.g. ``"arc_e/Mercury_7220990"``); splits are keyed on it.
        task: registry name of the task (``"arc_e"``, ``"boolq"``, ...).
        prompt: the text shown to the model, ending right before the answer.
        choices: the answer continuations (each normally begins with a space).
        label: index of the correct choice.
        options: the bare answer options (without the leading space) for lettered
            multiple-choice prompts; defaults to the stripped ``choices``.
    """

    id: str
    task: str
    prompt: str
    choices: tuple[str, ...]
    label: int
    options: tuple[str, ...] = field(default=())

    @property
    def answer(self) -> str:
        """The gold continuation, the training target."""
        return self.choices[self.label]

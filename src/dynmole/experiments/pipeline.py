"""The one pipeline of a fine-tuning job: adapt -> probe -> train -> evaluate -> record.

``dynmole run``/``demo`` and ``dynmole train`` (:mod:`.commands`) and every ``dynmole reproduce``
run (:mod:`.grid`) take these steps, in this order, each their subset:

1. :func:`prepare`: the training mixture in the format the evaluation protocol scores, and the
   routing probe's held-out examples (pure: done before any model is loaded, so data errors show
   at once);
2. :func:`fine_tune`: the method's adapter on the base model (:func:`dynmole.adapters.adapt_model`),
   trained (:func:`dynmole.training.trainer.train`);
3. :func:`evaluate_model`: accuracy per task and, for a MoLE model, the routing statistics of the
   same forwards (the one way routing statistics of an evaluation are collected);
4. the record: :func:`run_record` for every run's settings; the commands write their own files.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from ..adapters import adapt_model, settings_record
from ..config import MoLEConfig
from ..data import Example, format_examples
from ..evaluation import evaluate_tasks
from ..model import find_mole
from ..training.config import TrainConfig
from ..training.probe import probe_examples
from ..training.trainer import train
from .job import JobConfig


@dataclass(frozen=True)
class Prepared:
    """A job's data, ready to train on: the formatted mixture and the routing probe's examples."""

    train: list[Example]
    probe: list[Example] | None


def prepare(job: JobConfig, train_config: TrainConfig, examples: list[Example],
            held_out: Mapping[str, list[Example]] | None) -> Prepared:
    """``examples`` in the format ``job.scoring`` evaluates (what ``dynmole eval --scoring`` scores),
    and the routing probe's examples from ``held_out`` (each task's held-out examples; None: no probe)."""
    probe = None if held_out is None else probe_examples(dict(held_out), train_config.routing_probe_size, job.scoring)
    return Prepared(format_examples(examples, job.scoring), probe)


def fine_tune(model: nn.Module, tokenizer: Any, job: JobConfig, train_config: TrainConfig, mole: MoLEConfig,
              prepared: Prepared, show_parameters: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Wrap ``model`` with ``job.method``'s adapter and train it on ``prepared``; returns the trained
    model and the training summary. ``show_parameters`` prints the trainable parameters first."""
    model = adapt_model(model, job.method, mole)
    if show_parameters:
        model.print_trainable_parameters()
    return train(model, tokenizer, prepared.train, train_config, prepared.probe)


def evaluate_model(model: nn.Module, tokenizer: Any, examples: Mapping[str, list[Example]], job: JobConfig,
                   progress: bool = True, return_predictions: bool = False,
                   routing: bool = True, log_samples: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Accuracy of ``model`` on each task (:func:`dynmole.evaluation.evaluate_tasks`, with the job's
    batch size, protocol and length limit) and, with ``routing`` and a MoLE model, the per-module
    routing statistics of those same forwards (else ``{}``). Collecting them runs every choice as a
    full sequence (the shared-context path is off while the hooks count tokens). ``log_samples``:
    the results also hold each example's choice scores and predictions (``"samples"``)."""
    model.eval()
    evaluate = functools.partial(evaluate_tasks, model, tokenizer, examples, job.eval_batch_size, job.scoring,
                                 progress, return_predictions=return_predictions, log_samples=log_samples,
                                 max_length=job.eval_cutoff_len)
    if not routing or find_mole(model) is None:
        return evaluate(), {}
    with model.collect_routing_stats() as stats:
        results = evaluate()
    return results, stats.summary()


def run_record(job: JobConfig, train_config: TrainConfig | None, mole: MoLEConfig | None) -> dict[str, Any]:
    """A run's ``job``, ``train`` and ``adapter`` settings as results files store them (``train``
    and ``adapter`` empty for a run that trains nothing: no ``train_config``/``mole``)."""
    if train_config is None or mole is None:
        return {"job": dataclasses.asdict(job), "train": {}, "adapter": {}}
    return {"job": dataclasses.asdict(job), "train": dataclasses.asdict(train_config),
            "adapter": settings_record(job.method, mole)}

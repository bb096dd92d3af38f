"""What an evaluation says: the protocol in words, table headings, markdown tables, results files."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Mapping

import torch

from .._version import __version__
from ..data import scoring_protocol
from ..io import write_json

_METRIC_TEXT = {
    ("cloze", "acc"): "summed log-likelihood of each answer",
    ("cloze", "acc_norm"): "log-likelihood of each answer per character",
    ("label", "acc"): "logits of the label tokens",
    ("label", "acc_norm"): "same as acc",
}



def describe_scoring(scoring: str) -> str:
    """One sentence saying what ``scoring`` (a protocol name) shows the model and what it scores."""
    if scoring_protocol(scoring) == "cloze":
        return ("cloze: the task's prompt, then each answer text (lm-evaluation-harness); acc = highest summed "
                "log-likelihood of the answer, acc_norm = highest per character")
    return ("label: the options listed with labels in the prompt, answered by the label (MoE-PEFT / DynMoLE / "
            "LD-MoLE); acc = highest logit of the label tokens at the answer position, acc_norm = acc")


def metric_heading(metric: str, scoring: str) -> str:
    """A table heading naming the metric and the protocol, e.g. ``"acc (%, cloze: summed ...)"``."""
    protocol = scoring_protocol(scoring)
    return f"{metric} (%, {protocol}: {_METRIC_TEXT[protocol, metric]})"


def results_markdown(runs: Mapping[str, dict[str, Any]], metric: str = "acc_norm") -> str:
    """A markdown table of ``metric`` in percent: one row per run (name -> :func:`evaluate_tasks`
    result), one column per task, then the average; a task a run lacks shows as ``-``."""
    tasks: list[str] = []
    for result in runs.values():
        tasks += [task for task in result["tasks"] if task not in tasks]
    lines = [
        "| run | " + " | ".join(tasks) + " | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for name, result in runs.items():
        cells = [
            f"{100 * result['tasks'][task][metric]:.1f}" if task in result["tasks"] else "-" for task in tasks
        ]
        cells.append(f"{100 * result['average'][metric]:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_tables(runs: Mapping[str, dict[str, Any]], scoring: str) -> str:
    """:func:`results_markdown` of ``acc`` then ``acc_norm``, each under a heading naming the
    metric and the protocol ``scoring`` the runs were evaluated with."""
    return "\n".join(f"## {metric_heading(metric, scoring)}\n\n{results_markdown(runs, metric)}"
                     for metric in ("acc", "acc_norm"))


def write_results(path: str | Path, results: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Write ``{"results": ..., "metadata": ...}`` as JSON, atomically; the metadata should say
    which model, adapter, data split and prompt format produced the numbers."""
    write_json(path, {"results": results, "metadata": {"dynmole_version": __version__, **metadata}})


def machine_description() -> str:
    """The machine the numbers came from: architecture, system, device and torch version."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    return f"{platform.machine()} {platform.system()}, {device}, torch {torch.__version__}"

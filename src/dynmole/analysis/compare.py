"""``dynmole compare A.json B.json``: the paired test of two evaluations of the same examples.

Reads each file's per-example predictions (a results file written by ``dynmole eval --log-samples``
or ``dynmole run --log-samples``, or a grid run's ``predictions.json``), refuses two files that were
not scored on the same examples, and tabulates the difference A - B per task and on the task
average with :func:`dynmole.analysis.significance.paired_comparison` (the fixed-model paired
bootstrap stratified by task) and the exact McNemar test beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DynmoleError
from .significance import RESAMPLES, SEED, Predictions, correctness, mcnemar_exact, paired_comparison
from .tables import difference_bounds, p_value_cell

METRICS = ("acc_norm", "acc")
RUN_SEPARATOR = "#"
"""``FILE#RUN`` names one run of a results file holding several (``dynmole run``'s ``results.json``)."""


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DynmoleError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DynmoleError(f"{path}: bad JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise DynmoleError(f"{path}: not a JSON file (not UTF-8 text)") from err


def _is_predictions(value: Any) -> bool:
    """Whether ``value`` is per-task predictions: ``{task: {"id": [...], "label": [...], ...}}``."""
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(lists, dict) and "id" in lists and "label" in lists for lists in value.values()))


def read_samples(source: str) -> tuple[str, Predictions]:
    """The name and per-task predictions (parallel lists ``id``, ``label``, ``acc``, ``acc_norm``) of
    ``source``: a results file with samples (``FILE#RUN`` picks one of several runs) or a grid run's
    ``predictions.json``. A :class:`DynmoleError` in one line for a missing or invalid file, a file
    without samples, or a file with several runs and no ``#RUN``."""
    path, run = Path(source), None
    if not path.exists() and RUN_SEPARATOR in source:
        file_part, run = source.rsplit(RUN_SEPARATOR, 1)
        path = Path(file_part)
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        runs = {name: result["samples"] for name, result in data["results"].items()
                if isinstance(result, dict) and _is_predictions(result.get("samples"))}
        if run is not None:
            if run not in runs:
                raise DynmoleError(f"{path} has no run {run!r} with samples; it has: {', '.join(map(repr, runs))}")
            return f"{path.name}#{run}", runs[run]
        if len(runs) == 1:
            ((name, samples),) = runs.items()
            return f"{path.name} ({name})", samples
        if len(runs) > 1:
            raise DynmoleError(f"{path} holds several runs with samples: name one as {path}{RUN_SEPARATOR}RUN, "
                               f"RUN one of {', '.join(map(repr, runs))}")
    elif _is_predictions(data):
        return str(path), data
    raise DynmoleError(f"{path} has no per-example samples: was it written with --log-samples?")


def check_same_examples(a: Predictions, b: Predictions, names: tuple[str, str], metric: str) -> None:
    """Refuse, in one line, two runs' predictions that were not scored on the same examples (the
    same tasks, and per task the same ids, each once) or that lack ``metric``."""
    prefix = f"{names[0]} and {names[1]} were not scored on the same examples"
    if set(a) != set(b):
        raise DynmoleError(f"{prefix}: the tasks differ (only in A: {sorted(set(a) - set(b))}, "
                           f"only in B: {sorted(set(b) - set(a))})")
    for task in a:
        for name, run in zip(names, (a, b)):
            lists = run[task]
            if metric not in lists or not len(lists["id"]) == len(lists["label"]) == len(lists[metric]):
                raise DynmoleError(f"{name}: the samples of task {task} lack {metric} or have lists of different "
                                   "lengths")
            if len(set(lists["id"])) != len(lists["id"]):
                raise DynmoleError(f"{name}: task {task} lists an example id twice")
        differ = set(a[task]["id"]) ^ set(b[task]["id"])
        if differ:
            raise DynmoleError(f"{prefix}: task {task} differs in {len(differ)} ids (e.g. {sorted(differ)[:3]})")


def compare_markdown(a: Predictions, b: Predictions, names: tuple[str, str], metric: str = "acc_norm",
                     resamples: int = RESAMPLES, seed: int = SEED) -> str:
    """Markdown table of A - B: per task and on the task average (each task counting once), the
    examples, both accuracies, the difference in points, its 95 % interval and bootstrap p-value
    (:func:`paired_comparison`), the exact McNemar p-value and the examples only A / only B got right."""
    check_same_examples(a, b, names, metric)
    test = paired_comparison([a], [b], metric, ("A", "B"), resamples=resamples, seed=seed)
    matrices = correctness([a, b], metric, "A and B")  # per task: rows A, B, in A's example order
    lines = [f"A: {names[0]}", f"B: {names[1]}", "",
             "| task | examples | A (%) | B (%) | A - B (points) | 95 % interval | p (bootstrap) | McNemar p "
             "| only A / only B right |", "|---|" + "---:|" * 8]

    def row(name: str, accuracy_a: float, accuracy_b: float, result: Any, mcnemar: Any) -> None:
        lines.append(f"| {name} | {result.examples} | {100 * accuracy_a:.1f} | {100 * accuracy_b:.1f} | "
                     f"{100 * result.difference:+.1f} | {difference_bounds(result)} | "
                     f"{p_value_cell(result.p_value)} | "
                     f"{p_value_cell(mcnemar.p_value)} | {mcnemar.a_only} / {mcnemar.b_only} |")

    accuracies = {task: (float(m[0].mean()), float(m[1].mean())) for task, (_, m) in matrices.items()}
    for task, (_, matrix) in matrices.items():
        row(task, *accuracies[task], test.tasks[task], mcnemar_exact(matrix[:1], matrix[1:]))
    mean = [sum(pair[k] for pair in accuracies.values()) / len(accuracies) for k in (0, 1)]
    row("average", *mean, test.average, test.mcnemar)
    lines += ["", f"{metric}; A - B in points. Paired bootstrap over the examples, stratified by task ({resamples} "
              f"resamples, seed {seed}): 95 % percentile interval and two-sided p-value; the average weighs each "
              "task once. McNemar: exact two-sided test of the examples only one of A and B got right."]
    return "\n".join(lines) + "\n"


def compare_files(a: str, b: str, metric: str = "acc_norm", resamples: int = RESAMPLES, seed: int = SEED) -> str:
    """``dynmole compare``: :func:`compare_markdown` of two files' samples (:func:`read_samples`)."""
    if metric not in METRICS:
        raise DynmoleError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if resamples < 2:
        raise DynmoleError(f"--resamples must be >= 2, got {resamples}")
    (name_a, samples_a), (name_b, samples_b) = read_samples(a), read_samples(b)
    return compare_markdown(samples_a, samples_b, (name_a, name_b), metric, resamples, seed)

"""Evaluation: scoring engines, accuracy metrics, report tables and the lm-evaluation-harness bridge.

* :mod:`.engines`: :func:`score_choices` (log-likelihood of every (example, choice) pair, with the
  :mod:`.shared_context` path) and :func:`evaluate_tasks` (accuracy per task and their mean);
* :mod:`.metrics`: per-example predictions, ``acc`` and ``acc_norm``;
* :mod:`.report`: the protocol in words, table headings, markdown tables, ``results.json``;
* :mod:`.harness`: the same models under lm-evaluation-harness (``pip install 'dynmole[harness]'``).
"""

from .engines import evaluate_tasks, score_choices
from .metrics import accuracy, predictions, samples
from .report import (
    describe_scoring,
    machine_description,
    metric_heading,
    results_markdown,
    results_tables,
    write_results,
)
from .requests import context_length

__all__ = [
    "accuracy",
    "context_length",
    "describe_scoring",
    "evaluate_tasks",
    "machine_description",
    "metric_heading",
    "predictions",
    "results_markdown",
    "results_tables",
    "samples",
    "score_choices",
    "write_results",
]

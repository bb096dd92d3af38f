"""Tables and figures of the papers' comparison, from finished ``dynmole reproduce`` runs.

``runs`` reads a run (``result.json``, ``predictions.json``, ``log.jsonl``, routing statistics
by layer), ``significance`` computes 95 % intervals and paired tests from per-example
predictions, ``tables`` formats the tables, ``plots`` draws each figure from plain numbers, and
``report`` writes a results folder's ``results.md``, ablation tables and ``plots/``.
``python -m dynmole.analysis DIR`` prints the paired tests of a finished grid in ``DIR``.
"""

from .plots import plot_ablation, plot_by_layer, plot_curves, plot_load_heatmaps
from .report import ablation_report, claim_comparisons, grid_report, paired_tests_markdown, routing_plots
from .runs import RunRecord, by_layer, group_by_variant, layer_index, load_by_layer, mean_experts, mean_std
from .significance import (
    CLAIMS,
    ClaimTest,
    HierarchicalComparison,
    accuracy_intervals,
    hierarchical_comparison,
    paired_comparison,
    wilson_interval,
)
from .tables import comparison_table, interval_table, mean_std_cell, paired_table, verdict_table

__all__ = [
    "CLAIMS",
    "ClaimTest",
    "HierarchicalComparison",
    "RunRecord",
    "ablation_report",
    "accuracy_intervals",
    "by_layer",
    "claim_comparisons",
    "comparison_table",
    "grid_report",
    "group_by_variant",
    "hierarchical_comparison",
    "interval_table",
    "layer_index",
    "load_by_layer",
    "mean_experts",
    "mean_std",
    "mean_std_cell",
    "paired_comparison",
    "paired_table",
    "paired_tests_markdown",
    "plot_ablation",
    "plot_by_layer",
    "plot_curves",
    "plot_load_heatmaps",
    "routing_plots",
    "verdict_table",
    "wilson_interval",
]

"""Tables and figures of the papers' comparison, from finished ``dynmole reproduce`` runs.

``runs`` reads a run (``result.json``, ``log.jsonl``, routing statistics by layer), ``tables``
formats the comparison table, ``plots`` draws each figure from plain numbers, and ``report``
writes a results folder's ``results.md``, ablation tables and ``plots/``.
"""

from .plots import plot_ablation, plot_by_layer, plot_curves, plot_load_heatmaps
from .report import ablation_report, grid_report, routing_plots
from .runs import RunRecord, by_layer, group_by_variant, layer_index, load_by_layer, mean_experts, mean_std
from .tables import comparison_table, mean_std_cell

__all__ = [
    "RunRecord",
    "ablation_report",
    "by_layer",
    "comparison_table",
    "grid_report",
    "group_by_variant",
    "layer_index",
    "load_by_layer",
    "mean_experts",
    "mean_std",
    "mean_std_cell",
    "plot_ablation",
    "plot_by_layer",
    "plot_curves",
    "plot_load_heatmaps",
    "routing_plots",
]

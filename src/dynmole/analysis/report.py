"""From finished runs to the results folder's tables and figures."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..io import atomic_write
from .plots import plot_ablation, plot_by_layer, plot_curves, plot_load_heatmaps
from .runs import RunRecord, by_layer, load_by_layer
from .tables import comparison_table

METRICS = ("acc_norm", "acc")


def _write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _by_layer_panels(groups: Mapping[str, Sequence[RunRecord]], key: str) -> dict[str, dict[str, list]]:
    """projection -> variant -> per seed {layer: value}, over the variants with routing stats."""
    panels: dict[str, dict[str, list]] = {}
    for name, records in groups.items():
        for record in records:
            for projection, values in by_layer(record.routing, key).items():
                panels.setdefault(projection, {}).setdefault(name, []).append(values)
    return panels


def _mean_loads(records: Sequence[RunRecord]) -> dict[int, list[float]]:
    """Per layer, each expert's load averaged over the seeds."""
    loads = [load_by_layer(r.routing) for r in records]
    return {layer: [sum(col) / len(loads) for col in zip(*(l[layer] for l in loads))] for layer in loads[0]}


def routing_plots(groups: Mapping[str, Sequence[RunRecord]], directory: Path) -> list[Path]:
    """Figures 5 and 6 and the routing analyses; a figure without data (e.g. soft share when no
    variant routes soft) is not written."""
    written = [plot_curves({n: [r.log("loss") for r in rs] for n, rs in groups.items()},
                           directory / "training_loss.png", "training loss", "Training loss (mean ± std over seeds)")]
    routed = {n: rs for n, rs in groups.items() if all(r.routing for r in rs)}
    if not routed:
        return written
    written.append(plot_by_layer(_by_layer_panels(routed, "mean_experts"), directory / "experts_by_layer.png",
                                 "experts per token", "Experts activated per token by layer (evaluation)"))
    soft = {n: rs for n, rs in routed.items() if any(s["soft_fraction"] > 0 for r in rs for s in r.routing.values())}
    if soft:
        written.append(plot_by_layer(_by_layer_panels(soft, "soft_fraction"), directory / "soft_fraction_by_layer.png",
                                     "share of tokens routed soft", "Tokens routed soft by layer (evaluation)"))
    written.append(plot_by_layer(_by_layer_panels(routed, "entropy"), directory / "entropy_by_layer.png",
                                 "normalised Tsallis entropy", "Router entropy by layer (evaluation)"))
    written.append(plot_load_heatmaps({n: _mean_loads(rs) for n, rs in routed.items()}, directory / "expert_load.png"))
    entropy = {n: [r.entropy_curve() for r in rs] for n, rs in routed.items()}
    if any(any(c) for c in entropy.values()):
        written.append(plot_curves(entropy, directory / "entropy_training.png", "normalised Tsallis entropy",
                                   "Router entropy during training (from the entropy loss)"))
    return written


def grid_report(groups: Mapping[str, Sequence[RunRecord]], directory: str | Path, title: str,
                notes: str = "") -> list[Path]:
    """Write ``results.md`` (one table per metric) and the figures under ``plots/``; returns the paths."""
    directory = Path(directory)
    tables = "\n".join(f"## {metric} (%)\n\n{comparison_table(groups, metric)}" for metric in METRICS)
    plots = routing_plots(groups, directory / "plots")
    figures = "\n".join(f"- `{p.relative_to(directory)}`" for p in plots)
    text = f"# {title}\n\n{notes}\n\n{tables}\n## Figures\n\n{figures}\n"
    return [_write_text(directory / "results.md", text), *plots]


def ablation_report(points: Mapping[float, Sequence[RunRecord]], directory: str | Path, name: str, xlabel: str,
                    metric: str, log_x: bool = False, notes: str = "") -> list[Path]:
    """Write ``ablation-<name>.md`` (the comparison table, one row per value) and
    ``plots/ablation-<name>.png`` (average ``metric`` against the value)."""
    directory = Path(directory)
    groups = {records[0].variant: records for records in points.values()}
    plot = plot_ablation({v: [100 * r.result["eval"]["average"][metric] for r in rs] for v, rs in points.items()},
                         directory / "plots" / f"ablation-{name}.png", xlabel, f"average {metric} (%)",
                         f"Ablation: {xlabel}", log_x)
    text = f"# Ablation: {xlabel}\n\n{notes}\n\n## {metric} (%)\n\n{comparison_table(groups, metric)}\n" \
           f"Figure: `{plot.relative_to(directory)}`\n"
    return [_write_text(directory / f"ablation-{name}.md", text), plot]

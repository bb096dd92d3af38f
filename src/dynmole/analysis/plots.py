"""The papers' figures as PNG files (matplotlib, Agg backend): every function takes plain
numbers (per variant, per seed) and writes one file, so it works on synthetic inputs too."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from cycler import cycler  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from ..io import atomic_write  # noqa: E402

Curve = Sequence[tuple[float, float]]
"""(x, y) points of one seed."""


# Up to 30 variants stay distinguishable: ten colours, then again dashed, then dotted.
_STYLES = cycler(linestyle=["-", "--", ":"]) * cycler(color=plt.cm.tab10.colors)


def _axes(rows: int, columns: int, width: float, height: float, **kwargs: object) -> tuple[plt.Figure, np.ndarray]:
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False, **kwargs)
    for axis in axes.flat:
        axis.set_prop_cycle(_STYLES)
        axis.grid(alpha=0.3)
    return figure, axes


def _legend_right(axis: plt.Axes) -> None:
    """The legend outside the axes, on the right (none when nothing is labelled)."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)


def _save(figure: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
    return path


def _mean_band(curves: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, mean and std over the seeds' curves at the x values they all have."""
    common = sorted(set.intersection(*(set(x for x, _ in c) for c in curves)))
    values = np.array([[dict(c)[x] for x in common] for c in curves], dtype=float)
    std = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return np.array(common, dtype=float), values.mean(axis=0), std


def plot_curves(curves: Mapping[str, Sequence[Curve]], path: str | Path, ylabel: str, title: str,
                xlabel: str = "training step") -> Path:
    """One line per variant: the mean over its seeds' curves, with a ± std band (Figure 5)."""
    figure, axes = _axes(1, 1, 7, 4)
    axis = axes[0][0]
    for name, seeds in curves.items():
        seeds = [c for c in seeds if c]
        if not seeds:
            continue
        x, mean, std = _mean_band(seeds)
        (line,) = axis.plot(x, mean, label=f"{name} (n={len(seeds)})")
        axis.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    _legend_right(axis)
    return _save(figure, path)


def plot_by_layer(panels: Mapping[str, Mapping[str, Sequence[Mapping[int, float]]]], path: str | Path,
                  ylabel: str, title: str) -> Path:
    """One panel per projection (``gate_proj``, ...), one line per variant: a statistic by layer,
    mean ± std over seeds (Figure 6: experts per token; also soft share and entropy)."""
    names = list(panels)
    figure, axes = _axes(1, len(names), 4.5, 3.8, sharey=True)
    for axis, panel in zip(axes[0], names):
        for variant, seeds in panels[panel].items():
            x, mean, std = _mean_band([sorted(s.items()) for s in seeds])
            axis.errorbar(x, mean, yerr=std, marker="o", markersize=3, capsize=2, label=variant)
        axis.set(xlabel="layer", title=panel)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel(ylabel)
    _legend_right(axes[0][-1])
    figure.suptitle(title)
    return _save(figure, path)


def _label(layers: Sequence[int], row: float) -> str:
    """The layer shown in heat-map row ``row`` (rows are the sorted layers)."""
    index = int(round(row))
    return str(layers[index]) if 0 <= index < len(layers) else ""


def plot_load_heatmaps(loads: Mapping[str, Mapping[int, Sequence[float]]], path: str | Path) -> Path:
    """One heat map per variant: each expert's share of the gate mass (columns) by layer (rows).
    Layers with fewer experts (MoLA 2-4-6-8) leave the extra columns blank."""
    names = list(loads)
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = _axes(rows, columns, 4, 3.2)
    for axis, name in zip(axes.flat, names):
        layers = sorted(loads[name])
        width = max(len(loads[name][layer]) for layer in layers)
        grid = np.full((len(layers), width), np.nan)
        for row, layer in enumerate(layers):
            grid[row, : len(loads[name][layer])] = loads[name][layer]
        image = axis.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0.0)
        axis.set(xlabel="expert", ylabel="layer", title=name)
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_formatter(FuncFormatter(lambda row, _, layers=layers: _label(layers, row)))
        axis.grid(False)
        figure.colorbar(image, ax=axis, label="load")
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    return _save(figure, path)


def plot_ablation(points: Mapping[float, Sequence[float]], path: str | Path, xlabel: str, ylabel: str,
                  title: str, log_x: bool = False) -> Path:
    """Accuracy against a swept value, mean ± std over seeds (Figure 4)."""
    x = sorted(points)
    stats = [(np.mean(points[v]), np.std(points[v], ddof=1) if len(points[v]) > 1 else 0.0) for v in x]
    figure, axes = _axes(1, 1, 5, 3.8)
    axis = axes[0][0]
    axis.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3)
    if log_x:
        axis.set_xscale("log")
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return _save(figure, path)

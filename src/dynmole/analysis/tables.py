"""The comparison table in the papers' layout: methods as rows, tasks and their average as
columns, every cell the mean ± std over seeds."""

from __future__ import annotations

from typing import Mapping, Sequence

from ..job import ALL_TASKS
from .runs import RunRecord, mean_experts, mean_std


def mean_std_cell(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``"m ± s"`` of ``values`` times ``scale``; a single value shows alone, none as ``-``."""
    if not values:
        return "-"
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def parameter_count(count: float) -> str:
    """``27.9M``, ``12.3K`` or ``512``."""
    for size, suffix in ((1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.1f}{suffix}"
    return f"{count:.0f}"


def table_tasks(groups: Mapping[str, Sequence[RunRecord]]) -> list[str]:
    """The tasks any run evaluated: the paper's order first, then others as first seen."""
    seen: list[str] = []
    for records in groups.values():
        for record in records:
            seen += [t for t in record.result["eval"]["tasks"] if t not in seen]
    return [t for t in ALL_TASKS if t in seen] + [t for t in seen if t not in ALL_TASKS]


def comparison_table(groups: Mapping[str, Sequence[RunRecord]], metric: str = "acc_norm") -> str:
    """Markdown table: one row per variant (its seeds' records), ``metric`` in percent per task
    and on average, then trainable parameters and experts active per token (evaluation forwards)."""
    tasks = table_tasks(groups)
    header = ["method", *tasks, "average", "trainable params", "experts / token", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, records in groups.items():
        evals = [r.result["eval"] for r in records]
        cells = [mean_std_cell([e["tasks"][t][metric] for e in evals if t in e["tasks"]], 100) for t in tasks]
        cells.append(mean_std_cell([e["average"][metric] for e in evals], 100))
        cells.append(parameter_count(records[0].result["trainable_params"]))
        experts = [m for m in (mean_experts(r.routing) for r in records) if m is not None]
        cells.append(mean_std_cell(experts, digits=2))
        cells.append(str(len(records)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

"""The routing-regime study (docs/regime.md): do the routers leave uniform, and when?

Reads every finished run under a folder (``result.json`` with the routing probe's
``routing_probe.jsonl`` beside it, from ``dynmole reproduce --profile regime``), and writes

* ``regime.md``: one row per run, its settings (what departs from the profile) and the held-out
  routing at the start, middle and end of training, the first step at which most adapted modules
  have a majority of held-out tokens below the soft-routing threshold, and held-out accuracy;
* ``plots/regime_entropy.png``, ``regime_modules_below.png``, ``regime_experts.png``: the probe's
  curves over training, one line per run;
* ``plots/regime_high_entropy_by_layer.png``: at the last probe, the share of tokens above the
  threshold by layer and projection; ``plots/regime_max_load.png`` the busiest expert's load over
  training, for runs whose probe logged it.

``python -m dynmole.analysis.regime ROOT [--output DIR]`` does it from the command line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_write
from ..training.runs import PROBE_LOG_NAME, RESULT_NAME
from .plots import plot_by_layer, plot_curves
from .runs import RunRecord, layer_index

MOST = 0.5
"""``probe_layers_below`` at or above this: most modules route a majority of tokens sparsely."""


@dataclass(frozen=True)
class StudyRun:
    """One finished run of the study and its routing-probe records (in step order)."""

    record: RunRecord
    probes: list[dict[str, Any]]

    @property
    def label(self) -> str:
        """Method and the settings a reader compares runs by."""
        train, adapter = self.record.result.get("train", {}), self.record.result.get("adapter", {})
        parts = [f"{self.record.result['method']}", f"lr {train.get('lr', 0):g}",
                 f"router x{train.get('router_lr_scale', 1.0):g}"]
        entropy = adapter.get("entropy_coef")
        if entropy is not None:
            parts.append(f"β {entropy:g}")
        init = adapter.get("router_init_std", 0.02)
        if init != 0.02:  # None: the method's reference init (kaiming-uniform for DynMoLE)
            parts.append("init kaiming" if init is None else f"init std {init:g}")
        return ", ".join(parts)

    def curve(self, key: str) -> list[tuple[int, float]]:
        return [(p["step"], p[key]) for p in self.probes if key in p]

    def at(self, step: int, key: str) -> float | None:
        """``key`` at the probe nearest to ``step``."""
        if not self.probes:
            return None
        return min(self.probes, key=lambda p: abs(p["step"] - step))[key]

    def first_step_most_below(self) -> int | None:
        """First probed step at which most modules have a majority of tokens below the threshold."""
        return next((p["step"] for p in self.probes if p["probe_layers_below"] >= MOST), None)


def load_study(root: str | Path) -> list[StudyRun]:
    """Every finished run under ``root`` that has a routing probe, sorted by label."""
    records = (RunRecord.read(result.parent) for result in sorted(Path(root).rglob(RESULT_NAME)))
    runs = [StudyRun(record, probes) for record in records if (probes := record.probes())]
    return sorted(runs, key=lambda r: r.label)


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def study_table(runs: Sequence[StudyRun]) -> str:
    """The markdown table of ``regime.md``."""
    header = ("| run | steps | entropy 0 / mid / end | modules mostly below threshold, end | experts/token end "
              "| busiest expert's load, end | first step most modules below | train loss (last log) "
              "| held-out acc_norm (avg) |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for run in runs:
        last = run.probes[-1]["step"]
        entropy = " / ".join(_cell(run.at(s, "probe_entropy")) for s in (0, last // 2, last))
        loss = run.record.log("loss")
        first = run.first_step_most_below()
        average = run.record.result["eval"]["average"]["acc_norm"]
        rows.append(f"| {run.label} | {last} | {entropy} | {_cell(run.at(last, 'probe_layers_below'))} | "
                    f"{_cell(run.at(last, 'probe_experts'))} | {_cell(busiest_load(run.record.routing))} | "
                    f"{'never' if first is None else first} | "
                    f"{_cell(loss[-1][1] if loss else None)} | {100 * average:.1f} |")
    return header + "\n".join(rows) + "\n"


def busiest_load(routing: dict[str, dict[str, Any]]) -> float | None:
    """Mean over modules of the busiest expert's share of the gate mass (1/N when balanced), from
    the routing statistics of the final evaluation."""
    loads = [max(stats["load"]) for stats in routing.values() if stats.get("load")]
    return sum(loads) / len(loads) if loads else None


def _by_layer_at_end(runs: Sequence[StudyRun], key: str) -> dict[str, dict[str, list[dict[int, float]]]]:
    """projection -> run label -> [{layer: value}] from each run's last probe."""
    panels: dict[str, dict[str, list[dict[int, float]]]] = {}
    for run in runs:
        for module, values in run.probes[-1]["modules"].items():
            layer = layer_index(module)
            if layer is None:
                continue
            projection = module.rsplit(".", 1)[-1]
            series = panels.setdefault(projection, {}).setdefault(run.label, [{}])
            series[0][layer] = values[key]
    return panels


def write_study(runs: Sequence[StudyRun], output: str | Path) -> list[Path]:
    """Write ``regime.md`` and the study's plots into ``output``; returns the paths."""
    output = Path(output)
    plots = output / "plots"
    written = [
        plot_curves({r.label: [r.curve("probe_entropy")] for r in runs}, plots / "regime_entropy.png",
                    "mean normalised Tsallis entropy", "Held-out router entropy during training"),
        plot_curves({r.label: [r.curve("probe_layers_below")] for r in runs}, plots / "regime_modules_below.png",
                    "share of modules", "Modules where most held-out tokens are below the threshold"),
        plot_curves({r.label: [r.curve("probe_experts")] for r in runs}, plots / "regime_experts.png",
                    "experts per token", "Held-out experts per token during training"),
        plot_by_layer(_by_layer_at_end(runs, "high_entropy_fraction"), plots / "regime_high_entropy_by_layer.png",
                      "share of tokens above threshold", "Held-out tokens above the entropy threshold, end"),
    ]
    if any(r.curve("probe_max_load") for r in runs):
        written.append(plot_curves({r.label: [r.curve("probe_max_load")] for r in runs if r.curve("probe_max_load")},
                                   plots / "regime_max_load.png", "busiest expert's share of the gate mass",
                                   "Held-out expert load during training (1/N = balanced)"))
    table = study_table(runs)
    path = output / "regime.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(
        "# Routing-regime study: the runs\n\nWritten by `python -m dynmole.analysis.regime`; the "
        "entropy is the mean over adapted modules of the held-out tokens' normalised Tsallis entropy "
        "(q of the run); 'mostly below' = the share of modules in which most held-out tokens are below "
        "the soft-routing threshold.\n\n" + table))
    return [path, *written]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynmole.analysis.regime", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder holding the study's runs (searched recursively)")
    parser.add_argument("--output", help="where regime.md and plots/ go (default: ROOT)")
    args = parser.parse_args(argv)
    runs = load_study(args.root)
    if not runs:
        print(f"error: no finished run with a {PROBE_LOG_NAME} under {args.root}", file=sys.stderr)
        return 2
    for path in write_study(runs, args.output or args.root):
        print(f"wrote {path}")
    print(study_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

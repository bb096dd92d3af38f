"""The comparison table in the papers' layout: methods as rows, tasks and their average as
columns, every cell the mean ± std over seeds; from the runs' per-example predictions, the
same cells with 95 % intervals and the paired tests of the papers' claims."""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

from ..data import ALL_TASKS
from .runs import RunRecord, mean_experts, mean_std
from .significance import (
    ClaimTest,
    Interval,
    PairedDifference,
    Predictions,
    accuracy_intervals,
    claim_verdict,
    holm_adjusted,
)


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
    return paper_order(seen)


def paper_order(tasks: Sequence[str]) -> list[str]:
    """``tasks`` in the paper's order, then the others as given."""
    return [t for t in ALL_TASKS if t in tasks] + [t for t in tasks if t not in ALL_TASKS]


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


def predictions_by_variant(groups: Mapping[str, Sequence[RunRecord]],
                           exclude: Collection[str] = frozenset()) -> dict[str, list[Predictions]]:
    """Per variant, its runs' predictions ordered by seed, without the examples whose id is in
    ``exclude``; variants with a run that has no ``predictions.json`` are left out."""
    out = {}
    for name, records in groups.items():
        ordered = sorted(records, key=lambda r: (r.result.get("seed") is not None, r.result.get("seed") or 0))
        runs = [r.predictions() for r in ordered]
        if all(run is not None for run in runs):
            out[name] = [_without(run, exclude) for run in runs] if exclude else runs
    return out


def _without(run: Predictions, exclude: Collection[str]) -> Predictions:
    """``run``'s per-task parallel lists without the examples whose id is in ``exclude``."""
    kept = {}
    for task, lists in run.items():
        keep = [k for k, example in enumerate(lists["id"]) if example not in exclude]
        kept[task] = {name: [values[k] for k in keep] for name, values in lists.items()}
    return kept


def interval_cell(interval: Interval, digits: int = 1) -> str:
    """``"61.2 [58.1, 64.3]"``: the estimate and its interval in percent."""
    return f"{100 * interval.estimate:.{digits}f} [{100 * interval.low:.{digits}f}, {100 * interval.high:.{digits}f}]"


def interval_table(groups: Mapping[str, Sequence[RunRecord]], metric: str = "acc_norm") -> str:
    """Markdown table of ``metric`` in percent with its 95 % interval (``accuracy_intervals``) per
    task and on average, one row per variant whose runs have predictions, then the seeds and the
    evaluation examples; empty when no run has predictions."""
    runs_by_variant = predictions_by_variant(groups)
    if not runs_by_variant:
        return ""
    tasks = table_tasks({name: groups[name] for name in runs_by_variant})
    header = ["method", *tasks, "average", "seeds", "examples"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, runs in runs_by_variant.items():
        per_task, average = accuracy_intervals(runs, metric)
        cells = [interval_cell(per_task[t]) if t in per_task else "-" for t in tasks]
        cells += [interval_cell(average), str(len(runs)), str(sum(len(lists["id"]) for lists in runs[0].values()))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def p_value_cell(p: float) -> str:
    """``"0.012"``, or ``"< 0.001"``."""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def paired_cell(result: PairedDifference) -> str:
    """``"+3.1 [-2.0, +8.2] p 0.210"``: a difference in points, its interval and p-value."""
    return f"{100 * result.difference:+.1f} {difference_bounds(result)} p {p_value_cell(result.p_value)}"


def difference_bounds(result: PairedDifference) -> str:
    """``"[-2.0, +8.2]"``: a difference's 95 % interval in points."""
    return f"[{100 * result.low:+.1f}, {100 * result.high:+.1f}]"


def paired_table(rows: Sequence[ClaimTest]) -> str:
    """Markdown table, one row per claim test: A, B, metric, seeds pooled, examples, the difference
    A - B of the task-averaged accuracy in points; the fixed-model test's 95 % interval and p-value,
    the exact McNemar p-value, the seed-aware test's interval and p-value (where there is one); the
    verdict at 5 %, the smallest difference detectable with 80 % power and the examples that would
    detect the observed one (both of the test the verdict follows), and the difference of each seed pair."""
    header = ["claim", "A", "B", "metric", "seeds A / B", "examples", "difference (points)",
              "95 % interval (fixed model)", "p (fixed model)", "McNemar p", "95 % interval (seeds resampled)",
              "p (seeds resampled)", "verdict", "detectable (80 % power)", "examples for this gap", "by seed pair"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---|" + "---:|" * 8 + "---|" + "---:|" * 3]
    for row in rows:
        c, seeds, decisive = row.fixed, row.seeds, row.decisive
        needed = decisive.average.examples_needed()
        cells = [row.claim, c.a, c.b, c.metric, f"{c.seeds_a} / {c.seeds_b}", str(c.average.examples),
                 f"{100 * c.average.difference:+.1f}", difference_bounds(c.average), p_value_cell(c.average.p_value),
                 p_value_cell(c.mcnemar.p_value), "-" if seeds is None else difference_bounds(seeds.average),
                 "-" if seeds is None else p_value_cell(seeds.average.p_value), decisive.verdict(),
                 f"{100 * decisive.average.detectable():.1f}", "-" if needed is None else f"{needed:,}",
                 " / ".join(f"{100 * d:+.1f}" for d in c.seed_pairs) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_task_table(rows: Sequence[ClaimTest]) -> str:
    """Markdown table of where each difference comes from: per claim test and task, the difference
    A - B in points, its 95 % interval and p-value, of the test the verdict follows."""
    seen: list[str] = []
    for row in rows:
        seen += [t for t in row.decisive.tasks if t not in seen]
    tasks = paper_order(seen)
    lines = ["| A vs B | metric | test | " + " | ".join(tasks) + " |", "|---|---|---|" + "---:|" * len(tasks)]
    for row in rows:
        c = row.decisive
        cells = [paired_cell(c.tasks[t]) if t in c.tasks else "-" for t in tasks]
        lines.append(f"| {c.a} vs {c.b} | {c.metric} | {_test_name(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _test_name(row: ClaimTest) -> str:
    return "fixed model" if row.seeds is None else "seeds resampled"


def verdict_table(rows: Sequence[ClaimTest]) -> str:
    """Markdown table, one row per claim (in first-seen order): the test the verdict follows (seeds
    resampled where both variants have enough seeds, else the fixed-model test), each metric's
    difference A - B with its interval and p-value, ``significance.claim_verdict`` over the metrics,
    then each metric's p-value Holm-adjusted over the table's claims (the family-wise check the
    verdict does not make)."""
    claims: dict[str, list[ClaimTest]] = {}
    for row in rows:
        claims.setdefault(row.claim, []).append(row)
    metrics = list(dict.fromkeys(row.fixed.metric for row in rows))
    holm: dict[tuple[str, str], float] = {}
    for metric in metrics:
        found = [row for row in rows if row.fixed.metric == metric]
        for row, adjusted in zip(found, holm_adjusted([row.decisive.average.p_value for row in found])):
            holm[row.claim, metric] = adjusted
    lines = ["| claim | A | B | test | " + " | ".join(metrics) + " | verdict | Holm p (" + " / ".join(metrics) + ") |",
             "|---|---|---|---|" + "---:|" * len(metrics) + "---|---:|"]
    for claim, tests in claims.items():
        by_metric = {row.fixed.metric: row.decisive for row in tests}
        cells = [paired_cell(by_metric[m].average) if m in by_metric else "-" for m in metrics]
        adjusted = " / ".join(p_value_cell(holm[claim, m]) if (claim, m) in holm else "-" for m in metrics)
        tests_used = " / ".join(dict.fromkeys(_test_name(row) for row in tests))
        lines.append(f"| {claim} | {tests[0].fixed.a} | {tests[0].fixed.b} | {tests_used} | " + " | ".join(cells)
                     + f" | {claim_verdict([row.decisive for row in tests])} | {adjusted} |")
    return "\n".join(lines) + "\n"


def time_table(groups: Mapping[str, Sequence[RunRecord]]) -> str:
    """Markdown table of what the runs cost: per variant its runs, the wall time of one run in
    minutes (mean, and the range over seeds where several) and the share of it spent training,
    then the grid's total in hours and the machines the runs name; empty when no run recorded
    ``wall_time_s``."""
    timed = {name: [r for r in records if r.result.get("wall_time_s") is not None] for name, records in groups.items()}
    if not any(timed.values()):
        return ""
    lines = ["| method | runs | minutes per run | training share |", "|---|---:|---:|---:|"]
    for name, records in timed.items():
        if not records:
            continue
        minutes = [r.result["wall_time_s"] / 60 for r in records]
        spread = f" ({min(minutes):.1f}-{max(minutes):.1f})" if len(minutes) > 1 else ""
        train = [r.result.get("train_summary", {}).get("runtime_s") for r in records]
        share = (f"{100 * sum(train) / sum(r.result['wall_time_s'] for r in records):.0f} %"
                 if all(s is not None for s in train) else "-")
        lines.append(f"| {name} | {len(records)} | {sum(minutes) / len(minutes):.1f}{spread} | {share} |")
    hours = sum(r.result["wall_time_s"] for records in timed.values() for r in records) / 3600
    machines = sorted({r.result.get("machine", "?") for records in timed.values() for r in records})
    return "\n".join(lines) + f"\n\nIn all {hours:.1f} h of wall time, on: {'; '.join(machines)}.\n"

"""From finished runs to the results folder's tables and figures."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist
from typing import Any, Collection, Mapping, Sequence

from ..data.leakage import leaked_eval_ids
from ..data.split import LEAK_FREE_SPLIT, LEGACY_SPLIT
from ..evaluation.report import metric_heading
from ..io import atomic_write
from ..routing_measures import COLLAPSE_SHARE, busiest_share, load_entropy
from ..training.runs import RESULTS_MD_NAME
from .plots import plot_ablation, plot_by_layer, plot_curves, plot_load_heatmaps
from .routing_claims import (
    ROUNDS,
    UNDECIDABLE,
    claim_tests,
    descriptive_table,
    lm_loss,
    loss_round_curves,
    loss_round_table,
    order_agreement,
    runs_by_key,
    seed_test_table,
)
from .runs import RunRecord, by_layer, load_by_layer
from .significance import ALPHA, CLAIMS, POWER, RESAMPLES, SEED, SEED_AWARE_MIN_SEEDS, ClaimTest, claim_test
from .tables import (
    comparison_table,
    interval_table,
    paired_table,
    paired_task_table,
    predictions_by_variant,
    time_table,
    verdict_table,
)

METRICS = ("acc_norm", "acc")
_Z_ALPHA, _Z_POWER = NormalDist().inv_cdf(1 - ALPHA / 2), NormalDist().inv_cdf(POWER)
_INTERVALS_NOTE = (
    "Cells: mean over seeds with its 95 % interval over the evaluation examples: for one seed the Wilson score "
    f"interval, for several a percentile bootstrap ({RESAMPLES:,} resamples) of each example's correctness averaged "
    "over the seeds; the average's interval from a bootstrap stratified by task. It measures the evaluation set's "
    "sampling noise given the trained models; the spread between training seeds is the ± std above."
)


def _write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _heading(groups: Mapping[str, Sequence[RunRecord]], metric: str) -> str:
    """The table heading: ``metric`` and the runs' evaluation protocol (``"acc (%, cloze: ...)"``)."""
    protocols = sorted({record.scoring for records in groups.values() for record in records})
    if len(protocols) == 1:
        return metric_heading(metric, protocols[0])
    return f"{metric} (%, mixed protocols {', '.join(protocols)}: not comparable)"


def _with_load_measures(routing: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each module's routing statistics with the busiest expert's share and the load entropy
    (:mod:`dynmole.routing_measures`) computed from its ``load``, which runs of every version record;
    modules without gate mass are left out."""
    return {module: {**stats, "busiest_share": busiest_share(stats["load"]),
                     "load_entropy": load_entropy(stats["load"])}
            for module, stats in routing.items() if sum(stats["load"]) > 0}


def _by_layer_panels(groups: Mapping[str, Sequence[RunRecord]], key: str) -> dict[str, dict[str, list]]:
    """projection -> variant -> per seed {layer: value}, over the variants with routing stats."""
    panels: dict[str, dict[str, list]] = {}
    for name, records in groups.items():
        for record in records:
            for projection, values in by_layer(_with_load_measures(record.routing), key).items():
                panels.setdefault(projection, {}).setdefault(name, []).append(values)
    return panels


def _mean_loads(records: Sequence[RunRecord]) -> dict[int, list[float]]:
    """Per layer, each expert's load averaged over the seeds."""
    loads = [load_by_layer(r.routing) for r in records]
    return {layer: [sum(col) / len(loads) for col in zip(*(load[layer] for load in loads))] for layer in loads[0]}


_PROBE_PLOTS = (
    ("probe_entropy", "normalised Tsallis entropy", "Router entropy on held-out tokens during training"),
    ("probe_experts", "experts per token", "Experts per held-out token during training"),
    ("probe_soft_fraction", "share of tokens routed soft", "Held-out tokens routed soft during training"),
)


def _probe_plots(routed: Mapping[str, Sequence[RunRecord]], soft: Mapping[str, Sequence[RunRecord]],
                 directory: Path) -> list[Path]:
    """The routing probe's curves over training (``routing_probe.jsonl``, mean ± std over seeds):
    ``probe_entropy.png``, ``probe_experts.png`` and, for the variants that route soft,
    ``probe_soft_fraction.png``; none when no run has a probe."""
    written = []
    for key, ylabel, title in _PROBE_PLOTS:
        groups = soft if key == "probe_soft_fraction" else routed
        curves = {n: [r.probe_curve(key) for r in rs] for n, rs in groups.items()}
        if any(any(c) for c in curves.values()):
            written.append(plot_curves(curves, directory / f"{key}.png", ylabel, f"{title} (mean ± std over seeds)"))
    return written


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
    written.append(plot_by_layer(_by_layer_panels(routed, "busiest_share"), directory / "busiest_share_by_layer.png",
                                 "busiest expert's share of the load",
                                 f"Busiest expert's share by layer (evaluation; collapsed at >= {COLLAPSE_SHARE:g})"))
    written.append(plot_by_layer(_by_layer_panels(routed, "load_entropy"), directory / "load_entropy_by_layer.png",
                                 "load entropy / log N", "Load entropy by layer (evaluation; 1 = balanced)"))
    if all(s.get("input_dependence") is not None for rs in routed.values() for r in rs for s in r.routing.values()):
        written.append(plot_by_layer(_by_layer_panels(routed, "input_dependence"),
                                     directory / "input_dependence_by_layer.png", "input dependence (I / log N)",
                                     "Input dependence of the gates by layer (evaluation)"))
    written += _probe_plots(routed, soft, directory)
    entropy = {n: [r.entropy_curve() for r in rs] for n, rs in routed.items()}
    if any(any(c) for c in entropy.values()):
        written.append(plot_curves(entropy, directory / "entropy_training.png", "normalised Tsallis entropy",
                                   "Router entropy during training (from the entropy loss)"))
    return written


def claim_comparisons(groups: Mapping[str, Sequence[RunRecord]], claims: Sequence[tuple[str, str, str]] = CLAIMS,
                      metrics: Sequence[str] = METRICS, exclude: Collection[str] = frozenset()) -> list[ClaimTest]:
    """The tests (:func:`~dynmole.analysis.significance.claim_test`) of each claim and metric whose two
    variants (by key) both have runs with predictions, on their examples but those in ``exclude``;
    the other claims are left out."""
    runs = predictions_by_variant(groups, exclude)
    names = {groups[name][0].key: name for name in runs if groups[name][0].key}
    untrained = {name: not groups[name][0].result.get("train") for name in runs}
    return [claim_test(text, runs[names[a]], runs[names[b]], metric, (names[a], names[b]),
                       (untrained[names[a]], untrained[names[b]]))
            for a, b, text in claims if a in names and b in names for metric in metrics]


def paired_tests_markdown(groups: Mapping[str, Sequence[RunRecord]], exclude: Collection[str] = frozenset()) -> str:
    """The "Paired tests" section of ``results.md``: the claims' table, then the same per task;
    empty when no claim has both variants with predictions. ``exclude``: evaluation ids left out."""
    rows = claim_comparisons(groups, exclude=exclude)
    if not rows:
        return ""
    how = (
        "Each row tests one claim of the papers on the same evaluation examples. Difference: A's minus B's "
        "task-averaged accuracy (each task counts once, as in the tables' average), each example's "
        "correctness first averaged over the variant's seeds (`seeds A / B` pooled). 95 % interval and "
        f"p-value: paired bootstrap stratified by task ({rows[0].fixed.resamples:,} resamples of each task's "
        f"examples, the same for A and B, seed {SEED}), percentile interval, two-sided p from the bootstrap "
        "distribution of the centred difference: the **fixed-model** test, which holds the trained models "
        f"fixed. Seeds resampled: where both variants have {SEED_AWARE_MIN_SEEDS} or more seeds (the zero-shot "
        "base, untrained, needs none), the "
        "**seed-aware** test, a hierarchical bootstrap that also draws each variant's training seeds with "
        "replacement (the same draw for every task) before the examples; it is the verdict where it exists, "
        "and it is wider, since another draw of training seeds moves the difference too. McNemar p: exact "
        "binomial test on the examples only one of A and B got right, pooled over tasks and seed pairs (a "
        f"second opinion). Verdict: the seed-aware p (else the fixed-model p) < {ALPHA:g}; not corrected for "
        "testing several claims (the Holm p of the verdict table is). Detectable: the smallest true "
        f"difference these examples and seeds detect with {100 * POWER:g} % power at 5 % (({_Z_ALPHA:.2f} + "
        f"{_Z_POWER:.2f}) x the standard error of the test the verdict follows); examples for this gap: how "
        "many evaluation examples, at the same disagreement between A and B, would detect the observed "
        "difference with that power, were it the true one, given only where the observed gap exceeds twice "
        "its standard error (a smaller gap is no estimate to extrapolate from). By seed pair: the difference "
        "of A's i-th seed against B's i-th (the fixed-model bootstrap holds the trained models fixed; this "
        "column shows training-seed variation as it is). The hybrid-routing row compares DynMoLE (-) with DynMoLE "
        "(Top-p): both without the entropy loss, so it isolates the routing rule (soft routing at high "
        "router entropy with at least 2 experts, against top-p with at least 1)."
    )
    verdicts = ("### Verdict per claim\n\nEach claim over both metrics: supported (or contradicted) where every "
                "metric's paired test finds A > B (or B > A) at 5 %, \"on <metric> only\" where the other metric "
                "detects nothing, not decided where neither detects a difference. Holm p: each metric's p-value "
                "adjusted (Holm-Bonferroni) over all the claims of this table, below 0.05 where a difference "
                "survives the family-wise check.\n\n")
    return (f"## Paired tests\n\n{how}\n\n{paired_table(rows)}\n{verdicts}{verdict_table(rows)}\n"
            f"### Paired tests per task (difference in points [95 % interval] p)\n\n{paired_task_table(rows)}")


def _metric_section(groups: Mapping[str, Sequence[RunRecord]], metric: str) -> str:
    """The metric's table (mean ± std), then its 95 % intervals when the runs have predictions."""
    section = f"## {_heading(groups, metric)}\n\n{comparison_table(groups, metric)}"
    intervals = interval_table(groups, metric)
    return f"{section}\n### 95 % intervals: {metric}\n\n{_INTERVALS_NOTE}\n\n{intervals}" if intervals else section


def leaked_items(groups: Mapping[str, Sequence[RunRecord]]) -> set[str]:
    """The evaluation ids of the runs' packaged tasks that have a near-duplicate in their training half
    under the split the runs were made with (:func:`dynmole.data.leakage.leaked_eval_ids`; runs
    recorded before split versions used the first); none for runs on the leak-free split or local data."""
    splits = set()
    for job in (r.result.get("job", {}) for runs in groups.values() for r in runs):
        version = job.get("split_version", LEGACY_SPLIT)
        if job.get("source", "packaged") == "packaged" and version != LEAK_FREE_SPLIT:
            splits.update((task, job.get("eval_fraction", 0.5), version) for task in job.get("tasks", []))
    leaked: set[str] = set()
    for task, fraction, version in sorted(splits):  # each task's split once, however many runs share it
        leaked.update(leaked_eval_ids(task, fraction, version))
    return leaked


def leak_free_tests_markdown(groups: Mapping[str, Sequence[RunRecord]]) -> str:
    """The paired tests again without the evaluated items that leak (:func:`leaked_items`); empty when
    none of the evaluated items leaks."""
    leaked = leaked_items(groups)
    evaluated = {i for runs in predictions_by_variant(groups).values() for run in runs
                 for lists in run.values() for i in lists["id"]}
    dropped = leaked & evaluated
    if not dropped:
        return ""
    rows = claim_comparisons(groups, exclude=dropped)
    tasks = sorted({i.split("/", 1)[0] for i in dropped})
    return (f"## Paired tests without the leaked items\n\nThese runs were split with a grouping that leaves "
            f"near-duplicates on both sides (`split_version` 1, docs/data.md): {len(dropped)} of the evaluated "
            f"items ({', '.join(tasks)}) have a near-duplicate in the training half. The same tests without "
            f"them:\n\n{verdict_table(rows)}")


def routing_claims_markdown(groups: Mapping[str, Sequence[RunRecord]], directory: Path | None = None) -> str:
    """The "Routing claims" section: the papers' routing claims tested over seeds from the runs'
    ``result.json`` routing, ``log.jsonl`` and ``routing_probe.jsonl`` (:mod:`.routing_claims`), the
    loss per round and, with ``directory``, ``plots/loss_rounds.png``; empty without routed runs."""
    runs = runs_by_key(groups)
    tests = claim_tests(runs)
    if not tests:
        return ""
    curves = {(k, r.seed): lm_loss(r.log) for k, rs in runs.items() for r in rs if r.log}
    same_seed, same_method = order_agreement(curves)
    plot = ""
    if directory is not None:
        path = plot_curves(loss_round_curves(runs), directory / "plots" / "loss_rounds.png", "training LM loss",
                           "Training LM loss per round (a tenth of the run; mean ± std over seeds)", xlabel="round")
        plot = f"Figure: `{path.relative_to(directory)}`.\n\n"
    undecided = "\n".join(f"| {claim} | {why} |" for claim, why in UNDECIDABLE)
    return (
        "## Routing claims\n\n"
        "The papers' routing claims, each a paired test over training seeds (the unit is the trained model; "
        "pairs by seed number: seeds 0-2 where both variants have three, 0-1 where one has two). Per-seed "
        "differences A - B, their mean with a paired t interval (Student t, n - 1 degrees of freedom) and "
        "its two-sided p, and the exact sign-flip permutation p over the 2^n sign assignments. n is tiny: "
        "the sign-flip p cannot go below 0.5 with 2 seeds or 0.25 with 3, and the t-test with 1 or 2 degrees "
        "of freedom rests on the differences being normal; verdict: the t p < 0.05 in the claimed direction "
        "(supported) or the other (contradicted), else not decided. Measures: router entropy, the modules' "
        "normalised Tsallis entropy over the evaluation tokens weighted by tokens, and at the routing probe's "
        "last step; load entropy and busiest-expert share (`dynmole.routing_measures`) of each module's "
        "evaluation `load`, averaged over the 90 modules; experts against entropy: across modules and probe "
        "steps (per-module means: the files have no per-token pairs); LM loss: the logged training loss "
        "minus the logged `aux_total` (the aux losses, averaged over the same steps), averaged per round "
        f"({ROUNDS} rounds of a tenth of the run); zero experts: bin 0 of each module's `experts_histogram` "
        "over its tokens.\n\n"
        f"{seed_test_table(tests)}\n"
        f"| claim | why not decided |\n|---|---|\n{undecided}\n\n"
        "### Routing per method (evaluation, mean over seeds)\n\n"
        "Collapsed modules: per seed, how many modules' busiest expert carries at least 90 % of the load. "
        "Experts sd by token: the standard deviation of experts per token within a module "
        "(`experts_histogram`), averaged over modules; by module: the standard deviation of the modules' "
        "mean experts per token.\n\n"
        f"{descriptive_table(runs)}\n"
        "### Training LM loss per round (mean ± std over seeds)\n\n"
        "Same data order per seed: the mixture is ordered by `sha256(seed/id)` and the trainer shuffles with "
        "`data_seed` = the run's seed, so every method sees the same batches at the same steps for a given "
        "seed. The logs agree: the step-to-step changes of two runs' LM loss correlate "
        f"{same_seed:.2f} on average for the same seed and different methods, {same_method:.2f} for the same "
        "method and different seeds. Departure from the paper (Figure 5): it trains on GLUE-RTE's 2,490 "
        "training examples; here the curves are the grid's own 6-task mixture (3,971 examples, 400 steps of "
        "batch 8, less than one epoch), each point a 10-step mean of the logged loss.\n\n"
        f"{plot}{loss_round_table(runs)}"
    )


def grid_report(groups: Mapping[str, Sequence[RunRecord]], directory: str | Path, title: str,
                notes: str = "", paired: str | None = None) -> list[Path]:
    """Write ``results.md`` (per metric the table and, from the runs' predictions, its 95 %
    intervals; then the paired tests: ``paired`` when given, else :func:`paired_tests_markdown`)
    and the figures under ``plots/``; returns the paths."""
    directory = Path(directory)
    tables = "\n".join(_metric_section(groups, metric) for metric in METRICS)
    paired = paired_tests_markdown(groups) if paired is None else paired
    leak_free = leak_free_tests_markdown(groups)
    plots = routing_plots(groups, directory / "plots")
    routing_claims = routing_claims_markdown(groups, directory)
    if routing_claims:
        plots.append(directory / "plots" / "loss_rounds.png")
    figures = "\n".join(f"- `{p.relative_to(directory)}`" for p in plots)
    times = time_table(groups)
    time_section = (f"## Time\n\nEach run's `wall_time_s` (training, evaluation and checkpoints; it includes whatever "
                    f"else ran on the machine) and the share of it its trainer reported as training.\n\n{times}\n"
                    if times else "")
    text = (f"# {title}\n\n{notes}\n\n{tables}\n" + (f"{paired}\n" if paired else "")
            + (f"{leak_free}\n" if leak_free else "") + (f"{routing_claims}\n" if routing_claims else "")
            + time_section
            + f"## Figures\n\n{figures}\n")
    return [_write_text(directory / RESULTS_MD_NAME, text), *plots]


def ablation_report(points: Mapping[float, Sequence[RunRecord]], directory: str | Path, name: str, xlabel: str,
                    metric: str, log_x: bool = False, notes: str = "") -> list[Path]:
    """Write ``ablation-<name>.md`` (the comparison table, one row per value) and
    ``plots/ablation-<name>.png`` (average ``metric`` against the value)."""
    directory = Path(directory)
    groups = {records[0].variant: records for records in points.values()}
    plot = plot_ablation({v: [100 * r.result["eval"]["average"][metric] for r in rs] for v, rs in points.items()},
                         directory / "plots" / f"ablation-{name}.png", xlabel, f"average {metric} (%)",
                         f"Ablation: {xlabel}", log_x)
    text = (f"# Ablation: {xlabel}\n\n{notes}\n\n## {_heading(groups, metric)}\n\n"
            f"{comparison_table(groups, metric)}\nFigure: `{plot.relative_to(directory)}`\n")
    return [_write_text(directory / f"ablation-{name}.md", text), plot]

"""Statistics that decide claims: 95 % intervals of accuracy cells and paired tests of two
variants over the same evaluation examples, from the runs' per-example predictions
(``predictions.json``, :meth:`dynmole.analysis.RunRecord.predictions`).

Every function is a pure function of the predictions (numpy only). Every bootstrap draws from
``numpy.random.default_rng([seed, crc32(task)])``, one generator per task, so the numbers are
reproducible and a task's resamples do not depend on which other tasks are compared.

Accuracies and differences are fractions here; the tables show them in percent (points).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Predictions = Mapping[str, Mapping[str, Sequence[Any]]]
"""One run's predictions: task -> parallel lists ``id``, ``label``, ``acc``, ``acc_norm``."""

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0
ALPHA = 0.05
POWER = 0.8
_DRAWS_PER_CHUNK = 4_000_000  # bootstrap indices drawn at once: bounds the memory of a large task

CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("lora", "base", "fine-tuning helps (LoRA vs the zero-shot base)"),
    ("dynmole", "mola", "DynMoLE beats MoLA (top-2)"),
    ("mola", "loramoe", "MoLA (top-2) beats LoRAMoE"),
    ("loramoe", "lora", "LoRAMoE beats LoRA"),
    ("dynmole", "lora", "DynMoLE beats LoRA"),
    ("dynmole", "dynmole-noent", "the Tsallis entropy loss helps"),
    ("dynmole-noent", "dynmole-topp", "hybrid routing helps (soft at high entropy, keep-top-2; vs top-p)"),
    ("ldmole", "remole", "LD-MoLE (shared) beats ReMoLE"),
    ("remole", "mola", "ReMoLE beats MoLA (top-2)"),
    ("ldmole", "mola", "LD-MoLE (shared) beats MoLA (top-2)"),
)
"""The papers' claims as (A variant key, B variant key, claim): each says A is more accurate than B
(keys of ``dynmole.experiments.profiles.VARIANTS``, or ``base`` for the zero-shot model, the premise
that fine-tuning helps at all at the grid's budget). The hybrid-routing row compares DynMoLE (-)
with DynMoLE (Top-p): both without the entropy loss, so it isolates the routing rule (soft
routing when the router's entropy is high, and at least 2 experts, against plain top-p with at
least 1), the two switched together as in DynMoLE's ablation."""


@dataclass(frozen=True)
class Interval:
    """An accuracy (fraction) and its confidence interval."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of A minus accuracy of B (fractions) on the same examples: percentile interval of
    the paired bootstrap and its two-sided p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    examples: int
    standard_error: float
    """The standard deviation of the bootstrap distribution of the difference."""

    def detectable(self, power: float = POWER, alpha: float = ALPHA) -> float:
        """The smallest true difference that this many examples (at this disagreement between A and
        B, these seeds) detect with probability ``power`` at two-sided level ``alpha``: the normal
        approximation ``(z_{1-alpha/2} + z_power) * standard_error``."""
        normal = NormalDist()
        return (normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)) * self.standard_error

    def examples_to_detect(self, power: float = POWER, alpha: float = ALPHA) -> int | None:
        """Evaluation examples needed to detect the observed difference with probability ``power``,
        were it the true one (the standard error shrinks as 1 / sqrt(examples)); None when the
        observed difference is 0 (per-task differences that cancel leave a float residue of about
        1e-19, far below one example in a million: that is 0 too)."""
        if abs(self.difference) < 1e-12:
            return None
        return math.ceil(self.examples * (self.detectable(power, alpha) / self.difference) ** 2)

    def examples_needed(self, power: float = POWER, alpha: float = ALPHA) -> int | None:
        """:meth:`examples_to_detect`, but only where the observed difference exceeds twice its
        standard error; None otherwise (a smaller gap is within its own noise, and extrapolating
        from it, as ``(z_{1-alpha/2} + z_power)^2 (SE / gap)^2`` does, gives numbers that mean
        nothing)."""
        if abs(self.difference) <= 2 * self.standard_error:
            return None
        return self.examples_to_detect(power, alpha)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: examples (x seed pairs) only A got right, only B got right, and the
    two-sided binomial p-value of that split under p = 1/2."""

    a_only: int
    b_only: int
    p_value: float


@dataclass(frozen=True)
class Comparison:
    """Variant ``a`` against ``b`` on one metric: on the task average and per task."""

    a: str
    b: str
    metric: str
    seeds_a: int
    seeds_b: int
    resamples: int
    average: PairedDifference
    tasks: dict[str, PairedDifference]

    def verdict(self, alpha: float = ALPHA) -> str:
        return verdict(self.average, self.a, self.b, alpha)


@dataclass(frozen=True)
class PairedComparison(Comparison):
    """The fixed-model test (:func:`paired_comparison`): the trained models held fixed, examples
    resampled; with the exact McNemar test beside it."""

    mcnemar: McNemar
    seed_pairs: tuple[float, ...] = ()
    """A's minus B's task-averaged accuracy for each seed pair (A's i-th run against B's i-th, as
    McNemar pairs them): whether the pooled difference holds seed by seed. The bootstrap treats the
    trained models as fixed, so these are the only view of training-seed variation in the test."""


def direction(result: PairedDifference, alpha: float = ALPHA) -> int:
    """1 where the test finds A > B at ``alpha``, -1 where it finds B > A, 0 where it detects nothing
    (p >= alpha, or no difference at all)."""
    if result.p_value >= alpha or result.difference == 0:
        return 0
    return 1 if result.difference > 0 else -1


def verdict(result: PairedDifference, a: str, b: str, alpha: float = ALPHA) -> str:
    """``"a > b"`` or ``"b > a"`` when ``result.p_value < alpha``, else "no difference detected at 5 %"."""
    found = direction(result, alpha)
    if not found:
        return f"no difference detected at {100 * alpha:g} %"
    return f"{a} > {b}" if found > 0 else f"{b} > {a}"


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order: the k-th smallest of m becomes
    ``max_{j <= k} min(1, (m - j + 1) p_(j))``; rejecting where the adjusted p < alpha holds the
    family-wise error rate at alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def claim_verdict(comparisons: Sequence[Comparison], alpha: float = ALPHA) -> str:
    """One claim's verdict ("A beats B") over its metrics, each decided by its paired test at
    ``alpha``: supported where A > B on every metric, contradicted where B > A on every metric,
    "supported on <metrics> only" or "contradicted on <metrics> only" where the other metrics detect
    nothing, "conflicting" where the metrics disagree in sign, and "not decided" (with the smallest
    difference the tests could have detected) where none detects a difference."""
    if not comparisons:
        raise ValueError("a claim needs at least one comparison")
    signs = [direction(c.average, alpha) for c in comparisons]
    wins = [c.metric for c, s in zip(comparisons, signs) if s > 0]
    losses = [c.metric for c, s in zip(comparisons, signs) if s < 0]
    if wins and losses:
        return f"conflicting: A > B on {', '.join(wins)}, B > A on {', '.join(losses)}"
    if wins or losses:
        word, metrics = ("supported", wins) if wins else ("contradicted", losses)
        return word if len(metrics) == len(comparisons) else f"{word} on {', '.join(metrics)} only"
    low, high = (f"{100 * f(c.average.detectable(alpha=alpha) for c in comparisons):.1f}" for f in (min, max))
    return (f"not decided: no difference detected; these tests detect {low if low == high else f'{low}-{high}'} "
            f"points with {100 * POWER:g} % power")


# ------------------------------------------------------------------------------- predictions
def _reorder(ids: Sequence[str], reference: Sequence[str], where: str) -> np.ndarray:
    """Positions in ``ids`` of each id of ``reference``; a ValueError naming ``where`` unless both
    hold the same ids (each once)."""
    position = {example: k for k, example in enumerate(ids)}
    if len(position) != len(ids):
        raise ValueError(f"{where}: an example id occurs twice")
    missing = [example for example in reference if example not in position]
    if missing or len(ids) != len(reference):
        extra = set(position) - set(reference)
        sample = (missing or sorted(extra))[:3]
        raise ValueError(f"{where}: not evaluated on the same examples ({len(missing)} ids only in the first, "
                         f"{len(extra)} only in the second, e.g. {sample}); a paired comparison needs the same ids")
    return np.array([position[example] for example in reference], dtype=np.intp)


def correctness(runs: Sequence[Predictions], metric: str,
                name: str = "variant") -> dict[str, tuple[list[str], np.ndarray]]:
    """Per task: the example ids (the first run's order) and a ``runs x examples`` 0/1 matrix,
    1 where the run's ``metric`` prediction is the gold label. Every run must hold the same tasks
    and ids (else a ValueError naming the task and ``name``)."""
    if not runs:
        raise ValueError(f"{name}: no runs with predictions")
    first = runs[0]
    for k, run in enumerate(runs[1:], 1):
        if set(run) != set(first):
            raise ValueError(f"{name}: runs 0 and {k} have predictions for different tasks "
                             f"({sorted(first)} vs {sorted(run)})")
    out = {}
    for task, reference in first.items():
        rows = []
        for k, run in enumerate(runs):
            lists = run[task]
            order = _reorder(lists["id"], reference["id"], f"task {task!r}, {name} runs 0 and {k}")
            rows.append(np.asarray(lists[metric])[order] == np.asarray(lists["label"])[order])
        out[task] = (list(reference["id"]), np.array(rows, dtype=float).reshape(len(runs), -1))
    return out


# ------------------------------------------------------------------------------- intervals
def wilson_interval(correct: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / n`` (no continuity correction)."""
    if n <= 0:
        raise ValueError("the Wilson interval needs at least one example")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _resample_examples(n: int, resamples: int, rng: np.random.Generator,
                       statistic: Callable[[slice, np.ndarray], np.ndarray]) -> np.ndarray:
    """``resamples`` bootstrap draws over ``n`` examples: for the resamples ``rows`` of each chunk,
    ``statistic(rows, indices)`` with ``indices`` the ``len(rows) x n`` example indices drawn with
    replacement (chunks bound the memory of a large task)."""
    if n == 0:
        raise ValueError("a bootstrap needs at least one example")
    chunk = max(1, _DRAWS_PER_CHUNK // n)
    draws = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        draws[start:stop] = statistic(slice(start, stop), rng.integers(0, n, size=(stop - start, n)))
    return draws


def bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of ``values`` (as many examples as there are,
    drawn with replacement)."""
    return _resample_examples(len(values), resamples, rng, lambda _, indices: values[indices].mean(axis=1))


def stratified_bootstrap(values_by_task: Mapping[str, np.ndarray], resamples: int = RESAMPLES,
                         seed: int = SEED) -> dict[str, np.ndarray]:
    """Bootstrap distribution of each task's mean, resampling examples within the task; the
    distribution of the task average is the mean of these over tasks, resample by resample."""
    return {task: bootstrap_means(np.asarray(values, dtype=float), resamples,
                                  np.random.default_rng([seed, zlib.crc32(task.encode())]))
            for task, values in values_by_task.items()}


def percentile_interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of bootstrap ``draws``."""
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def bootstrap_p_value(draws: np.ndarray, observed: float) -> float:
    """Two-sided p-value of ``observed`` = 0 from the bootstrap distribution of the centred statistic:
    ``(1 + #{|T* - T| >= |T|}) / (1 + resamples)`` (1 when the statistic is 0)."""
    extreme = np.abs(draws - observed) >= abs(observed) - 1e-12
    return float((1 + extreme.sum()) / (1 + len(draws)))


def _task_average(draws: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(list(draws.values())), axis=0)


def accuracy_intervals(runs: Sequence[Predictions], metric: str, confidence: float = CONFIDENCE,
                       resamples: int = RESAMPLES, seed: int = SEED) -> tuple[dict[str, Interval], Interval]:
    """Intervals of one table row (a variant's runs, one per seed): per task and for the task average.

    The estimate is the mean over seeds of the accuracy. A task's interval: with one seed the
    Wilson score interval; with several, the percentile interval of a bootstrap over examples of
    each example's correctness averaged over the seeds. The average (each task counts once): the
    percentile interval of a bootstrap stratified by task, with one seed or several.
    """
    per_example = {task: matrix.mean(axis=0) for task, (_, matrix) in correctness(runs, metric).items()}
    draws = stratified_bootstrap(per_example, resamples, seed)
    tasks = {}
    for task, values in per_example.items():
        if len(runs) == 1:
            low, high = wilson_interval(float(values.sum()), len(values), confidence)
        else:
            low, high = percentile_interval(draws[task], confidence)
        tasks[task] = Interval(float(values.mean()), low, high)
    estimate = float(np.mean([t.estimate for t in tasks.values()]))
    return tasks, Interval(estimate, *percentile_interval(_task_average(draws), confidence))


# ------------------------------------------------------------------------------- paired tests
def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` trials under p = 1/2:
    ``min(1, 2 P(X <= min(k, n - k)))`` (what ``scipy.stats.binomtest`` gives at p = 1/2)."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    term = total = 1  # comb(n, 0), then comb(n, i) in exact integers
    for i in range(low):
        term = term * (n - i) // (i + 1)
        total += term
    return min(1.0, 2 * total / 2**n)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> McNemar:
    """Exact McNemar test of two ``runs x examples`` 0/1 matrices over the same examples: the i-th
    run of A is paired with the i-th run of B (in a grid, the same seed; extra runs of the variant
    with more seeds are left out), and the discordant examples are pooled over those pairs."""
    pairs = min(len(a), len(b))
    a, b = a[:pairs].astype(bool), b[:pairs].astype(bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    return McNemar(a_only, b_only, binomial_two_sided_p(a_only, a_only + b_only))


def _paired_difference(observed: float, draws: np.ndarray, examples: int, confidence: float) -> PairedDifference:
    low, high = percentile_interval(draws, confidence)
    p_value = bootstrap_p_value(draws, observed)
    return PairedDifference(observed, low, high, p_value, examples, float(draws.std(ddof=1)))


def _aligned(a_runs: Sequence[Predictions], b_runs: Sequence[Predictions], metric: str,
             names: tuple[str, str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Correctness matrices of A and B per task, B's columns in A's example order."""
    a, b = correctness(a_runs, metric, names[0]), correctness(b_runs, metric, names[1])
    if set(a) != set(b):
        raise ValueError(f"{names[0]} and {names[1]} were evaluated on different tasks "
                         f"({sorted(a)} vs {sorted(b)}); a paired comparison needs the same tasks")
    b_aligned = {}
    for task, (ids, _) in a.items():
        b_ids, b_matrix = b[task]
        b_aligned[task] = b_matrix[:, _reorder(b_ids, ids, f"task {task!r}: {names[0]} vs {names[1]}")]
    return {task: matrix for task, (_, matrix) in a.items()}, b_aligned


def paired_comparison(a_runs: Sequence[Predictions], b_runs: Sequence[Predictions], metric: str,
                      names: tuple[str, str] = ("A", "B"), confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES, seed: int = SEED) -> PairedComparison:
    """Variant A (its runs, one per seed) against B on the same examples, pooled over seeds.

    Statistic: A's task-averaged accuracy minus B's (the mean over tasks of each task's accuracy,
    each task counting once), where each example's correctness is first averaged over that
    variant's seeds (A and B may have different seed counts). Interval and p-value: a paired
    bootstrap stratified by task (``resamples`` resamples of each task's examples, the same
    indices for A and B): the percentile interval, and the two-sided p-value of the bootstrap
    distribution of the centred statistic (:func:`bootstrap_p_value`). The same per task. A second
    opinion: the exact McNemar test pooled over seed pairs and tasks (:func:`mcnemar_exact`).

    Raises ValueError, naming the task and the variants, unless both evaluated the same ids.
    """
    a, b = _aligned(a_runs, b_runs, metric, names)
    differences = {task: a[task].mean(axis=0) - b[task].mean(axis=0) for task in a}
    draws = stratified_bootstrap(differences, resamples, seed)
    tasks = {task: _paired_difference(float(d.mean()), draws[task], len(d), confidence)
             for task, d in differences.items()}
    observed = float(np.mean([t.difference for t in tasks.values()]))
    examples = sum(t.examples for t in tasks.values())
    mcnemar = mcnemar_exact(np.concatenate(list(a.values()), axis=1), np.concatenate(list(b.values()), axis=1))
    seed_pairs = tuple(float(np.mean([a[task][i].mean() - b[task][i].mean() for task in a]))
                       for i in range(min(len(a_runs), len(b_runs))))
    return PairedComparison(names[0], names[1], metric, len(a_runs), len(b_runs), resamples,
                            _paired_difference(observed, _task_average(draws), examples, confidence), tasks, mcnemar,
                            seed_pairs)


# ------------------------------------------------------------------------------- seeds resampled too
@dataclass(frozen=True)
class HierarchicalComparison(Comparison):
    """The seed-aware test (:func:`hierarchical_comparison`): training seeds resampled as well as
    the examples."""


def _seed_weights(runs: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples x runs``: the share of each run among ``runs`` runs drawn with replacement."""
    drawn = rng.integers(0, runs, size=(resamples, runs))
    return (drawn[:, :, None] == np.arange(runs)).sum(axis=1) / runs


def hierarchical_bootstrap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], resamples: int = RESAMPLES,
                           seed: int = SEED) -> dict[str, np.ndarray]:
    """Per task, bootstrap draws of A's accuracy minus B's, seeds and examples resampled.

    ``a[task]`` and ``b[task]`` are ``runs x examples`` 0/1 matrices over the same examples (the
    runs of a variant are its training seeds). Resample ``r``: draw A's runs and B's runs with
    replacement, each variant on its own (run weights ``w^A_r``, ``w^B_r``: the share of each run
    among the draws), the same draws for every task (a run is one trained model); then draw the
    task's examples with replacement, the same for A and B (indices ``i_1..i_n``), as the fixed-model
    bootstrap does, from the same generator per task; the draw is
    ``(1/n) sum_k (w^A_r . a[:, i_k] - w^B_r . b[:, i_k])``. With one run of each (or runs that agree
    on every example) these are exactly the draws of :func:`stratified_bootstrap` of the per-example
    differences.
    """
    tasks = list(a)
    seeds_rng = np.random.default_rng([seed, zlib.crc32(b"training seeds")])
    weights_a = _seed_weights(len(a[tasks[0]]), resamples, seeds_rng)
    weights_b = _seed_weights(len(b[tasks[0]]), resamples, seeds_rng)

    def draws(task: str) -> np.ndarray:
        def statistic(rows: slice, indices: np.ndarray) -> np.ndarray:
            per_example = weights_a[rows] @ a[task] - weights_b[rows] @ b[task]
            return np.take_along_axis(per_example, indices, axis=1).mean(axis=1)

        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
        return _resample_examples(a[task].shape[1], resamples, rng, statistic)

    return {task: draws(task) for task in tasks}


def hierarchical_comparison(a_runs: Sequence[Predictions], b_runs: Sequence[Predictions], metric: str,
                            names: tuple[str, str] = ("A", "B"), confidence: float = CONFIDENCE,
                            resamples: int = RESAMPLES, seed: int = SEED) -> HierarchicalComparison:
    """Variant A (its runs, one per training seed, each a ``predictions.json`` as
    :meth:`dynmole.analysis.RunRecord.predictions` reads it) against B, seeds and examples resampled.

    Statistic: as :func:`paired_comparison` (A's task-averaged accuracy minus B's, each example's
    correctness averaged over the variant's seeds). Interval and p-value: the percentile interval
    and the two-sided p-value (:func:`bootstrap_p_value`) of :func:`hierarchical_bootstrap`, stratified
    by task; the same per task. The interval covers what another draw of training seeds would
    change as well as another draw of examples; the fixed-model test (:func:`paired_comparison`)
    holds the trained models fixed. Raises ValueError unless both evaluated the same ids.
    """
    a, b = _aligned(a_runs, b_runs, metric, names)
    draws = hierarchical_bootstrap(a, b, resamples, seed)
    differences = {task: a[task].mean(axis=0) - b[task].mean(axis=0) for task in a}
    tasks = {task: _paired_difference(float(d.mean()), draws[task], len(d), confidence)
             for task, d in differences.items()}
    observed = float(np.mean([t.difference for t in tasks.values()]))
    examples = sum(t.examples for t in tasks.values())
    return HierarchicalComparison(names[0], names[1], metric, len(a_runs), len(b_runs), resamples,
                                  _paired_difference(observed, _task_average(draws), examples, confidence), tasks)


SEED_AWARE_MIN_SEEDS = 3
"""Seeds each of two variants needs before the seed-aware test (:func:`hierarchical_comparison`) is the
verdict; an untrained variant (the zero-shot base: one deterministic run, no training seed) needs none."""


@dataclass(frozen=True)
class ClaimTest:
    """One claim on one metric: the fixed-model test, and the seed-aware one where both variants have
    :data:`SEED_AWARE_MIN_SEEDS` seeds or more (else None)."""

    claim: str
    fixed: PairedComparison
    seeds: HierarchicalComparison | None = None

    @property
    def decisive(self) -> Comparison:
        """The test the verdict follows: the seed-aware one where there is one, else the fixed-model one."""
        return self.seeds if self.seeds is not None else self.fixed


def claim_test(claim: str, a_runs: Sequence[Predictions], b_runs: Sequence[Predictions], metric: str,
               names: tuple[str, str], untrained: tuple[bool, bool] = (False, False)) -> ClaimTest:
    """Both tests of ``claim`` (:class:`ClaimTest`): the seed-aware one only where each side has
    :data:`SEED_AWARE_MIN_SEEDS` seeds or is ``untrained`` (and at least one side was trained)."""
    fixed = paired_comparison(a_runs, b_runs, metric, names)
    enough = not all(untrained) and all(
        done or len(runs) >= SEED_AWARE_MIN_SEEDS for runs, done in zip((a_runs, b_runs), untrained))
    return ClaimTest(claim, fixed, hierarchical_comparison(a_runs, b_runs, metric, names) if enough else None)

"""The routing claims of the papers that the committed runs' files can decide, each as a paired
test over training seeds.

Every measure here is a plain function of what a run records (``result.json``'s per-module
``routing`` statistics over the evaluation forwards, ``log.jsonl``'s training log and
``routing_probe.jsonl``'s held-out routing during training), so each can be checked on hand-made
inputs. A claim compares two variants run with the same seeds: the unit of the test is the seed
(the training run), paired by seed number (the same seed gives the same data order for every
method: :func:`order_agreement` checks it from the logs). With 2-3 seeds the test is weak: each
row prints the per-seed differences, their mean, a paired t interval and p (Student t with
``n - 1`` degrees of freedom) and the exact sign-flip permutation p over the ``2 ** n`` sign
assignments of the differences, whose smallest possible value is ``2 / 2 ** n`` (0.5 for two
seeds, 0.25 for three): it can never reach 5 % with these seeds.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats

from ..routing_measures import busiest_share, collapsed, load_entropy
from ..training.runs import LOG_NAME
from .runs import RunRecord
from .significance import ALPHA

Routing = Mapping[str, Mapping[str, Any]]
"""Per module name its routing statistics (``result.json``'s ``routing``)."""

ROUNDS = 10
"""Rounds of a run for the loss-per-round curves: a tenth of the run each (the paper's Figure 5)."""


# --- tests over seeds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedTest:
    """One claim's paired test over seeds: ``differences[seed] = A - B``; ``expected`` is the sign
    the claim predicts (+1: A above B, -1: A below B)."""

    claim: str
    measure: str
    a: str
    b: str
    expected: int
    a_values: dict[int, float]
    b_values: dict[int, float]

    @property
    def seeds(self) -> list[int]:
        return sorted(set(self.a_values) & set(self.b_values))

    @property
    def differences(self) -> list[float]:
        return [self.a_values[s] - self.b_values[s] for s in self.seeds]

    @property
    def mean(self) -> float:
        return float(np.mean(self.differences))

    @property
    def t_test(self) -> tuple[float, float, float]:
        """``(low, high, p)``: :func:`paired_t`."""
        return paired_t(self.differences)

    @property
    def sign_flip_p(self) -> float:
        return sign_flip_p(self.differences)

    def verdict(self, alpha: float = ALPHA) -> str:
        """``supported`` / ``contradicted`` where the paired t p < ``alpha`` in the claimed / the other
        direction, else ``not decided``."""
        p = self.t_test[2]
        if p >= alpha or self.mean == 0:
            return "not decided"
        return "supported" if np.sign(self.mean) == self.expected else "contradicted"


def paired_t(differences: Sequence[float], confidence: float = 1 - ALPHA) -> tuple[float, float, float]:
    """The paired t-test of ``differences`` (one per seed): its ``confidence`` interval for the mean
    difference and the two-sided p (Student t, ``n - 1`` degrees of freedom). Differences that are
    all equal give a zero-width interval and p 0 (1 where they are all 0); one difference gives
    an unbounded interval and p 1."""
    d = np.asarray(differences, dtype=float)
    n, mean = len(d), float(d.mean())
    if n < 2:
        return -math.inf, math.inf, 1.0
    sd = float(d.std(ddof=1))
    if sd == 0:
        return mean, mean, 1.0 if mean == 0 else 0.0
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return mean - half, mean + half, p


def sign_flip_p(differences: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p: the share of the ``2 ** n`` sign assignments of the
    differences whose mean is at least as far from 0 as the observed one (1 for no difference)."""
    d = np.asarray(differences, dtype=float)
    observed = abs(d.mean())
    flips = [abs(np.dot(signs, d)) / len(d) for signs in itertools.product((1.0, -1.0), repeat=len(d))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


# --- measures of one run -------------------------------------------------------------------------


def _tokens(stats_: Mapping[str, Any]) -> float:
    return float(stats_.get("tokens", 1.0))


def router_entropy(routing: Routing) -> float:
    """Normalised router entropy over the evaluation tokens: the modules' ``entropy`` weighted by
    their tokens."""
    total = sum(_tokens(s) for s in routing.values())
    return sum(float(s["entropy"]) * _tokens(s) for s in routing.values()) / total


def load_summary(routing: Routing) -> dict[str, float]:
    """Over the modules: mean busiest-expert share, mean load entropy and how many modules have
    collapsed (:func:`dynmole.routing_measures.collapsed`), from each module's ``load`` vector."""
    shares = [busiest_share(s["load"]) for s in routing.values()]
    entropies = [load_entropy(s["load"]) for s in routing.values()]
    return {"busiest_share": float(np.mean(shares)), "load_entropy": float(np.mean(entropies)),
            "collapsed": float(sum(collapsed(x) for x in shares)), "modules": float(len(shares))}


def zero_expert_share(routing: Routing) -> float:
    """Share of the evaluation tokens (over all modules) routed to no expert: bin 0 of each module's
    ``experts_histogram`` over its tokens."""
    zero = sum(float(s["experts_histogram"][0]) for s in routing.values())
    return zero / sum(float(sum(s["experts_histogram"])) for s in routing.values())


def expert_count_spread(routing: Routing) -> dict[str, float]:
    """How the number of active experts varies: ``by_token``, the within-module standard deviation
    of experts per token (from ``experts_histogram``, bin ``k`` = ``k`` experts), averaged over the
    modules weighted by tokens; ``by_module``, the standard deviation of the modules' mean experts;
    ``low`` / ``high``, the smallest and largest module mean."""
    spreads, weights, means = [], [], []
    for s in routing.values():
        counts = np.asarray(s["experts_histogram"], dtype=float)
        k = np.arange(len(counts))
        mean = float((counts * k).sum() / counts.sum())
        spreads.append(math.sqrt(max(0.0, float((counts * (k - mean) ** 2).sum() / counts.sum()))))
        weights.append(counts.sum())
        means.append(mean)
    return {"by_token": float(np.average(spreads, weights=weights)), "by_module": float(np.std(means, ddof=1)),
            "low": float(min(means)), "high": float(max(means))}


def experts_entropy_slope(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(slope, correlation)`` of experts per token on router entropy over ``(entropy, experts)``
    points (one per module, or per module and probe step): ordinary least squares and Pearson r;
    ``(0, 0)`` where the entropies do not vary."""
    x, y = np.asarray(points, dtype=float).T
    if x.std() == 0:
        return 0.0, 0.0
    slope = float(np.polyfit(x, y, 1)[0])
    r = float(np.corrcoef(x, y)[0, 1]) if y.std() > 0 else 0.0
    return slope, r


def probe_points(probes: Sequence[Mapping[str, Any]], after: int = 0) -> list[tuple[float, float]]:
    """``(entropy, mean_experts)`` of every module at every probe step after ``after``."""
    return [(float(m["entropy"]), float(m["mean_experts"])) for p in probes if p["step"] > after
            for m in p.get("modules", {}).values()]


def first_probe(probes: Sequence[Mapping[str, Any]], key: str, after: int = 0) -> float | None:
    """``key`` at the first probe step after ``after`` (None without one)."""
    later = [p for p in probes if p["step"] > after and key in p]
    return float(min(later, key=lambda p: p["step"])[key]) if later else None


def last_probe(probes: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """``key`` at the last probe step (None without one)."""
    steps = [p for p in probes if key in p]
    return float(max(steps, key=lambda p: p["step"])[key]) if steps else None


def lm_loss(log: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """``(step, loss - aux_total)`` of every training-log record with a ``loss``: the language-model
    loss, the logged loss being the LM loss plus the aux losses (``aux_total``, averaged over the
    same steps; absent for LoRA/DoRA)."""
    return [(int(r["step"]), float(r["loss"]) - float(r.get("aux_total", 0.0))) for r in log if "loss" in r]


def loss_rounds(points: Sequence[tuple[int, float]], steps: int, rounds: int = ROUNDS) -> list[float]:
    """Mean of ``points`` per round: round ``i`` (0-based) holds the steps in
    ``(i * steps / rounds, (i + 1) * steps / rounds]``; a round without points is NaN."""
    out = []
    for i in range(rounds):
        low, high = i * steps / rounds, (i + 1) * steps / rounds
        values = [v for s, v in points if low < s <= high]
        out.append(float(np.mean(values)) if values else math.nan)
    return out


def order_agreement(curves: Mapping[tuple[str, int], Sequence[tuple[int, float]]]) -> tuple[float, float]:
    """Whether a seed fixes the data order: the mean Pearson correlation of the step-to-step changes
    of two loss curves, ``(same seed, different method; same method, different seed)``. With the
    same batches at the same steps the first is high (every method finds the same batches hard)
    and the second near 0."""
    changes = {k: np.diff([v for _, v in sorted(c)]) for k, c in curves.items()}
    same_seed, same_method = [], []
    for (m1, s1), (m2, s2) in itertools.combinations(sorted(changes), 2):
        n = min(len(changes[(m1, s1)]), len(changes[(m2, s2)]))
        r = float(np.corrcoef(changes[(m1, s1)][:n], changes[(m2, s2)][:n])[0, 1])
        if s1 == s2 and m1 != m2:
            same_seed.append(r)
        elif m1 == m2 and s1 != s2:
            same_method.append(r)
    return (float(np.mean(same_seed)) if same_seed else math.nan,
            float(np.mean(same_method)) if same_method else math.nan)


# --- the claims ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What the claims read of one finished run: its seed, routing, probe records and training log."""

    seed: int
    routing: Routing
    probes: Sequence[Mapping[str, Any]]
    log: Sequence[Mapping[str, Any]]
    steps: int


Runs = Mapping[str, Sequence[Run]]
"""Per variant key (``dynmole``, ``mola``, ...) its runs."""

LATE_ROUNDS = (7, 8, 9)
"""The late rounds (0-based) of the convergence test: the last three tenths of the run."""
EARLY_ROUNDS = (0, 1, 2)
"""The early rounds of the convergence test: the first three tenths."""

NAMES = {"dynmole": "DynMoLE", "dynmole-noent": "DynMoLE (-)", "mola": "MoLA", "loramoe": "LoRAMoE",
         "topp": "Top-p", "dynmole-topp": "DynMoLE (Top-p)", "ldmole": "LD-MoLE", "remole": "ReMoLE", "lora": "LoRA"}


def _values(runs: Sequence[Run], measure: Callable[[Run], float | None]) -> dict[int, float]:
    out = {}
    for run in runs:
        value = measure(run)
        if value is not None and not math.isnan(value):
            out[run.seed] = float(value)
    return out


def _rounds_mean(run: Run, rounds: Sequence[int]) -> float:
    values = loss_rounds(lm_loss(run.log), run.steps)
    return float(np.mean([values[i] for i in rounds]))


_ENTROPY = "DynMoLE's entropy loss lowers router entropy"
_EQUITABLE = "DynMoLE: more equitable expert participation"
_FIGURE6 = "DynMoLE activates more experts where the router is uncertain, and earlier, than Top-p"
_CONVERGES = "DynMoLE converges faster (training LM loss)"
_ZERO = "LD-MoLE activates at least one expert per token, ReMoLE does not"

# (claim, measure, A, B, expected sign of A - B, the measure of one run)
_TESTS: tuple[tuple[str, str, str, str, int, Callable[[Run], float | None]], ...] = (
    (_ENTROPY, "router entropy, evaluation (token-weighted over modules)", "dynmole", "dynmole-noent", -1,
     lambda r: router_entropy(r.routing) if r.routing else None),
    (_ENTROPY, "router entropy, last probe (step 400, held-out)", "dynmole", "dynmole-noent", -1,
     lambda r: last_probe(r.probes, "probe_entropy")),
    *((_EQUITABLE, measure, "dynmole", other, sign, fn)
      for other in ("mola", "loramoe", "topp")
      for measure, sign, fn in (
          ("load entropy (mean over modules)", +1,
           lambda r: load_summary(r.routing)["load_entropy"] if r.routing else None),
          ("busiest-expert share (mean over modules)", -1,
           lambda r: load_summary(r.routing)["busiest_share"] if r.routing else None))),
    (_FIGURE6, "slope of experts on entropy over modules x probe steps 50-400", "dynmole", "topp", +1,
     lambda r: experts_entropy_slope(probe_points(r.probes))[0] if probe_points(r.probes) else None),
    (_FIGURE6, "experts per token at the first probe (step 50)", "dynmole", "topp", +1,
     lambda r: first_probe(r.probes, "probe_experts")),
    *((_CONVERGES, f"LM loss, rounds {rounds[0] + 1}-{rounds[-1] + 1} of {ROUNDS}", "dynmole", other, -1,
       lambda r, rounds=rounds: _rounds_mean(r, rounds) if r.log else None)
      for other in ("mola", "loramoe", "topp") for rounds in (EARLY_ROUNDS, LATE_ROUNDS)),
    (_ZERO, "share of token-module pairs with zero active experts", "ldmole", "remole", -1,
     lambda r: zero_expert_share(r.routing) if r.routing else None),
)


def claim_tests(runs: Runs) -> list[SeedTest]:
    """The paired tests over seeds of every claim whose two variants have runs with the data."""
    out = []
    for claim, measure, a, b, sign, fn in _TESTS:
        if a not in runs or b not in runs:
            continue
        a_values, b_values = _values(runs[a], fn), _values(runs[b], fn)
        if set(a_values) & set(b_values):
            out.append(SeedTest(claim, measure, NAMES.get(a, a), NAMES.get(b, b), sign, a_values, b_values))
    return out


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def seed_test_table(tests: Sequence[SeedTest]) -> str:
    """The routing-claims verdict table (markdown)."""
    lines = ["| claim | measure | A | B | A mean | B mean | A - B by seed | mean A - B [95 % t interval] | t p "
             "| sign-flip p | verdict |", "|---|---|---|---|---:|---:|---|---|---:|---:|---|"]
    for t in tests:
        low, high, p = t.t_test
        by_seed = ", ".join(f"s{s}: {_number(d)}" for s, d in zip(t.seeds, t.differences))
        interval = f"{_number(t.mean)} [{_number(low)}, {_number(high)}]"
        a_mean = np.mean([t.a_values[s] for s in t.seeds])
        b_mean = np.mean([t.b_values[s] for s in t.seeds])
        lines.append(f"| {t.claim} | {t.measure} | {t.a} | {t.b} | {_number(a_mean)} | {_number(b_mean)} | {by_seed} "
                     f"| {interval} | {p:.3g} | {t.sign_flip_p:.2f} | {t.verdict()} |")
    return "\n".join(lines) + "\n"


def loss_round_table(runs: Runs, keys: Sequence[str] = ("dynmole", "mola", "loramoe", "topp", "lora")) -> str:
    """Training LM loss per round (mean ± std over seeds) per variant (markdown)."""
    present = [k for k in keys if k in runs and any(r.log for r in runs[k])]
    if not present:
        return ""
    per = {k: np.array([loss_rounds(lm_loss(r.log), r.steps) for r in runs[k] if r.log]) for k in present}
    steps = next(r.steps for k in present for r in runs[k])
    header = ["round", "steps", *(f"{NAMES.get(k, k)} (n={len(per[k])})" for k in present)]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|" + "---:|" * len(present)]
    for i in range(ROUNDS):
        span = f"{i * steps // ROUNDS + 1}-{(i + 1) * steps // ROUNDS}"
        cells = []
        for k in present:
            column = per[k][:, i]
            spread = f" ± {column.std(ddof=1):.3f}" if len(column) > 1 else ""
            cells.append(f"{column.mean():.3f}{spread}")
        lines.append(f"| {i + 1} | {span} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def loss_round_curves(runs: Runs, keys: Sequence[str] = ("dynmole", "mola", "loramoe", "topp", "lora")
                      ) -> dict[str, list[list[tuple[float, float]]]]:
    """Per variant name, per seed ``(round, LM loss)`` points for :func:`~dynmole.analysis.plots.plot_curves`."""
    return {NAMES.get(k, k): [[(i + 1.0, v) for i, v in enumerate(loss_rounds(lm_loss(r.log), r.steps))]
                              for r in runs[k] if r.log]
            for k in keys if k in runs and any(r.log for r in runs[k])}


def descriptive_table(runs: Runs) -> str:
    """Per routed variant, mean over seeds: busiest-expert share, load entropy, collapsed modules,
    zero-expert share, experts-per-token spread by token and by module, router entropy (markdown)."""
    lines = ["| method | seeds | busiest share | load entropy | collapsed modules (of all) | zero-expert share "
             "| experts sd by token | experts sd by module | module mean experts low-high | router entropy |",
             "|---|---:|---:|---:|---|---:|---:|---:|---|---:|"]
    for key, rs in runs.items():
        rs = [r for r in rs if r.routing]
        if not rs:
            continue
        loads = [load_summary(r.routing) for r in rs]
        spreads = [expert_count_spread(r.routing) for r in rs]
        collapsed_counts = ", ".join(f"{int(x['collapsed'])}" for x in loads) + f" (of {int(loads[0]['modules'])})"
        lines.append(
            f"| {NAMES.get(key, key)} | {len(rs)} | {np.mean([x['busiest_share'] for x in loads]):.3f} "
            f"| {np.mean([x['load_entropy'] for x in loads]):.3f} | {collapsed_counts} "
            f"| {np.mean([zero_expert_share(r.routing) for r in rs]):.4f} "
            f"| {np.mean([s['by_token'] for s in spreads]):.2f} | {np.mean([s['by_module'] for s in spreads]):.2f} "
            f"| {min(s['low'] for s in spreads):.2f}-{max(s['high'] for s in spreads):.2f} "
            f"| {np.mean([router_entropy(r.routing) for r in rs]):.3f} |")
    return "\n".join(lines) + "\n"


UNDECIDABLE = (
    ("DynMoLE activates more experts where the router is uncertain (per token, the paper's Figure 6)",
     "not decidable from the committed files: needs per-token (entropy, experts) pairs; the runs keep "
     "per-module means per probe step only, so the slope above is across modules and steps, not tokens"),
    ("The routers specialise (input dependence >= 0.2, not collapsed)",
     "not decidable from the committed files: needs the per-token gate sums (`gate_sums`) that new runs "
     "record; the committed runs have the load vectors only (busiest share, load entropy)"),
)


def runs_by_key(groups: Mapping[str, Sequence[RunRecord]]) -> dict[str, list[Run]]:
    """The grid's runs as the claims read them, per variant key (runs without a key left out)."""
    out: dict[str, list[Run]] = {}
    for records in groups.values():
        for record in records:
            if not record.key or not record.result.get("train"):
                continue
            log = [json.loads(line) for line in (record.directory / LOG_NAME).read_text().splitlines()
                   if line.strip()] if (record.directory / LOG_NAME).is_file() else []
            steps = int(record.result.get("train_summary", {}).get("steps") or record.result["train"]["max_steps"])
            out.setdefault(record.key, []).append(
                Run(int(record.result.get("seed", 0)), record.routing, record.probes(), log, steps))
    return out

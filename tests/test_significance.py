import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from dynmole.analysis import RunRecord, grid_report, group_by_variant, interval_table, paired_tests_markdown
from dynmole.analysis import significance as sig
from dynmole.analysis.runs import write_predictions

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "mini-2026-11" / "runs"  # no predictions


def _run(correct_by_task, label=1, choices=4):
    """Predictions of one run: per task, a list of 0/1 (right or wrong) per example; the ids are
    ``task/i`` and a wrong answer picks the next choice."""
    return {
        task: {"id": [f"{task}/{i}" for i in range(len(flags))], "label": [label] * len(flags),
               "acc": [label if ok else (label + 1) % choices for ok in flags],
               "acc_norm": [label if ok else (label + 1) % choices for ok in flags]}
        for task, flags in correct_by_task.items()
    }


def _random_run(rate, n, seed, tasks=("arc_e", "piqa")):
    rng = np.random.default_rng(seed)
    return _run({task: (rng.random(n) < rate).astype(int).tolist() for task in tasks})


@pytest.mark.parametrize("k, n", [(7, 10), (0, 12), (12, 12), (31, 64), (640, 1000)])
def test_wilson_interval_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert sig.wilson_interval(k, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_wilson_interval_hand_computed_and_used_for_one_seed():
    # p = 0.7, n = 10, z = 1.959964: centre = (0.7 + z^2/20) / (1 + z^2/10),
    # half = z sqrt(0.021 + z^2/400) / (1 + z^2/10)
    assert sig.wilson_interval(7, 10) == pytest.approx((0.396778, 0.892209), abs=1e-6)
    tasks, average = sig.accuracy_intervals([_run({"arc_e": [1] * 7 + [0] * 3})], "acc")
    assert (tasks["arc_e"].low, tasks["arc_e"].high) == pytest.approx((0.396778, 0.892209), abs=1e-6)
    assert tasks["arc_e"].estimate == average.estimate == pytest.approx(0.7)
    assert average.low <= 0.7 <= average.high  # the average's interval is a bootstrap, even for one seed


def test_interval_over_seeds_bootstraps_seed_averaged_examples():
    runs = [_random_run(0.6, 300, seed) for seed in range(3)]
    tasks, average = sig.accuracy_intervals(runs, "acc_norm")
    for task in ("arc_e", "piqa"):
        mean = np.mean([np.mean(np.array(r[task]["acc_norm"]) == 1) for r in runs])
        assert tasks[task].estimate == pytest.approx(mean)
        assert tasks[task].low < mean < tasks[task].high and tasks[task].high - tasks[task].low < 0.15
    assert average.estimate == pytest.approx(np.mean([t.estimate for t in tasks.values()]))
    # Three seeds of the same examples vary less than one seed: narrower than that seed's Wilson interval.
    assert average.high - average.low < tasks["arc_e"].high - tasks["arc_e"].low
    assert sig.accuracy_intervals(runs, "acc_norm") == (tasks, average)  # seeded: reproducible


def test_paired_bootstrap_detects_a_clear_difference():
    a = [_run({"arc_e": [1] * 70 + [0] * 30, "piqa": [1] * 65 + [0] * 35})]
    b = [_run({"arc_e": [1] * 40 + [0] * 60, "piqa": [1] * 35 + [0] * 65})]
    result = sig.paired_comparison(a, b, "acc", ("DynMoLE", "LoRA"))
    assert result.average.difference == pytest.approx(0.30)
    assert result.average.p_value < 0.01 and 0 < result.average.low < 0.30 < result.average.high
    assert result.verdict() == "DynMoLE > LoRA" and result.average.examples == 200
    assert result.tasks["arc_e"].difference == pytest.approx(0.30) and result.tasks["arc_e"].p_value < 0.01
    assert (result.mcnemar.a_only, result.mcnemar.b_only) == (60, 0) and result.mcnemar.p_value < 1e-15
    flipped = sig.paired_comparison(b, a, "acc", ("LoRA", "DynMoLE"))
    assert flipped.average.difference == pytest.approx(-0.30) and flipped.verdict() == "DynMoLE > LoRA"


def test_identical_predictions_give_no_difference():
    runs = [_random_run(0.6, 80, seed) for seed in range(2)]
    result = sig.paired_comparison(runs, runs, "acc_norm", ("A", "B"))
    assert result.average.difference == 0 and result.average.p_value == 1.0
    assert (result.average.low, result.average.high) == (0.0, 0.0)
    assert result.mcnemar.p_value == 1.0 and result.verdict() == "no difference detected at 5 %"
    assert all(t.p_value == 1.0 for t in result.tasks.values())


def test_small_noisy_difference_is_not_declared():
    a = [_run({"arc_e": [1] * 33 + [0] * 31})]
    b = [_run({"arc_e": [0] * 2 + [1] * 29 + [0] * 31 + [1] * 2})]  # 31 right; 2 + 4 discordant examples
    result = sig.paired_comparison(a, b, "acc")
    assert result.average.low < 0 < result.average.high and result.average.p_value > 0.3
    assert result.verdict() == "no difference detected at 5 %"


def test_detectable_difference_and_examples_needed_follow_the_standard_error():
    # one task, 400 examples, A and B disagree on 80 (50 only A right, 30 only B right): difference +5 points,
    # standard error of a paired difference about sqrt(d / n) = sqrt(0.2 / 400) = 2.2 points.
    a = [_run({"arc_e": [1] * 50 + [0] * 30 + [1] * 100 + [0] * 220})]
    b = [_run({"arc_e": [0] * 50 + [1] * 30 + [1] * 100 + [0] * 220})]
    result = sig.paired_comparison(a, b, "acc").average
    assert result.difference == pytest.approx(0.05)
    assert result.standard_error == pytest.approx((0.2 - 0.05**2) ** 0.5 / 400**0.5, rel=0.05)
    assert result.detectable() == pytest.approx((1.959964 + 0.841621) * result.standard_error)
    assert result.detectable(power=0.5) < result.detectable() < result.detectable(power=0.9)
    needed = result.examples_to_detect()
    assert needed == pytest.approx(400 * (result.detectable() / 0.05) ** 2, abs=1)
    # +5 points is 2.3 standard errors: significant (p about 0.02) but below the 2.8 of 80 % power, so about
    # 1.5x the examples would detect it reliably
    assert result.p_value < 0.05 and 400 < needed < 700
    same = sig.paired_comparison(a, a, "acc").average
    assert same.examples_to_detect() is None and same.detectable() == 0


def test_examples_needed_is_none_when_per_task_differences_cancel():
    # A beats B on some tasks and loses on others by as many examples in all: the task-averaged difference
    # is 0 up to float rounding, and no number of examples detects it (not 10^36 of them)
    shifts = {"arc_e": 4, "arc_c": 4, "obqa": 1, "piqa": -19, "siqa": 13, "winogrande": -3}
    a = {t: [1] * 200 + [1] * max(d, 0) + [0] * max(-d, 0) + [0] * (300 - abs(d)) for t, d in shifts.items()}
    b = {t: [1] * 200 + [0] * max(d, 0) + [1] * max(-d, 0) + [0] * (300 - abs(d)) for t, d in shifts.items()}
    result = sig.paired_comparison([_run(a)], [_run(b)], "acc").average
    assert result.difference == pytest.approx(0, abs=1e-15) and result.detectable() > 0
    assert result.examples_to_detect() is None


def test_statistic_averages_tasks_and_seeds_and_allows_other_seed_counts():
    # arc_e (10 examples): A always right, B always wrong; piqa (100): the same predictions.
    # Task average: (1 + 0) / 2 = 0.5, not the pooled 10 / 110.
    same = [1, 0] * 50
    a = [_run({"arc_e": [1] * 10, "piqa": same}), _run({"arc_e": [1] * 5 + [0] * 5, "piqa": same})]
    b = [_run({"arc_e": [0] * 10, "piqa": same})]
    result = sig.paired_comparison(a, b, "acc")
    assert result.tasks["arc_e"].difference == pytest.approx(0.75)  # A's seeds average 0.75 per example
    assert result.tasks["piqa"].difference == 0
    assert result.average.difference == pytest.approx(0.375) and (result.seeds_a, result.seeds_b) == (2, 1)
    assert result.mcnemar.a_only == 10  # only the first seed of A is paired with B's one seed
    assert result.seed_pairs == (pytest.approx(0.5),)  # (1 - 0 on arc_e + 0 on piqa) / 2, that pair alone
    two = sig.paired_comparison(a, [b[0], b[0]], "acc")
    assert two.seed_pairs == (pytest.approx(0.5), pytest.approx(0.25))  # A's seed 1 gets arc_e half right


def test_b_is_aligned_to_a_by_id():
    a = [_run({"arc_e": [1, 1, 0, 0]})]
    b = {task: {key: values[::-1] for key, values in lists.items()} for task, lists in a[0].items()}
    result = sig.paired_comparison(a, [b], "acc")
    assert result.average.difference == 0 and result.mcnemar.a_only == result.mcnemar.b_only == 0


@pytest.mark.parametrize("k, n", [(0, 0), (0, 7), (3, 20), (10, 20), (13, 20), (41, 100), (100, 230)])
def test_exact_binomial_p_matches_scipy(k, n):
    expected = 1.0 if n == 0 else binomtest(k, n, 0.5).pvalue
    assert sig.binomial_two_sided_p(k, n) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_counts_discordant_pairs_over_seeds():
    rng = np.random.default_rng(5)
    a, b = (rng.random((3, 200)) < p for p in (0.6, 0.5))
    result = sig.mcnemar_exact(a.astype(float), b.astype(float))
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    assert (result.a_only, result.b_only) == (a_only, b_only) and a_only > b_only > 0
    assert result.p_value == pytest.approx(binomtest(a_only, a_only + b_only, 0.5).pvalue, rel=1e-9)


def test_mismatched_examples_are_refused():
    a = [_run({"arc_e": [1, 0, 1], "piqa": [1, 1]})]
    other_ids = _run({"arc_e": [1, 0, 1], "piqa": [1, 1]})
    other_ids["piqa"]["id"] = ["piqa/0", "piqa/9"]
    with pytest.raises(ValueError, match=r"task 'piqa': DynMoLE vs LoRA: not evaluated on the same examples"):
        sig.paired_comparison(a, [other_ids], "acc", ("DynMoLE", "LoRA"))
    with pytest.raises(ValueError, match="DynMoLE and LoRA were evaluated on different tasks"):
        sig.paired_comparison(a, [_run({"arc_e": [1, 0, 1]})], "acc", ("DynMoLE", "LoRA"))
    with pytest.raises(ValueError, match=r"task 'arc_e', LoRA runs 0 and 1"):  # the seeds of one variant too
        sig.paired_comparison(a, [a[0], _run({"arc_e": [1, 0], "piqa": [1, 1]})], "acc", ("DynMoLE", "LoRA"))
    twice = _run({"arc_e": [1, 0, 1], "piqa": [1, 1]})
    twice["arc_e"]["id"][1] = "arc_e/0"
    with pytest.raises(ValueError, match="occurs twice"):
        sig.paired_comparison(a, [twice], "acc")


def test_bootstrap_is_seeded_and_chunking_does_not_change_it(monkeypatch):
    values = np.random.default_rng(0).random(50)
    first = sig.stratified_bootstrap({"arc_e": values}, 500, seed=3)["arc_e"]
    monkeypatch.setattr(sig, "_DRAWS_PER_CHUNK", 7 * 50)
    assert np.array_equal(sig.stratified_bootstrap({"arc_e": values}, 500, seed=3)["arc_e"], first)
    assert not np.array_equal(sig.stratified_bootstrap({"arc_e": values}, 500, seed=4)["arc_e"], first)
    # A task's draws do not depend on the other tasks compared with it.
    both = sig.stratified_bootstrap({"piqa": values[::-1], "arc_e": values}, 500, seed=3)
    assert np.array_equal(both["arc_e"], first)


def _write_run(root, key, name, seed, predictions):
    directory = root / "runs" / key / f"seed{seed}"
    directory.mkdir(parents=True)
    tasks = {t: {m: float(np.mean(np.array(p[m]) == np.array(p["label"]))) for m in ("acc", "acc_norm")}
             for t, p in predictions.items()}
    for t in tasks:
        tasks[t]["n"] = len(predictions[t]["id"])
    average = {m: float(np.mean([v[m] for v in tasks.values()])) for m in ("acc", "acc_norm")}
    result = {"variant": name, "key": key, "seed": seed, "trainable_params": 1000, "routing": {},
              "train": {} if key == "base" else {"max_steps": 10},
              "eval": {"tasks": tasks, "average": average, "scoring": "cloze"}}
    (directory / "result.json").write_text(json.dumps(result))
    write_predictions(directory, predictions)
    return RunRecord.read(directory)


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no training logs: an empty loss figure
def test_report_writes_intervals_and_paired_tests(tmp_path):
    good = {"arc_e": [1] * 80 + [0] * 20, "piqa": [1] * 75 + [0] * 25}
    poor = {"arc_e": [1] * 45 + [0] * 55, "piqa": [0] * 60 + [1] * 40}
    records = [_write_run(tmp_path, "lora", "LoRA", s, _run(poor)) for s in (0, 1)]
    records += [_write_run(tmp_path, "dynmole", "DynMoLE", s, _run(good)) for s in (0, 1)]
    records += [_write_run(tmp_path, "mola", "MoLA (top-2)", 0, _run(good))]
    groups = group_by_variant(records)
    assert json.loads((tmp_path / "runs/lora/seed0/predictions.json").read_text()) == _run(poor)

    intervals = interval_table(groups, "acc").splitlines()
    assert intervals[0] == "| method | arc_e | piqa | average | seeds | examples |"
    assert intervals[2].startswith("| LoRA | 45.0 [") and intervals[2].endswith("| 2 | 200 |")
    assert re.fullmatch(r"\| MoLA \(top-2\) \| 80\.0 \[71\.1, 86\.7\] \| 75\.0 \[\d+\.\d, \d+\.\d\] \| "
                        r"77\.5 \[\d+\.\d, \d+\.\d\] \| 1 \| 200 \|", intervals[4]), intervals[4]

    markdown = paired_tests_markdown(groups)
    rows = [line for line in markdown.split("### Verdict per claim")[0].splitlines()
            if line.startswith("| DynMoLE beats")]
    # DynMoLE > MoLA and DynMoLE > LoRA (x 2 metrics); no LoRAMoE, so "LoRAMoE beats LoRA" is left out.
    assert len(rows) == 4 and "LoRAMoE" not in markdown
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    assert cells[:6] == ["DynMoLE beats LoRA", "DynMoLE", "LoRA", "acc_norm", "2 / 2", "200"]
    assert cells[6] == "+35.0" and cells[8] == "< 0.001" and cells[12] == "DynMoLE > LoRA"
    assert cells[10:12] == ["-", "-"]  # two seeds each: the fixed-model test is the verdict
    assert 0 < float(cells[13]) < 35 and 0 < int(cells[14].replace(",", "")) < 200  # detected with room to spare
    assert re.fullmatch(r"\[\+\d+\.\d, \+\d+\.\d\]", cells[7])
    mola = [c.strip() for c in rows[0].strip("|").split("|")]
    assert mola[6] == "+0.0" and mola[8] == "1.000" and mola[12] == "no difference detected at 5 %"
    assert mola[13:] == ["0.0", "-", "+0.0"]  # identical predictions: no gap to detect; one seed pair
    assert "| DynMoLE vs LoRA | acc |" in markdown  # the per-task table
    verdicts = [line for line in markdown.split("### Verdict per claim")[1].splitlines()
                if line.startswith("| DynMoLE beats")]
    assert verdicts[0].startswith(
        "| DynMoLE beats MoLA (top-2) | DynMoLE | MoLA (top-2) | fixed model | +0.0 [+0.0, +0.0] p 1.000 |")
    assert verdicts[0].endswith("| not decided: no difference detected; these tests detect 0.0 points with 80 % power "
                                "| 1.000 / 1.000 |")
    assert verdicts[1].endswith("| supported | < 0.001 / < 0.001 |") and len(verdicts) == 2

    grid_report(groups, tmp_path, "Comparison")
    text = (tmp_path / "results.md").read_text()
    assert "### 95 % intervals: acc_norm" in text and markdown in text


def _comparison(metric, difference, p_value, standard_error=0.01):
    average = sig.PairedDifference(difference, difference - 0.02, difference + 0.02, p_value, 1000, standard_error)
    return sig.PairedComparison("A", "B", metric, 2, 2, 10_000, average, {}, sig.McNemar(0, 0, 1.0))


@pytest.mark.parametrize("cases, expected", [
    ([("acc_norm", 0.03, 0.001), ("acc", 0.02, 0.01)], "supported"),
    ([("acc_norm", -0.03, 0.001), ("acc", -0.02, 0.04)], "contradicted"),
    ([("acc_norm", 0.03, 0.001), ("acc", 0.01, 0.3)], "supported on acc_norm only"),
    ([("acc_norm", -0.01, 0.2), ("acc", -0.03, 0.01)], "contradicted on acc only"),
    ([("acc_norm", 0.03, 0.001), ("acc", -0.03, 0.001)], "conflicting: A > B on acc_norm, B > A on acc"),
    ([("acc_norm", 0.0, 0.0), ("acc", 0.004, 0.6)], "not decided"),  # a zero difference decides nothing
])
def test_claim_verdict_combines_the_metrics(cases, expected):
    verdict = sig.claim_verdict([_comparison(*case) for case in cases])
    assert verdict.split(":")[0] == expected.split(":")[0] and verdict.startswith(expected)


def test_holm_adjustment_hand_computed():
    # sorted 0.01, 0.02, 0.03, 0.5 -> 4 x 0.01, 3 x 0.02, max(0.06, 2 x 0.03), max(0.06, 1 x 0.5); in input order
    assert sig.holm_adjusted([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert sig.holm_adjusted([0.4, 0.3]) == pytest.approx([0.6, 0.6])  # monotone: never below a smaller p's
    assert sig.holm_adjusted([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0]) and sig.holm_adjusted([]) == []


def test_verdict_table_adds_holm_p_per_metric():
    from dynmole.analysis.tables import verdict_table

    rows = [sig.ClaimTest(claim, _comparison(metric, difference, p)) for claim, metric, difference, p in (
        ("one", "acc_norm", 0.03, 0.01), ("one", "acc", 0.03, 0.04), ("two", "acc_norm", 0.01, 0.02),
        ("two", "acc", 0.0, 1.0))]
    lines = verdict_table(rows).splitlines()
    assert lines[0] == "| claim | A | B | test | acc_norm | acc | verdict | Holm p (acc_norm / acc) |"
    assert lines[2].endswith("| supported | 0.020 / 0.080 |")  # acc_norm: 2 x 0.01; acc: 2 x 0.04
    assert lines[3].endswith("| supported on acc_norm only | 0.020 / 1.000 |")  # max(0.02, 1 x 0.02)


def test_undecided_claim_says_what_the_tests_could_detect():
    verdict = sig.claim_verdict([_comparison("acc_norm", 0.004, 0.6, 0.005), _comparison("acc", 0.001, 0.9, 0.01)])
    assert verdict == "not decided: no difference detected; these tests detect 1.4-2.8 points with 80 % power"
    with pytest.raises(ValueError):
        sig.claim_verdict([])


def test_fine_tuning_is_tested_against_the_zero_shot_base(tmp_path):
    base = _write_run(tmp_path, "base", "Base (zero-shot)", 0, _run({"arc_e": [1] * 40 + [0] * 60}))
    lora = [_write_run(tmp_path, "lora", "LoRA", s, _run({"arc_e": [1] * 90 + [0] * 10})) for s in (0, 1)]
    rows = [line for line in paired_tests_markdown(group_by_variant([base, *lora])).splitlines()
            if line.startswith("| fine-tuning helps")]
    assert len(rows) == 3 and "| supported |" in rows[2]  # acc_norm, acc, then the verdict
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1:7] == ["LoRA", "Base (zero-shot)", "acc_norm", "2 / 1", "100", "+50.0"]
    assert cells[12] == "LoRA > Base (zero-shot)"  # fixed model: 1 base seed, no seed-aware test
    assert cells[10:12] == ["-", "-"]


def test_runs_without_predictions_keep_working():
    records = [RunRecord.read(COMMITTED / key / "seed0") for key in ("lora", "dynmole")]
    assert all(r.predictions() is None for r in records)
    groups = group_by_variant(records)
    assert interval_table(groups) == "" and paired_tests_markdown(groups) == ""


def test_three_seeds_each_make_the_seed_aware_test_the_verdict(tmp_path):
    """With 3 seeds on both sides the seed-aware test is run and followed; seeds that disagree widen
    its interval beyond the fixed-model one."""
    n = 100
    lora = [_write_run(tmp_path, "lora", "LoRA", s, _run({"arc_e": [1] * 50 + [0] * 50})) for s in (0, 1, 2)]
    dynmole = [_write_run(tmp_path, "dynmole", "DynMoLE", s, _run({"arc_e": [1] * k + [0] * (n - k)}))
               for s, k in zip((0, 1, 2), (40, 60, 80))]
    markdown = paired_tests_markdown(group_by_variant([*lora, *dynmole]))
    row = next(line for line in markdown.splitlines() if line.startswith("| DynMoLE beats LoRA |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "3 / 3" and cells[10] != "-" and cells[11] != "-"
    fixed_low, fixed_high = map(float, cells[7].strip("[]").split(","))
    seeds_low, seeds_high = map(float, cells[10].strip("[]").split(","))
    assert seeds_high - seeds_low > fixed_high - fixed_low
    verdicts = markdown.split("### Verdict per claim")[1]
    assert "| DynMoLE beats LoRA | DynMoLE | LoRA | seeds resampled |" in verdicts


@pytest.mark.slow
def test_committed_grid_is_retested_without_its_leaked_winogrande_items():
    """The committed cpu grid was split with version 1: 119 of its 500 evaluated WinoGrande items have
    their twin in the training half, and the report tests the claims again without them."""
    from dynmole.analysis.report import leak_free_tests_markdown, leaked_items

    grid = COMMITTED.parents[1] / "cpu" / "runs"
    groups = group_by_variant(RunRecord.read(p.parent) for p in sorted(grid.glob("**/result.json")))
    evaluated = set(RunRecord.read(grid / "lora" / "seed0").predictions()["winogrande"]["id"])
    leaked = leaked_items(groups)
    assert len(leaked & evaluated) == 119 and all(i.startswith("winogrande/") for i in leaked & evaluated)
    section = leak_free_tests_markdown(groups)
    assert section.startswith("## Paired tests without the leaked items") and "119 of the evaluated items" in section
    assert "| DynMoLE beats LoRA |" in section or "| DynMoLE beats MoLA" in section


def test_the_zero_shot_base_needs_no_seeds_for_the_seed_aware_test(tmp_path):
    base = _write_run(tmp_path, "base", "Base (zero-shot)", 0, _run({"arc_e": [1] * 40 + [0] * 60}))
    lora = [_write_run(tmp_path, "lora", "LoRA", s, _run({"arc_e": [1] * k + [0] * (100 - k)}))
            for s, k in zip((0, 1, 2), (80, 90, 85))]
    row = next(line for line in paired_tests_markdown(group_by_variant([base, *lora])).splitlines()
               if line.startswith("| fine-tuning helps"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "3 / 1" and cells[10] != "-" and cells[12] == "LoRA > Base (zero-shot)"

import numpy as np
import pytest

from dynmole.analysis import significance as sig


def _run(correct_by_task):
    """One run's predictions (the shape of predictions.json): per task ids, labels (all 0) and
    predictions, 0 where ``correct_by_task[task][i]`` is 1, else 1."""
    return {task: {"id": [f"{task}/{i}" for i in range(len(flags))], "label": [0] * len(flags),
                   "acc": [0 if ok else 1 for ok in flags], "acc_norm": [0 if ok else 1 for ok in flags]}
            for task, flags in correct_by_task.items()}


def _random_flags(rate, n, rng):
    return (rng.random(n) < rate).astype(int).tolist()


def _variant(rates, n=400, seed=0):
    """One run per entry of ``rates`` (its accuracy), on tasks arc_e and piqa."""
    rng = np.random.default_rng(seed)
    return [_run({task: _random_flags(rate, n, rng) for task in ("arc_e", "piqa")}) for rate in rates]


def _width(difference):
    return difference.high - difference.low


def test_seeds_that_disagree_widen_the_interval():
    a = _variant([0.45, 0.60, 0.75], seed=1)  # three training seeds far apart
    b = _variant([0.60, 0.60, 0.60], seed=2)
    fixed = sig.paired_comparison(a, b, "acc", ("A", "B"))
    seeded = sig.hierarchical_comparison(a, b, "acc", ("A", "B"))
    assert seeded.average.difference == pytest.approx(fixed.average.difference)
    assert _width(seeded.average) > 1.5 * _width(fixed.average)
    assert seeded.average.standard_error > fixed.average.standard_error
    assert seeded.average.p_value >= fixed.average.p_value


def test_seeds_that_agree_give_the_fixed_model_bootstrap():
    one = _variant([0.7], seed=3)
    a, b = one * 3, _variant([0.5], seed=4) * 2  # identical runs: nothing to resample across seeds
    fixed = sig.paired_comparison(a, b, "acc_norm")
    seeded = sig.hierarchical_comparison(a, b, "acc_norm")
    assert seeded.average == fixed.average
    assert seeded.tasks == fixed.tasks


def test_identical_inputs_give_no_difference_and_p_one():
    runs = _variant([0.55, 0.65], seed=5)
    result = sig.hierarchical_comparison(runs, runs, "acc")
    assert result.average.difference == 0 and result.average.p_value == 1.0
    assert all(t.difference == 0 and t.p_value == 1.0 for t in result.tasks.values())
    assert result.verdict() == "no difference detected at 5 %" and result.average.examples_needed() is None


def test_seeded_and_reproducible():
    a, b = _variant([0.5, 0.6, 0.7], seed=6), _variant([0.5, 0.55], seed=7)
    first = sig.hierarchical_comparison(a, b, "acc", resamples=2000, seed=3)
    assert sig.hierarchical_comparison(a, b, "acc", resamples=2000, seed=3) == first
    assert sig.hierarchical_comparison(a, b, "acc", resamples=2000, seed=4).average.low != first.average.low


def test_a_clear_difference_is_found_and_sized():
    a, b = _variant([0.80, 0.82, 0.81], seed=8), _variant([0.50, 0.52, 0.49], seed=9)
    result = sig.hierarchical_comparison(a, b, "acc", ("DynMoLE", "LoRA"))
    assert result.verdict() == "DynMoLE > LoRA" and result.average.low > 0.2
    assert result.average.examples_needed() == result.average.examples_to_detect() < 800


def test_examples_needed_only_beyond_twice_the_standard_error():
    small = sig.PairedDifference(0.003, -0.01, 0.016, 0.6, 3000, 0.0065)
    assert small.examples_to_detect() > 3000 and small.examples_needed() is None
    clear = sig.PairedDifference(0.02, 0.007, 0.033, 0.002, 3000, 0.0065)
    assert clear.examples_needed() == clear.examples_to_detect()


def test_different_examples_are_refused():
    a = [_run({"arc_e": [1, 0, 1]})]
    b = [{"arc_e": {"id": ["x", "y", "z"], "label": [0] * 3, "acc": [0] * 3, "acc_norm": [0] * 3}}]
    with pytest.raises(ValueError, match="same examples"):
        sig.hierarchical_comparison(a, b, "acc")

"""The routing claims' measures and tests over seeds, on hand-made inputs whose answers are known."""

import math

import pytest

from dynmole.analysis import routing_claims as rc


def _module(load, histogram, entropy=0.5):
    return {"load": load, "experts_histogram": histogram, "entropy": entropy, "tokens": sum(histogram)}


def test_paired_t_known_values():
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3) with 2 df
    low, high, p = rc.paired_t([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    assert p == pytest.approx(0.07417990022744853, rel=1e-6)
    assert rc.paired_t([0.5, 0.5]) == (0.5, 0.5, 0.0)
    assert rc.paired_t([0.0, 0.0])[2] == 1.0
    assert rc.paired_t([1.0])[2] == 1.0


def test_sign_flip_floor_with_few_seeds():
    assert rc.sign_flip_p([1.0, 1.0]) == 0.5  # the smallest possible with 2 seeds
    assert rc.sign_flip_p([1.0, 2.0, 3.0]) == 0.25  # and with 3
    assert rc.sign_flip_p([1.0, -1.0]) == 1.0


def test_seed_test_pairs_by_seed_and_gives_a_direction():
    test = rc.SeedTest("c", "m", "A", "B", -1, {0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 3.01, 3: 9.0})
    assert test.seeds == [0, 1]
    assert test.differences == pytest.approx([-1.0, -1.01])
    assert test.verdict() == "supported"
    flipped = rc.SeedTest("c", "m", "A", "B", +1, test.a_values, test.b_values)
    assert flipped.verdict() == "contradicted"
    noisy = rc.SeedTest("c", "m", "A", "B", +1, {0: 1.0, 1: 0.0}, {0: 0.0, 1: 1.0})
    assert noisy.verdict() == "not decided"


def test_load_summary_collapsed_and_uniform():
    routing = {"a": _module([1.0, 0.0, 0.0, 0.0], [0, 10, 0, 0, 0]),
               "b": _module([0.25] * 4, [0, 10, 0, 0, 0])}
    summary = rc.load_summary(routing)
    assert summary["busiest_share"] == pytest.approx((1.0 + 0.25) / 2)
    assert summary["load_entropy"] == pytest.approx(0.5)
    assert summary["collapsed"] == 1 and summary["modules"] == 2


def test_zero_experts_spread_and_entropy():
    routing = {"a": _module([0.5, 0.5], [10, 0, 10], entropy=0.2),  # 10 tokens with none, 10 with 2
               "b": _module([0.5, 0.5], [0, 20, 0], entropy=0.8)}  # every token one expert
    assert rc.zero_expert_share(routing) == pytest.approx(10 / 40)
    spread = rc.expert_count_spread(routing)
    assert spread["by_token"] == pytest.approx((1.0 * 20 + 0.0 * 20) / 40)
    assert (spread["low"], spread["high"]) == (1.0, 1.0)
    assert spread["by_module"] == 0.0
    assert rc.router_entropy(routing) == pytest.approx(0.5)


def test_slope_of_experts_on_entropy():
    slope, r = rc.experts_entropy_slope([(0.0, 1.0), (0.5, 2.0), (1.0, 3.0)])
    assert slope == pytest.approx(2.0) and r == pytest.approx(1.0)
    assert rc.experts_entropy_slope([(0.3, 1.0), (0.3, 4.0)]) == (0.0, 0.0)
    probes = [{"step": 0, "modules": {"m": {"entropy": 1.0, "mean_experts": 6.0}}, "probe_experts": 6.0},
              {"step": 50, "modules": {"m": {"entropy": 0.4, "mean_experts": 2.0}}, "probe_experts": 2.5},
              {"step": 100, "modules": {"m": {"entropy": 0.2, "mean_experts": 1.0}}, "probe_experts": 1.5}]
    assert rc.probe_points(probes) == [(0.4, 2.0), (0.2, 1.0)]
    assert rc.first_probe(probes, "probe_experts") == 2.5
    assert rc.last_probe(probes, "probe_experts") == 1.5


def test_lm_loss_subtracts_aux_and_rounds_average():
    log = [{"step": 10, "loss": 3.0, "aux_total": 1.0}, {"step": 20, "loss": 2.5}, {"step": 20, "train_loss": 9.0},
           {"step": 30, "loss": 2.2, "aux_total": 0.2}, {"step": 40, "loss": 1.0, "aux_total": 0.0}]
    points = rc.lm_loss(log)
    assert points == [(10, 2.0), (20, 2.5), (30, 2.0), (40, 1.0)]
    assert rc.loss_rounds(points, steps=40, rounds=2) == [2.25, 1.5]
    assert math.isnan(rc.loss_rounds(points, steps=80, rounds=4)[3])


def test_order_agreement_tells_shared_batches_apart():
    shared = [(s, v) for s, v in enumerate([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])]
    other = [(s, v) for s, v in enumerate([2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0])]
    shifted = [(s, v + 0.1) for s, v in shared]
    same_seed, same_method = rc.order_agreement({("x", 0): shared, ("y", 0): shifted, ("x", 1): other})
    assert same_seed == pytest.approx(1.0)
    assert same_method < 0.5


def test_claim_tests_from_runs():
    def run(seed, zero):
        routing = {"m": _module([0.5, 0.5], [zero, 10 - zero, 0])}
        return rc.Run(seed, routing, [], [], 400)

    runs = {"ldmole": [run(0, 0), run(1, 0), run(2, 0)], "remole": [run(0, 3), run(1, 4)]}
    (test,) = rc.claim_tests(runs)
    assert (test.a, test.b, test.seeds) == ("LD-MoLE", "ReMoLE", [0, 1])
    assert test.differences == pytest.approx([-0.3, -0.4])
    assert "LD-MoLE" in rc.seed_test_table([test])

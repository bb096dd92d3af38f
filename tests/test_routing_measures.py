import math

import pytest
import torch

from dynmole.routing_measures import (
    busiest_share,
    gate_sums,
    input_dependence,
    load_entropy,
    routing_measures,
)

N = 6


def _measures(gates, valid=None):
    gate_sum, entropy_sum, tokens = gate_sums(gates, valid)
    return routing_measures(gate_sum.numpy(), float(entropy_sum), float(tokens))


def test_collapsed_router_is_at_the_bottom():
    gates = torch.zeros(4, 30, N)
    gates[..., 2] = 0.7  # every token to one expert (unnormalised gates are normalised)
    result = _measures(gates)
    assert result.busiest_share == 1.0 and result.load_entropy == 0.0 and result.input_dependence == 0.0


def test_perfectly_input_dependent_router_is_at_the_top():
    gates = torch.nn.functional.one_hot(torch.arange(5 * N) % N, N).float().reshape(5, N, N)
    result = _measures(gates)
    assert result.input_dependence == pytest.approx(1.0)
    assert result.load_entropy == pytest.approx(1.0) and result.busiest_share == pytest.approx(1 / N)


def test_uniform_soft_gates_depend_on_nothing():
    result = _measures(torch.full((3, 10, N), 1 / N))
    assert result.input_dependence == pytest.approx(0.0, abs=1e-6)
    assert result.load_entropy == pytest.approx(1.0) and result.busiest_share == pytest.approx(1 / N)


def test_padding_does_not_count_and_the_sums_accumulate():
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 1, 5, 5]]), N).float()
    valid = torch.tensor([[1, 1, 0, 0]])
    result = _measures(one_hot, valid)
    # two real tokens on two experts: I = log 2, load entropy log 2 / log 6, busiest 1/2
    assert result.input_dependence == pytest.approx(math.log(2) / math.log(N))
    assert result.busiest_share == pytest.approx(0.5)
    halves = [gate_sums(one_hot[:, :2]), gate_sums(one_hot[:, 2:], valid[:, 2:])]
    total = [sum(parts) for parts in zip(*halves)]
    assert routing_measures(total[0].numpy(), float(total[1]), float(total[2])) == result


def test_two_experts_per_token_halve_the_dependence():
    # top-2 with equal weights on pairs (0,1), (2,3), (4,5) in turn: I = log 6 - log 2 = log 3
    pairs = torch.zeros(6, N)
    for t in range(6):
        pairs[t, 2 * (t % 3): 2 * (t % 3) + 2] = 0.5
    assert _measures(pairs).input_dependence == pytest.approx(math.log(3) / math.log(N))


def test_load_vectors_are_checked():
    assert busiest_share([1, 3]) == 0.75 and load_entropy([2, 2, 2]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 experts"):
        load_entropy([1.0])
    with pytest.raises(ValueError, match="positive sum"):
        busiest_share([0, 0])
    with pytest.raises(ValueError, match="one token"):
        input_dependence([1, 1], 0.0, 0)


def _record(gates):
    from dynmole.layers import RouteResult, RoutingRecord

    return RoutingRecord("m", torch.zeros(gates.shape), RouteResult(gates=gates))


def test_routing_stats_report_the_measures_and_leave_tokens_without_gates_out():
    """``RoutingStats`` accumulates the measures' sums on the device: a collapsed router reads as
    collapsed (busiest share 1, input dependence 0) where experts per token and entropy say little,
    and a ReMoLE token with no active expert changes none of the three."""
    from dynmole.stats import RoutingStats

    collapsed = torch.zeros(1, 4, 3)
    collapsed[..., 0] = 1.0
    stats = RoutingStats()
    stats.update([_record(collapsed)], None)
    summary = stats.summary()["m"]
    assert summary["busiest_share"] == pytest.approx(1.0) and summary["input_dependence"] == pytest.approx(0.0)
    assert summary["load_entropy"] == pytest.approx(0.0)

    one_hot = torch.eye(3).unsqueeze(0)  # three tokens, each to its own expert
    stats.reset()
    stats.update([_record(one_hot)], None)
    reference = stats.summary()["m"]
    assert reference["input_dependence"] == pytest.approx(1.0) and reference["load_entropy"] == pytest.approx(1.0)
    stats.reset()
    stats.update([_record(torch.cat([one_hot, torch.zeros(1, 2, 3)], dim=1))], None)  # two tokens without gates
    with_empty = stats.summary()["m"]
    for name in ("busiest_share", "load_entropy", "input_dependence"):
        assert with_empty[name] == pytest.approx(reference[name]), name
    assert with_empty["tokens"] == 5

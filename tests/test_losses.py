import pytest
import torch

from dynmole import losses
from dynmole.config import MoLEConfig
from dynmole.layers import RouteResult, RoutingRecord


def test_masked_mean_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 100.0]])
    valid = torch.tensor([[1, 1, 0]])
    assert losses.masked_mean(values, valid).item() == pytest.approx(1.5)
    vectors = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [50.0, 50.0]]])
    torch.testing.assert_close(losses.masked_mean(vectors, valid), torch.tensor([0.5, 0.5]))


def test_load_balance_is_one_when_balanced_and_larger_when_not():
    n = 4
    uniform = torch.full((10, n), 1 / n)
    valid = torch.ones(10)
    assert losses.load_balance_loss(uniform, uniform, valid).item() == pytest.approx(1.0)
    collapsed = torch.zeros(10, n)
    collapsed[:, 0] = 1
    assert losses.load_balance_loss(collapsed, collapsed, valid).item() == pytest.approx(n)
    assert losses.load_balance_loss(collapsed, collapsed, valid, mode="switch").item() == pytest.approx(n)


def test_padding_never_counts():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = logits.clone()
    garbage[0, 3:] = 1e3 * torch.randn(2, 6)
    config = MoLEConfig(method="dynmole")

    def run(x):
        record = RoutingRecord("m", x, RouteResult(gates=torch.softmax(x, -1)))
        return losses.aux_losses([record], mask, config)

    a, b = run(logits), run(garbage)
    for key in ("balance", "entropy", "total"):
        torch.testing.assert_close(a[key], b[key])


def test_aux_losses_parts_and_coefficients():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6)
    record = RoutingRecord("m", logits, RouteResult(gates=torch.softmax(logits, -1)))
    config = MoLEConfig(method="dynmole", balance_coef=1e-3, entropy_coef=1e-2)
    out = losses.aux_losses([record, record], None, config)
    valid = torch.ones(3, 4)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(out["balance"], 1e-3 * losses.load_balance_loss(probs, probs, valid))
    torch.testing.assert_close(out["entropy"], 1e-2 * losses.entropy_loss(probs, valid, 1.1))
    torch.testing.assert_close(out["total"], out["balance"] + out["entropy"])
    assert "sparsity" not in out


def test_entropy_loss_off_for_other_methods():
    import dataclasses

    assert MoLEConfig(method="mola").entropy_weight == 0.0
    assert MoLEConfig(method="dynmole").entropy_weight == pytest.approx(1e-2)
    assert dataclasses.replace(MoLEConfig(method="dynmole"), method="mola").entropy_weight == 0.0
    assert MoLEConfig(method="mola", entropy_coef=1e-3).entropy_weight == pytest.approx(1e-3)


def test_sparsity_loss_zero_when_lambda_high_enough():
    torch.manual_seed(0)
    logits = torch.randn(20, 6)
    valid = torch.ones(20)
    from dynmole.routing import sparsity_lower_bound

    lower = sparsity_lower_bound(logits, 2)
    assert losses.sparsity_loss(logits, lower + 0.1, valid, k=2).item() == 0.0
    assert losses.sparsity_loss(logits, lower - 0.1, valid, k=2).item() == pytest.approx(0.1, rel=1e-4)


def _records(n_modules=3, shape=(2, 5), n=6, seed=0):
    torch.manual_seed(seed)
    out = []
    for m in range(n_modules):
        logits = torch.randn(*shape, n) * (1 + m)
        out.append(RoutingRecord(f"m{m}", logits, RouteResult(gates=torch.softmax(logits, -1))))
    return out


def test_balance_pooled_over_modules_is_the_reference_default():
    records = _records()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    valid = mask.float()
    f = torch.stack([losses.masked_mean(r.route.gates, valid) for r in records]).mean(0)
    p = torch.stack([losses.masked_mean(torch.softmax(r.logits, -1), valid) for r in records]).mean(0)
    pooled = 6 * (f * p).sum()
    per_module = torch.stack([losses.load_balance_loss(torch.softmax(r.logits, -1), r.route.gates, valid)
                              for r in records]).mean()
    assert not torch.allclose(pooled, per_module)
    default = losses.aux_losses(records, mask, MoLEConfig(method="dynmole", entropy_coef=0.0))
    torch.testing.assert_close(default["balance"], 1e-3 * pooled, rtol=1e-6, atol=0)
    module = losses.aux_losses(records, mask, MoLEConfig(method="dynmole", entropy_coef=0.0,
                                                          balance_pooling="module"))
    torch.testing.assert_close(module["balance"], 1e-3 * per_module, rtol=1e-6, atol=0)


def test_each_method_gets_its_reference_aux_losses():
    parts = {}
    for method in ("loramoe", "mola", "topp", "dynmole", "ldmole", "remole"):
        config = MoLEConfig(method=method)
        parts[method] = (config.balance_weight, config.balance_rule, config.balance_pooled, config.entropy_weight)
    assert parts["loramoe"][0] == 0 and parts["remole"][0] == 0  # no balance loss (MoE-PEFT loramoe, ReMoE)
    assert parts["mola"][0] == 0 and parts["mola"][1] == "switch"  # MoE-PEFT: router_loss off by default
    assert parts["dynmole"] == (1e-3, "soft", True, 1e-2)
    assert parts["topp"] == (1e-3, "soft", True, 0.0)
    assert parts["ldmole"][:3] == (1.0, "ldmole", False)
    # the parts aux_losses computes follow
    records = _records()
    assert "balance" not in losses.aux_losses(records, None, MoLEConfig(method="loramoe"))
    assert "balance" not in losses.aux_losses(records, None, MoLEConfig(method="mola"))
    # an explicit value still wins
    assert MoLEConfig(method="loramoe", balance_coef=1e-3).balance_weight == 1e-3


def test_mola_switch_balance_is_mixtrals_loss_on_top_k_counts():
    from dynmole import routing

    torch.manual_seed(0)
    logits = [torch.randn(2, 7, 6) for _ in range(3)]
    records = [RoutingRecord(f"m{i}", x, RouteResult(gates=routing.top_k(x, 2))) for i, x in enumerate(logits)]
    out = losses.aux_losses(records, None, MoLEConfig(method="mola", balance_coef=1e-3))
    # Mixtral (HF / MoE-PEFT _mixtral_load_balancing_loss_func): all layers' tokens concatenated
    probs = torch.softmax(torch.cat([x.reshape(-1, 6) for x in logits]), -1)
    selected = probs.topk(2, -1).indices
    tokens_per_expert = torch.nn.functional.one_hot(selected, 6).float().mean(0)  # (top_k, N)
    mixtral = 6 * (tokens_per_expert * probs.mean(0).unsqueeze(0)).sum()
    torch.testing.assert_close(out["balance"], 1e-3 * mixtral, rtol=1e-6, atol=0)


def test_ldmole_balance_is_activation_share_times_mean_gate():
    from dynmole import routing

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)
    gates = routing.sparsegen(logits, torch.full((2, 5, 1), 0.5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    w = mask.float().unsqueeze(-1)
    count = torch.sign(gates * w)
    freq = count.reshape(-1, 4).sum(0) / count.sum()
    prop = (gates * w).reshape(-1, 4).sum(0) / mask.sum()
    expected = 4 * (freq * prop).sum()
    got = losses.load_balance_loss(torch.softmax(logits, -1), gates, mask, mode="ldmole")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    record = RoutingRecord("m", logits, RouteResult(gates=gates, lam=torch.full((2, 5, 1), 0.5)))
    out = losses.aux_losses([record], mask, MoLEConfig(method="ldmole"))
    torch.testing.assert_close(out["balance"], 1.0 * expected, rtol=1e-6, atol=0)


def test_entropy_loss_uses_the_entropy_eps():
    records = _records(1)
    probs = torch.softmax(records[0].logits, -1)
    valid = torch.ones(2, 5)
    for eps in (0.0, 1e-5):
        out = losses.aux_losses(records, None, MoLEConfig(method="dynmole", entropy_eps=eps))
        torch.testing.assert_close(out["entropy"], 1e-2 * losses.entropy_loss(probs, valid, 1.1, eps),
                                   rtol=1e-6, atol=0)

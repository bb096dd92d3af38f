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

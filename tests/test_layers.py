import pytest
import torch
from torch import nn

from dynmole import routing
from dynmole.config import MoLEConfig
from dynmole.gating import build_gate_fn
from dynmole.layers import MoLELinear, RouteResult


def _soft_gate(logits, hidden):
    return RouteResult(gates=routing.soft(logits))


def test_one_expert_equals_peft_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0))
    lora_layer = peft_model.base_model.model[0]
    with torch.no_grad():
        lora_layer.lora_B["default"].weight.normal_()
    mole = MoLELinear(nn.Linear(16, 12), num_experts=1, r=4, alpha=8, dropout=0.0, gate_fn=_soft_gate)
    with torch.no_grad():
        mole.base_layer.load_state_dict(lora_layer.base_layer.state_dict())
        mole.lora_A.copy_(lora_layer.lora_A["default"].weight)
        mole.lora_B.copy_(lora_layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(mole(x), lora_layer(x))


def test_stacked_experts_equal_explicit_sum():
    torch.manual_seed(0)
    n, r = 4, 3
    config = MoLEConfig(method="dynmole", num_experts=n, r=r, alpha=6, keep_top_k=1)
    layer = MoLELinear(nn.Linear(10, 7), n, r, 6, 0.0, build_gate_fn(config, n))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 10)
    logits = x @ layer.router.T
    gates = routing.dynamic(logits, keep_top_k=1)
    expected = layer.base_layer(x)
    for i in range(n):
        a, b = layer.lora_A[i * r : (i + 1) * r], layer.lora_B[:, i * r : (i + 1) * r]
        expected = expected + 2.0 * gates[..., i : i + 1] * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)


def test_zero_init_equals_base():
    layer = MoLELinear(nn.Linear(10, 7), 3, 2, 4, 0.1, _soft_gate)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    torch.manual_seed(0)
    layer = MoLELinear(nn.Linear(10, 7), 3, 2, 4, 0.0, _soft_gate)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.base_layer.to(dtype)
    x = torch.randn(4, 10)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    reference = MoLELinear(nn.Linear(10, 7), 3, 2, 4, 0.0, _soft_gate)
    reference.load_state_dict(layer.state_dict())
    reference.base_layer.float()
    torch.testing.assert_close(out.float(), reference(x), atol=0.1, rtol=0.05)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        MoLELinear(nn.Linear(4, 4), 2, 0, 1.0, 0.0, _soft_gate)


def _identity_features(d: int) -> nn.Linear:
    """A gate_features map that returns the router's input itself."""
    features = nn.Linear(d, d)
    with torch.no_grad():
        features.weight.copy_(torch.eye(d))
        features.bias.zero_()
    return features


def test_router_dropout_switch_feeds_the_dropped_input_to_the_router():
    seen = []

    def recording_gate(logits, features):
        seen.append((logits, features))
        return RouteResult(gates=routing.soft(logits))

    torch.manual_seed(0)
    x = torch.randn(4, 10) + 3.0  # no exact zeros
    for switch in (False, True):
        layer = MoLELinear(nn.Linear(10, 7), 3, 2, 4, 0.5, recording_gate, router_dropout=switch,
                           gate_features=_identity_features(10)).train()
        seen.clear()
        layer(x)
        logits, routed = seen[0]  # the identity features: the router's input
        if switch:  # the experts' dropout mask, applied to the router's and the lambda MLP's input
            kept = routed != 0
            assert (~kept).any() and kept.any()
            torch.testing.assert_close(routed[kept], 2 * x[kept])  # inverted dropout at p = 0.5
        else:
            torch.testing.assert_close(routed, x)
        torch.testing.assert_close(logits, routed @ layer.router.T)
        layer.eval()
        seen.clear()
        layer(x)
        torch.testing.assert_close(seen[0][1], x)  # no dropout at inference either way
    assert MoLEConfig(method="ldmole").router_sees_dropout
    assert not MoLEConfig(method="dynmole").router_sees_dropout
    assert not MoLEConfig(method="ldmole", router_dropout=False).router_sees_dropout


def test_router_init_kaiming_or_normal():
    torch.manual_seed(0)
    d_in = 64
    kaiming = MoLELinear(nn.Linear(d_in, 8), 6, 2, 4, 0.0, _soft_gate, router_init_std=None)
    bound = 1 / d_in**0.5  # nn.Linear's default: kaiming_uniform(a=sqrt(5))
    assert kaiming.router.abs().max() <= bound and kaiming.router.std() > 0.8 * bound / 3**0.5
    normal = MoLELinear(nn.Linear(d_in, 8), 6, 2, 4, 0.0, _soft_gate, router_init_std=0.02)
    assert 0.015 < normal.router.std() < 0.025

"""The MoLE layer's input side: router, gate features (LD-MoLE's lambda-MLP first layer) and the
experts' ``A`` in one stacked matmul where they read the same input, and a backward that keeps
only the input and a one-byte dropout mask. Checked against a plain autograd computation of
DynMoLE eqs. 3-4 written here, and against finite differences."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dynmole.config import MoLEConfig
from dynmole.gating import build_gate_fn
from dynmole.layers import MoLELinear, _AdapterInput, dropout_mask, reuse_stacked_weights
from dynmole.routing import LambdaMLP

D_IN, D_OUT, N, R, P = 12, 9, 4, 3, 0.25
# Tokens below and above the stacked rows (router 4 + lambda MLP 5 + A 12): one matmul per block, or stacked.
FEW, MANY = (2, 5), (4, 8)


def _layer(method: str, router_dropout: bool, dtype: torch.dtype, seed: int = 0) -> MoLELinear:
    torch.manual_seed(seed)
    config = MoLEConfig(method=method, num_experts=N, r=R, alpha=2 * R, keep_top_k=2, lambda_hidden=5)
    lambda_mlp = LambdaMLP(D_IN, config.lambda_hidden) if method == "ldmole" else None
    layer = MoLELinear(
        nn.Linear(D_IN, D_OUT), N, R, config.alpha, P, build_gate_fn(config, N, lambda_mlp),
        router_init_std=0.5, router_dropout=router_dropout,
        gate_features=lambda_mlp.fc1 if lambda_mlp is not None else None,
    )
    if lambda_mlp is not None:
        layer.lambda_mlp = lambda_mlp
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer.to(dtype)


def _reference(layer: MoLELinear, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """DynMoLE eqs. 3-4 by hand: ``W0 x + scaling * sum_i g_i B_i A_i dropout(x)``, the router (and
    the lambda MLP) on ``dropout(x)`` or ``x``, separate matmuls, autograd for the gradients."""
    dropped = x if mask is None else x * mask / (1 - layer.dropout)
    routed = dropped if layer.router_dropout else x
    logits = routed @ layer.router.T
    fc1 = layer.gate_features
    features = None if fc1 is None else routed @ fc1.weight.T + fc1.bias
    gates = layer.gate_fn(logits, features).gates * layer.scaling
    hidden = dropped @ layer.lora_A.T
    gated = (hidden.unflatten(-1, (N, R)) * gates.unsqueeze(-1)).flatten(-2)
    return layer.base_layer(x) + gated @ layer.lora_B.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tokens", [FEW, MANY])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "method, router_dropout", [("dynmole", False), ("dynmole", True), ("ldmole", True), ("ldmole", False)]
)
def test_outputs_and_gradients_equal_the_plain_computation(method, router_dropout, train, tokens, dtype):
    layer = _layer(method, router_dropout, dtype).train(train)
    reference = _layer(method, router_dropout, dtype).train(train)  # same seed: the same weights
    x = torch.randn(*tokens, D_IN, dtype=dtype) + 0.5
    grad_out = torch.randn(*tokens, D_OUT, dtype=dtype)
    x_layer, x_reference = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(7)
    out = layer(x_layer)
    torch.manual_seed(7)  # the layer draws its dropout mask first: the same mask
    mask = dropout_mask(x, P) if train else None
    expected = _reference(reference, x_reference, mask)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(out, expected, **tolerance)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(x_layer.grad, x_reference.grad, **tolerance)
    params = dict(layer.named_parameters())
    for name, param in reference.named_parameters():
        if param.requires_grad:
            assert params[name].grad is not None, name
            torch.testing.assert_close(params[name].grad, param.grad, **tolerance, msg=name)
    assert layer.gate_features is None or layer.gate_features.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tokens", [(1, 1), (4, 5)])  # one matmul per block; stacked (13 rows)
@pytest.mark.parametrize("router_dropout", [False, True])
@pytest.mark.parametrize("mask_on", [False, True])
@pytest.mark.parametrize("features", [False, True])
def test_backward_matches_finite_differences(features, mask_on, router_dropout, tokens):
    torch.manual_seed(0)
    dtype = torch.float64
    x = torch.randn(*tokens, 5, dtype=dtype, requires_grad=True)
    mask = dropout_mask(x, 0.3) if mask_on else None
    weights = [torch.randn(3, 5, dtype=dtype, requires_grad=True), torch.randn(4, 5, dtype=dtype, requires_grad=True)]
    if features:
        weights += [torch.randn(6, 5, dtype=dtype, requires_grad=True),
                    torch.randn(6, dtype=dtype, requires_grad=True)]
    else:
        weights += [None, None]

    def project(x, router, lora_A, feature_weight, feature_bias):
        return _AdapterInput.apply(x, mask, 1 / 0.7, router_dropout, dtype, router, lora_A, feature_weight,
                                   feature_bias)

    assert torch.autograd.gradcheck(project, (x, *weights))


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "method, router_dropout, train, tokens, forward, backward",
    [
        # forward: base, input side, B (+ the lambda MLP's fc2); backward: base's input gradient,
        # B's two, the input side's weight and input gradients per matmul (+ fc2's two)
        ("dynmole", False, False, MANY, 3, 5),  # no dropout: router and A stacked
        ("dynmole", True, True, MANY, 3, 5),  # the router reads dropout(x), as A does: stacked
        ("dynmole", False, True, MANY, 4, 7),  # router on x, A on dropout(x): one matmul each
        ("ldmole", True, True, MANY, 4, 7),  # [W_g; W_f; A] in one matmul
        ("ldmole", False, False, MANY, 4, 7),
        ("ldmole", False, True, MANY, 5, 9),  # [W_g; W_f] on x, A on dropout(x)
        ("dynmole", False, False, FEW, 4, 7),  # fewer tokens than stacked rows: one matmul per block
        ("ldmole", True, True, FEW, 6, 11),
    ],
)
def test_one_matmul_where_the_router_and_the_experts_read_the_same_input(method, router_dropout, train, tokens,
                                                                         forward, backward):
    layer = _layer(method, router_dropout, torch.float32).train(train)
    x = torch.randn(*tokens, D_IN, requires_grad=True)
    with _CountMatmuls() as counter:
        out = layer(x)
    assert counter.count == forward
    with _CountMatmuls() as counter:
        out.sum().backward()
    assert counter.count == backward


def test_backward_keeps_the_input_and_a_one_byte_mask_not_the_dropped_input():
    layer = _layer("dynmole", False, torch.float32).train()
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    input_sized = [t for t in saved if t.shape == x.shape]
    assert any(t.dtype == torch.bool for t in input_sized)  # the dropout mask
    for tensor in input_sized:  # nothing else of the input's size but the input itself
        assert tensor.dtype == torch.bool or tensor.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    out.sum().backward()
    assert x.grad is not None and layer.router.grad is not None and layer.lora_A.grad is not None


def test_router_stays_fp32_under_autocast_and_the_experts_take_its_dtype():
    layer = _layer("ldmole", True, torch.float32).eval()
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, features, hidden = layer.adapter_input(x)
        out = layer(x)
    assert logits.dtype == features.dtype == torch.float32 and hidden.dtype == torch.bfloat16
    torch.testing.assert_close(logits, F.linear(x, layer.router), rtol=0, atol=0)
    torch.testing.assert_close(features, F.linear(x, layer.gate_features.weight, layer.gate_features.bias))
    torch.testing.assert_close(hidden, F.linear(x.bfloat16(), layer.lora_A.bfloat16()), rtol=0, atol=0)
    out.float().sum().backward()
    assert layer.router.grad.dtype == layer.lora_A.grad.dtype == torch.float32
    expected = _reference(layer, x.detach(), None)  # fp32 throughout
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_reused_stacked_weights_give_the_same_outputs_and_are_dropped_after():
    layer = _layer("ldmole", True, torch.float32).eval()
    x = torch.randn(1, 1, D_IN)
    with torch.no_grad():
        expected = layer(x)  # one token: one matmul per block
        with reuse_stacked_weights([layer]), _CountMatmuls() as counter:
            torch.testing.assert_close(layer(x), expected)
            torch.testing.assert_close(layer(x), expected)  # from the memo
            assert set(layer.stacked_memo) == {torch.float32}
        assert counter.count == 2 * 4  # base, [W_g; W_f; A], fc2, B per call
        assert layer.stacked_memo is None

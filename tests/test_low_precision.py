"""Every method with the whole model cast to bf16 / fp16 (as DeepSpeed's bf16 and ``.half()`` do) and
under bf16 autocast: it runs forward and backward, and the routing (router logits, gates, LD-MoLE's
lambda) stays in fp32, as in the fp32 model."""

import pytest
import torch

import dynmole
from dynmole import MoLEConfig, get_mole_model
from dynmole.routing import LambdaMLP

METHODS = list(dynmole.METHODS)


def _model(tiny_llama, method):
    model = get_mole_model(tiny_llama(), MoLEConfig(method=method, r=4, alpha=8, dropout=0.0, lambda_hidden=8))
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in model.mole_layers():
            layer.lora_B.normal_(std=0.1)
            layer.router.normal_(std=0.2)
    return model


def _ids():
    torch.manual_seed(7)
    return torch.randint(0, 96, (2, 9))


def _routes(model, ids, **autocast):
    """Each module's ``RouteResult`` of one forward (recorded as the statistics see them)."""
    model.recorder.active = True
    context = torch.autocast("cpu", **autocast) if autocast else torch.no_grad()
    with context, torch.no_grad():
        model.base_model.model(input_ids=ids)
    model.recorder.active = False
    return {record.module: (record.logits, record.route) for record in model.recorder.take()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_model_cast_to_half_precision_trains(tiny_llama, method, dtype):
    ids = _ids()
    model = _model(tiny_llama, method).to(dtype).train()
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    for logits, route in _routes(model.eval(), ids).values():
        assert logits.dtype == torch.float32 and route.gates.dtype == torch.float32
        if route.lam is not None:
            assert route.lam.dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_routes_in_fp32_like_the_fp32_model(tiny_llama, method):
    """Under bf16 autocast the router reads the (bf16-computed) hidden state, so its logits differ from
    the fp32 model's only as far as that input does; the gate maths itself stays fp32: the recorded gates
    are exactly what the rule gives on the recorded logits outside autocast. For LD-MoLE the lambda MLP's
    second layer too: its lambda is fp32 and equals the fp32 head's on the same features."""
    ids = _ids()
    model = _model(tiny_llama, method).eval()
    reference = _routes(model, ids)
    autocast = _routes(model, ids, dtype=torch.bfloat16)
    layers = {layer.name: layer for layer in model.mole_layers()}
    assert autocast.keys() == reference.keys() == layers.keys()
    for name, (logits, route) in autocast.items():
        assert logits.dtype == torch.float32 and route.gates.dtype == torch.float32, name
        torch.testing.assert_close(logits, reference[name][0], atol=0.1, rtol=0.05)
        if method == "ldmole":
            assert route.lam.dtype == torch.float32
            expected = dynmole.routing.sparsegen(logits, route.lam)
        else:
            expected = layers[name].gate_fn(logits, None).gates
        torch.testing.assert_close(route.gates, expected, rtol=0, atol=0)
    if method == "ldmole":
        mlp = next(iter(model.lambda_mlps.values()))
        features = torch.randn(4, 7, mlp.fc1.out_features)
        expected = mlp.head(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = mlp.head(features)
        assert under_autocast.dtype == torch.float32
        torch.testing.assert_close(under_autocast, expected, rtol=0, atol=0)


def test_lambda_mlp_computes_in_fp32_with_half_precision_weights():
    torch.manual_seed(0)
    mlp = LambdaMLP(16, hidden=8, bias_init=-2.5)
    hidden = torch.randn(3, 16)
    expected = mlp(hidden)
    for dtype in (torch.bfloat16, torch.float16):
        half = LambdaMLP(16, hidden=8)
        half.load_state_dict(mlp.state_dict())
        half.to(dtype)
        lam = half(hidden.to(dtype))
        assert lam.dtype == torch.float32
        # the weights themselves were rounded to dtype: close to the fp32 MLP, not equal
        torch.testing.assert_close(lam, expected, rtol=0, atol=0.05)

"""Layer section of ``dynmole bench``: one adapted linear layer, forward+backward (train mode,
dropout on, input requiring grad as in a middle layer) and forward-only (eval mode, no grad): the
frozen base ``nn.Linear``; PEFT LoRA of rank ``N*r``; :class:`~dynmole.layers.MoLELinear` under
every routing rule; the dynmole layer under ``torch.compile(fullgraph=True)``; and two peers
written by us (:mod:`dynmole.bench.peers`)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import MoLEConfig
from ..gating import build_gate_fn
from ..layers import MoLELinear
from ..routing import LambdaMLP
from .report import Row, timing_row
from .timing import REFERENCE, interleaved, paired_ratio

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LayerPoint:
    d: int
    T: int
    N: int
    r: int

    def label(self) -> str:
        return f"d={self.d} T={self.T} N={self.N} r={self.r}"


def mole_config(method: str, num_experts: int, r: int, dropout: float) -> MoLEConfig:
    """The benchmark's MoLE config: alpha = 2r (scaling 2, as PEFT LoRA with alpha = 2 * N*r)."""
    keep = min(2, num_experts)
    return MoLEConfig(
        method=method, num_experts=num_experts, r=r, alpha=2.0 * r, dropout=dropout,
        keep_top_k=keep, top_k=keep, lambda_hidden=256,
    )


def build_mole_layer(base: nn.Linear, method: str, num_experts: int, r: int, dropout: float) -> MoLELinear:
    """A :class:`MoLELinear` around ``base`` as ``get_mole_model`` builds it for ``method`` (the
    method's router-dropout default; LD-MoLE with a lambda MLP of its own), B random."""
    config = mole_config(method, num_experts, r, dropout)
    lambda_mlp = None
    if method == "ldmole":
        lambda_mlp = LambdaMLP(base.in_features, config.lambda_hidden).to(base.weight.device)
    layer = MoLELinear(
        base, num_experts, r, config.alpha, dropout, build_gate_fn(config, num_experts, lambda_mlp),
        name=method, router_init_std=config.router_init_std, router_dropout=config.router_sees_dropout,
        gate_features=lambda_mlp.fc1 if lambda_mlp is not None else None,
    )
    if lambda_mlp is not None:
        layer.lambda_mlp = lambda_mlp
    with torch.no_grad():
        layer.lora_B.normal_(std=0.02)  # non-zero outputs (zero-init B would not change the cost)
    return layer


def build_peft_layer(base: nn.Linear, rank: int, dropout: float) -> nn.Module:
    """PEFT LoRA of rank ``rank`` around ``base``, built with ``peft.get_peft_model``."""
    from peft import LoraConfig, get_peft_model

    wrapper = nn.Sequential(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["0"], bias="none")
    peft_model = get_peft_model(wrapper, config)
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.02)
    return layer


def compile_layer(layer: nn.Module, **kwargs: Any) -> nn.Module:
    """``torch.compile(layer, fullgraph=True)``: fails loudly on any graph break."""
    return torch.compile(layer, fullgraph=True, **kwargs)


def check_compile(methods: Sequence[str], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``torch._dynamo.explain`` on a tiny MoLELinear per routing rule (training mode, input
    requiring grad): number of graphs and graph breaks. One graph, no break, means the layer
    has no host sync (a ``.item()``, ``nonzero`` or data-dependent branch would break it)."""
    torch._dynamo.reset()
    out: dict[str, Any] = {}
    for method in methods:
        base = nn.Linear(64, 48, bias=False, device=device, dtype=dtype).requires_grad_(False)
        layer = build_mole_layer(base, method, 6, 4, 0.05).train()
        x = torch.randn(2, 8, 64, device=device, dtype=dtype, requires_grad=True)
        try:
            explanation = torch._dynamo.explain(layer)(x)
            out[method] = {
                "graphs": explanation.graph_count,
                "graph_breaks": explanation.graph_break_count,
                "break_reasons": [str(reason.reason) for reason in explanation.break_reasons],
            }
        except Exception as err:  # noqa: BLE001 - report, do not stop the benchmark
            out[method] = {"error": f"{type(err).__name__}: {err}"}
    torch._dynamo.reset()
    return out


def layer_variants(
    point: LayerPoint,
    *,
    dtype: torch.dtype,
    device: torch.device,
    methods: Sequence[str],
    dropout: float,
    peers: bool,
    compiled: bool,
) -> dict[str, tuple[str, nn.Module]]:
    """Every layer variant at ``point``, all sharing one frozen base ``nn.Linear``."""
    torch.manual_seed(0)
    base = nn.Linear(point.d, point.d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    variants: dict[str, tuple[str, nn.Module]] = {
        "base_linear": ("base", base),
        REFERENCE: ("peft", build_peft_layer(base, point.N * point.r, dropout)),
    }
    moles = {}
    for method in methods:
        moles[method] = build_mole_layer(base, method, point.N, point.r, dropout)
        variants[f"mole_{method}"] = ("ours", moles[method])
    if compiled and "dynmole" in moles:
        variants["mole_dynmole_compiled"] = ("ours", compile_layer(moles["dynmole"]))
    if peers:
        from .peers import GatherTopKMoLE, PerExpertLoopMoLE

        cfg = mole_config("dynmole", point.N, point.r, dropout)
        loop = PerExpertLoopMoLE(base, point.N, point.r, cfg.alpha, dropout, build_gate_fn(cfg, point.N))
        if "dynmole" in moles:
            loop.load_from(moles["dynmole"])
        variants["peer_loop_dynmole"] = ("peer (ours)", loop)
        cfg = mole_config("mola", point.N, point.r, dropout)
        gather = GatherTopKMoLE(base, point.N, point.r, cfg.alpha, dropout, build_gate_fn(cfg, point.N))
        if "mola" in moles:
            gather.load_from(moles["mola"])
        variants["peer_gather_mola_top2"] = ("peer (ours)", gather)
    return variants


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def layer_step_fns(
    variants: dict[str, tuple[str, nn.Module]], point: LayerPoint, *, dtype: torch.dtype, device: torch.device,
    mode: str,
) -> dict[str, Callable[[], Any]]:
    """One call per variant: ``fwd+bwd`` (train mode, grads of the input and adapters) or
    ``fwd`` (eval mode, no grad)."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, point.T, point.d, generator=generator).to(device=device, dtype=dtype)
    grad_out = torch.randn(1, point.T, point.d, generator=generator).to(device=device, dtype=dtype)
    fns: dict[str, Callable[[], Any]] = {}
    for name, (_, module) in variants.items():
        if mode == "fwd+bwd":
            module.train()
            x_leaf = x.clone().requires_grad_(True)
            params = _trainable(module)

            def step(module=module, x_leaf=x_leaf, params=params) -> None:
                for p in params:
                    p.grad = None
                x_leaf.grad = None
                module(x_leaf).backward(grad_out)

        else:
            module.eval()

            def step(module=module) -> None:
                with torch.no_grad():
                    module(x)

        fns[name] = step
    return fns


def flops_floor(point: LayerPoint, mode: str, lambda_hidden: int = 0) -> dict[str, float]:
    """Arithmetic floor: matmul FLOPs of the base layer and the extra of MoLE (experts + router,
    and LD-MoLE's lambda MLP ``d -> lambda_hidden -> 1`` when ``lambda_hidden`` > 0).

    Forward: base ``2 T d_in d_out``; experts ``2 T (d_in N r + N r d_out)``; router
    ``2 T d_in N``; lambda MLP ``2 T (d_in h + h)``. Forward+backward with the base frozen and the
    input requiring grad: the base adds its input gradient (x1 more), the experts, router and
    lambda MLP their input and weight gradients (x2 more).
    """
    T, d, N, r = point.T, point.d, point.N, point.r
    base = 2.0 * T * d * d
    experts = 2.0 * T * (d * N * r + N * r * d)
    router = 2.0 * T * d * N + 2.0 * T * (d * lambda_hidden + lambda_hidden)
    if mode == "fwd+bwd":
        base, experts, router = 2 * base, 3 * experts, 3 * router
    lora = experts  # PEFT LoRA of rank N*r: the same matmuls, no router
    return {
        "base_flops": base,
        "mole_extra_flops": experts + router,
        "floor_mole_over_base": (base + experts + router) / base,
        "floor_mole_over_lora": (base + experts + router) / (base + lora),
    }


def run_layer_bench(
    points: Sequence[LayerPoint],
    *,
    dtype_name: str,
    device: torch.device,
    methods: Sequence[str],
    dropout: float,
    warmup: int,
    reps: int,
    peers: bool,
    compiled_points: Sequence[LayerPoint],
    modes: Sequence[str] = ("fwd+bwd", "fwd"),
    log: Callable[[str], None] = print,
) -> list[Row]:
    dtype = DTYPES[dtype_name]
    rows: list[Row] = []
    for point in points:
        compiled = point in compiled_points
        variants = layer_variants(
            point, dtype=dtype, device=device, methods=methods, dropout=dropout, peers=peers, compiled=compiled
        )
        for mode in modes:
            scenario = f"{point.label()} {dtype_name} {mode}"
            log(f"[layer] {scenario}: {len(variants)} variants x {reps} reps")
            started = time.perf_counter()
            fns = layer_step_fns(variants, point, dtype=dtype, device=device, mode=mode)
            # Warm-up compiles the compiled variant (once per mode); one extra round for it.
            timings = interleaved(fns, warmup=warmup + (1 if compiled else 0), reps=reps, device=device)
            for name, timing in timings.items():
                kind = variants[name][0]
                extra: dict[str, Any] = {"d": point.d, "T": point.T, "N": point.N, "r": point.r, "mode": mode}
                if name != "base_linear":
                    extra["x_base"] = paired_ratio(timing, timings["base_linear"])[0]
                if name.startswith("mole_dynmole"):
                    extra.update(flops_floor(point, mode))
                elif name == "mole_ldmole":
                    extra.update(flops_floor(point, mode, variants[name][1].lambda_mlp.fc1.out_features))
                rows.append(timing_row("layer", scenario, name, kind, timing, **extra))
            log(f"        done in {time.perf_counter() - started:.0f}s")
        del variants
        gc.collect()
        torch._dynamo.reset()
    return rows

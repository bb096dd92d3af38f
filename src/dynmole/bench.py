"""``dynmole bench``: speed and memory of MoLE layers and models against PEFT LoRA of equal total rank.

Run as ``python -m dynmole.bench [--quick | --full] [--json PATH] [--dtype fp32|bf16] [--device cpu|cuda]``.

Everything is measured in one process, interleaved: every repetition runs each variant of a
scenario once, in an order rotated by one each repetition, so slow drift (other processes,
thermal state) hits all variants alike. After warm-up, each row reports the median time and
its ratio to the PEFT LoRA row of the same scenario, taken as the median over repetitions
of the per-repetition ratio (paired, so drift cancels), with its quartiles.

Sections:

* ``layer``: one adapted linear layer, forward+backward (train mode, dropout on, input
  requiring grad as in a middle layer) and forward-only (eval mode, no grad): the frozen base
  ``nn.Linear``; PEFT LoRA of rank ``N*r``; :class:`~dynmole.layers.MoLELinear` under every
  routing rule; the dynmole layer under ``torch.compile(fullgraph=True)``; and two peers
  written by us (see :mod:`dynmole.bench_peers`): the per-expert loop of the DynMoLE
  reference code / MoE-PEFT and a MoLA/MixLoRA gather + ``index_add_`` top-k dispatch.
* ``model``: a causal LM (SmolLM2-135M by default, a tiny random Llama with ``--quick``)
  with PEFT LoRA vs DynMoLE on gate/up/down_proj: training-step time and tokens/s, peak
  training memory, generation tokens/s with KV cache, and routing statistics on vs off
  (see :mod:`dynmole.bench_model`).
* ``train`` (not in the default ``--sections``): the training options on the packaged data,
  train tokens/s of the full-logits path (reference), answer-logits-only, bf16 autocast and
  length-grouped batches, and evaluation examples/s with and without the shared context
  (see :mod:`dynmole.bench_train`).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .config import METHODS, MoLEConfig
from .gating import build_gate_fn
from .layers import MoLELinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REFERENCE = "peft_lora"
TARGET_POINT = (4096, 512, 6, 16)  # d, T, N, r

# Sizes of the full grid.
FULL_D = (576, 2048, 4096)
FULL_T = (1, 512, 4096)
FULL_N = (6, 8)
FULL_R = (8, 16, 24)


# --------------------------------------------------------------------------- results
@dataclass
class Row:
    """One line of the table."""

    section: str  # layer | model | memory | stats
    scenario: str  # what was run, e.g. "d=4096 T=512 N=6 r=16 fp32 fwd+bwd"
    variant: str
    kind: str  # ours | peft | base | peer (ours)
    ms: float | None = None  # median wall time per call
    ratio: float | None = None  # to PEFT LoRA of equal total rank, same scenario
    ratio_q1: float | None = None
    ratio_q3: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timing:
    times: list[float]
    median: float
    ratio: float | None = None
    ratio_q1: float | None = None
    ratio_q3: float | None = None
    ratio_min: float | None = None  # min(t) / min(t_reference)


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int,
    reps: int,
    device: torch.device,
    reference: str | None = REFERENCE,
) -> dict[str, Timing]:
    """Time every function ``reps`` times, round-robin, rotating the order each repetition.

    ``warmup`` rounds run first, untimed (compilation, allocator and cache warm-up). Returns
    each function's times and median; when ``reference`` is one of them, also the median and
    quartiles of the per-repetition ratio ``t / t_reference``.
    """
    names = list(fns)
    sync = _sync(device)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                start = time.perf_counter()
                fns[name]()
                sync()
                times[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    out = {name: Timing(times=t, median=statistics.median(t)) for name, t in times.items()}
    if reference in times:
        ref = out[reference]
        for timing in out.values():
            timing.ratio, timing.ratio_q1, timing.ratio_q3 = paired_ratio(timing, ref)
            timing.ratio_min = min(timing.times) / min(ref.times)
    return out


def paired_ratio(a: Timing, b: Timing) -> tuple[float, float, float]:
    """Median, first and third quartile of the per-repetition ratio ``a / b``."""
    q1, q2, q3 = _quartiles([x / y for x, y in zip(a.times, b.times)])
    return q2, q1, q3


def timing_row(section: str, scenario: str, variant: str, kind: str, timing: Timing, **extra: Any) -> Row:
    return Row(
        section=section, scenario=scenario, variant=variant, kind=kind, ms=timing.median * 1e3,
        ratio=timing.ratio, ratio_q1=timing.ratio_q1, ratio_q3=timing.ratio_q3,
        extra={
            "min_ms": min(timing.times) * 1e3, "ratio_min": timing.ratio_min,
            "times_ms": [round(t * 1e3, 3) for t in timing.times], **extra,
        },
    )


# --------------------------------------------------------------------------- layer level
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
    from .routing import LambdaMLP

    config = mole_config(method, num_experts, r, dropout)
    lambda_mlp = None
    if method == "ldmole":
        lambda_mlp = LambdaMLP(base.in_features, config.lambda_hidden).to(base.weight.device)
    layer = MoLELinear(
        base, num_experts, r, config.alpha, dropout, build_gate_fn(config, num_experts, lambda_mlp),
        name=method, router_init_std=config.router_init_std,
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
        from .bench_peers import GatherTopKMoLE, PerExpertLoopMoLE

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


def flops_floor(point: LayerPoint, mode: str) -> dict[str, float]:
    """Arithmetic floor: matmul FLOPs of the base layer and the extra of MoLE (experts + router).

    Forward: base ``2 T d_in d_out``; experts ``2 T (d_in N r + N r d_out)``; router
    ``2 T d_in N``. Forward+backward with the base frozen and the input requiring grad: the
    base adds its input gradient (x1 more), the experts and router their input and weight
    gradients (x2 more).
    """
    T, d, N, r = point.T, point.d, point.N, point.r
    base = 2.0 * T * d * d
    experts = 2.0 * T * (d * N * r + N * r * d)
    router = 2.0 * T * d * N
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
            floor = flops_floor(point, mode)
            for name, timing in timings.items():
                kind = variants[name][0]
                extra: dict[str, Any] = {"d": point.d, "T": point.T, "N": point.N, "r": point.r, "mode": mode}
                if name != "base_linear":
                    extra["x_base"] = paired_ratio(timing, timings["base_linear"])[0]
                if name.startswith("mole_dynmole"):
                    extra.update(floor)
                rows.append(timing_row("layer", scenario, name, kind, timing, **extra))
            log(f"        done in {time.perf_counter() - started:.0f}s")
        del variants
        gc.collect()
        torch._dynamo.reset()
    return rows


# --------------------------------------------------------------------------- presets
@dataclass
class Preset:
    points: list[LayerPoint]
    compiled_points: list[LayerPoint]
    warmup: int
    reps: int
    model: str  # "tiny", "tiny-1", "smollm2-135m"
    model_experts: int
    model_r: int
    model_batch: int
    model_seq: int
    model_reps: int
    gen_tokens: int
    gen_prompt: int


def preset(name: str) -> Preset:
    target = LayerPoint(*TARGET_POINT)
    if name == "tiny":  # for the tests: a few seconds
        point = LayerPoint(32, 8, 3, 2)
        return Preset([point], [], 1, 2, "tiny-1", 3, 2, 2, 8, 2, 3, 4)
    if name == "quick":  # tiny sizes, < 2 minutes
        points = [LayerPoint(256, 64, 6, 8), LayerPoint(576, 128, 6, 16)]
        return Preset(points, [points[0]], 1, 5, "tiny", 6, 16, 2, 32, 5, 8, 8)
    if name == "full":
        points = [LayerPoint(d, t, n, r) for d in FULL_D for t in FULL_T for n in FULL_N for r in FULL_R]
        points.sort(key=lambda p: (p != target, p.d * p.T))
        return Preset(points, [target, LayerPoint(576, 512, 6, 16)], 2, 15, "smollm2-135m", 6, 16, 4, 128, 7, 32, 16)
    # default: the target point first, then SmolLM2's width, a decode step and a wide/short pair
    points = [
        target,
        LayerPoint(576, 512, 6, 16),
        LayerPoint(2048, 512, 8, 8),
        LayerPoint(576, 4096, 8, 24),
        LayerPoint(4096, 1, 6, 16),
    ]
    return Preset(points, [target, LayerPoint(576, 512, 6, 16)], 2, 11, "smollm2-135m", 6, 16, 4, 128, 7, 32, 16)


# --------------------------------------------------------------------------- output
def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: one block per scenario, every row with its ratio to PEFT LoRA."""
    lines = []
    scenario = None
    for row in rows:
        if (row.section, row.scenario) != scenario:
            scenario = (row.section, row.scenario)
            reference = "x first" if row.section in ("train", "eval") else "x LoRA"  # train: ratios to its row (a)
            header = f"{'variant':<28} {'kind':<12} {'median':>11} {reference:>7} {'[q1, q3]':>15} {'min':>7}  notes"
            lines += ["", f"== {row.section}: {row.scenario}", header]
        unit = row.extra.get("unit", "ms")
        value = row.extra.get("value", row.ms)
        median = f"{_fmt(value, 1 if unit != 'ms' or (value or 0) >= 10 else 3)} {unit}"
        spread = f"[{_fmt(row.ratio_q1, 3)}, {_fmt(row.ratio_q3, 3)}]" if row.ratio_q1 is not None else ""
        notes = []
        extra = row.extra
        if "tokens_per_s" in extra:
            notes.append(f"tok/s={extra['tokens_per_s']:.1f}")
        if "examples_per_s" in extra:
            notes.append(f"examples/s={extra['examples_per_s']:.2f}")
        if "head_positions_share" in extra:
            notes.append(f"padding={100 * extra['padding_share']:.0f}% LM-head positions={100 * extra['head_positions_share']:.0f}%")
        for key, label in (("max_abs_loss_delta", "loss"), ("max_abs_loglik_delta", "loglik")):
            if key in extra:
                notes.append(f"max|d {label}| vs first={extra[key]:.2e}")
        if "x_base" in extra:
            notes.append(f"x base={extra['x_base']:.3f}")
        if "floor_mole_over_base" in extra:
            notes.append(f"(FLOP floor x base={extra['floor_mole_over_base']:.3f}, x LoRA={extra['floor_mole_over_lora']:.3f})")
        if "overhead_vs_stats_off" in extra:
            notes.append(f"stats on/off={extra['overhead_vs_stats_off']:.3f}")
        if "stats_update_share" in extra:
            notes.append(f"stats update alone={extra['stats_update_ms']:.1f} ms = {100 * extra['stats_update_share']:.2f}%")
        ratio_min = _fmt(extra.get("ratio_min"), 3)
        lines.append(
            f"{row.variant:<28} {row.kind:<12} {median:>11} {_fmt(row.ratio, 3):>7} {spread:>15} {ratio_min:>7}  "
            + " ".join(notes)
        )
    return "\n".join(lines).lstrip("\n")


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import peft
        import transformers

        info["peft"], info["transformers"] = peft.__version__, transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def check_rows(rows: Sequence[Row]) -> list[str]:
    """Problems with the rows (empty when well-formed): every number positive and finite."""
    problems = []
    for row in rows:
        for key in ("ms", "ratio", "ratio_q1", "ratio_q3"):
            value = getattr(row, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{row.scenario} {row.variant}: {key}={value}")
    return problems


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynmole bench",
        description="Speed and memory of dynmole's MoLE layers and models against PEFT LoRA of equal total rank "
        "(N*r), measured interleaved in one process.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes and a tiny random model (< 2 minutes)")
    size.add_argument("--full", action="store_true", help="the whole grid d x T x N x r (hours on a CPU)")
    size.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: a few seconds
    parser.add_argument("--json", metavar="PATH", help="write the rows and machine info as JSON")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="base layer / model dtype")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sections", default="layer,model", help="comma-separated: layer, model, train")
    parser.add_argument("--methods", default=",".join(METHODS), help="routing rules of the MoLE layer rows")
    parser.add_argument("--model", help="model of the model section: a registry name, a folder, or 'tiny'")
    parser.add_argument("--reps", type=int, help="timed repetitions (default: per preset)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up rounds (default: per preset)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant and check")
    parser.add_argument("--no-peers", action="store_true", help="skip the per-expert-loop and gather peers")
    parser.add_argument("--dropout", type=float, default=0.05, help="adapter dropout (train-mode rows)")
    parser.add_argument(
        "--points", help="layer sizes instead of the preset's, comma-separated DxTxNxR, e.g. 4096x512x6x16"
    )
    parser.add_argument(
        "--threads", type=int,
        help="torch.set_num_threads for the run (default: torch's own; 1 with the internal test preset)",
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: one memory measurement
    return parser


def parse_points(text: str) -> list[LayerPoint]:
    points = []
    for item in text.split(","):
        try:
            d, t, n, r = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"a point looks like DxTxNxR, e.g. 4096x512x6x16; got {item!r}") from None
        if min(d, t, n, r) < 1:
            raise ValueError(f"every size must be >= 1, got {item!r}")
        points.append(LayerPoint(d, t, n, r))
    return points


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_worker:
        from .bench_model import memory_worker

        return memory_worker(args.memory_worker)
    threads = torch.get_num_threads()
    if args.threads or args.tiny:
        # Tiny sizes gain nothing from intra-op threads, and on a busy machine the threads' barriers
        # cost milliseconds per op.
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    name = "tiny" if args.tiny else "quick" if args.quick else "full" if args.full else "default"
    setup = preset(name)
    if args.points:
        try:
            setup.points = parse_points(args.points)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        setup.compiled_points = [p for p in setup.points if p in setup.compiled_points] or setup.points[:1]
    warmup = setup.warmup if args.warmup is None else args.warmup
    reps = setup.reps if args.reps is None else args.reps
    if reps < 1 or warmup < 0:
        print("error: --reps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python -m dynmole.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": name,
        "dtype": args.dtype,
        "machine": machine_info(device),
        "load_average_start": _load(),
        "timing": "interleaved round-robin (order rotated each repetition); median of reps; ratio = median of "
        "per-repetition ratios to the PEFT LoRA row of the same scenario (q1, q3 = its quartiles)",
        "warmup": warmup,
        "reps": reps,
    }
    rows: list[Row] = []

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:6.1f}s {message}", file=sys.stderr, flush=True)

    if not args.no_compile and "dynmole" in methods:
        log("[compile] torch._dynamo.explain on a tiny MoLELinear per routing rule")
        report["compile_check"] = check_compile(methods, device, DTYPES[args.dtype])
    if "layer" in sections:
        rows += run_layer_bench(
            setup.points, dtype_name=args.dtype, device=device, methods=methods, dropout=args.dropout,
            warmup=warmup, reps=reps, peers=not args.no_peers,
            compiled_points=[] if args.no_compile else setup.compiled_points, log=log,
        )
    if "model" in sections:
        from .bench_model import run_model_bench

        model_rows, model_info = run_model_bench(
            setup, model_name=args.model or setup.model, dtype_name=args.dtype, device=device,
            dropout=args.dropout, warmup=warmup, reps=args.reps or setup.model_reps, log=log,
        )
        rows += model_rows
        report["model"] = model_info
    if "train" in sections:
        from .bench_train import run_train_bench

        train_rows, train_info = run_train_bench(
            name, model_name=args.model or setup.model, device=device, dropout=args.dropout,
            warmup=args.warmup, reps=args.reps, log=log,
        )
        rows += train_rows
        report["train"] = train_info
    report["load_average_end"] = _load()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["rows"] = [asdict(row) for row in rows]
    problems = check_rows(rows)
    report["problems"] = problems
    print(format_table(rows))
    print(f"\n({report['seconds']}s; load average {report['load_average_start']} -> {report['load_average_end']}; "
          f"{report['machine']['torch_threads']} torch threads on {report['machine']['cpu_count']} CPUs)")
    if args.json:
        from .io import write_json

        write_json(args.json, report)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model section of ``dynmole bench``: PEFT LoRA vs DynMoLE on a causal LM.

Training-step time and tokens/s, eval-forward and generation (KV cache) tokens/s, routing
statistics on vs off, and memory: peak training memory (``torch.cuda.max_memory_allocated``
on CUDA; on CPU the peak resident set size of a fresh worker process per variant) and the
bytes autograd saves for backward (counted exactly with ``saved_tensors_hooks``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .layer import DTYPES, mole_config
from .report import Row, timing_row
from .timing import REFERENCE, interleaved, paired_ratio

TARGET_MODULES = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelSize:
    """Sizes of the model section."""

    model: str  # "tiny", "tiny-1" (random Llamas) or a name for dynmole.pretrained
    experts: int
    r: int
    batch: int
    seq: int
    reps: int
    gen_tokens: int  # new tokens of the generate rows
    gen_prompt: int  # prompt tokens of the generate rows


# --------------------------------------------------------------------------- models
def tiny_llama(layers: int = 2, seed: int = 0) -> nn.Module:
    """A small random Llama (no download): hidden 128, intermediate 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def load_base_model(model_name: str, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, str]:
    """The base model and a description. ``tiny`` / ``tiny-1``: random Llama with 2 / 1 layers;
    anything else goes through :func:`dynmole.pretrained.load_model_and_tokenizer`."""
    if model_name in ("tiny", "tiny-1"):
        layers = 1 if model_name == "tiny-1" else 2
        model = tiny_llama(layers).to(device=device, dtype=dtype)
        return model, f"random LlamaForCausalLM (hidden 128, intermediate 256, {layers} layers, vocab 512)"
    from ..pretrained import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_name, dtype=dtype, device=str(device))
    return model, model_name


def build_variant(base: nn.Module, variant: str, n: int, r: int, dropout: float) -> nn.Module:
    """``peft_lora`` (rank N*r on gate/up/down_proj) or ``mole_dynmole`` (N experts of rank r)
    on a copy of ``base``."""
    model = copy.deepcopy(base)
    if variant == REFERENCE:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=n * r, lora_alpha=2 * n * r, lora_dropout=dropout, target_modules=TARGET_MODULES, bias="none"
        )
        return get_peft_model(model, config)
    if variant == "mole_dynmole":
        from ..model import get_mole_model

        config = mole_config("dynmole", n, r, dropout)
        config.target_modules = list(TARGET_MODULES)
        return get_mole_model(model, config)
    raise ValueError(f"unknown model variant {variant!r}")


def make_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-5)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def with_stats(model: nn.Module, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` inside ``MoLEModel.collect_routing_stats`` (accumulating, never reset)."""

    def stats_step() -> None:
        with model.collect_routing_stats(reset=False):
            step()

    return stats_step


def eval_forward_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(**inputs)

    return forward


def generate_fn(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    def generate() -> None:
        model.eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
            )
        assert out.shape[-1] == prompt.shape[-1] + new_tokens

    return generate


def stats_update_seconds(model: nn.Module, batch: dict[str, torch.Tensor], reps: int, device: torch.device) -> float:
    """Median time of ``RoutingStats.update`` on the records of one forward, alone: the work that
    switching statistics on adds to a training step (which records routing anyway for the aux
    losses). Measured in isolation because it is far below the step's run-to-run noise."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.recorder.active = True
    try:
        with torch.no_grad():
            model.get_base_model()(**inputs)
    finally:
        model.recorder.active = False
    records = model.recorder.take()
    stats = type(model.stats)(q=model.stats.q)
    timings = interleaved(
        {"update": lambda: stats.update(records, inputs["attention_mask"])}, warmup=1, reps=max(reps, 5),
        device=device, reference=None,
    )
    return timings["update"].median


# --------------------------------------------------------------------------- memory
def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward,
    parameters and buffers excluded: the activation memory the adapter adds, without noise."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    for param in model.parameters():
        param.grad = None
    return sum(seen.values())


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec_json: str) -> int:
    """Worker process: build one variant, run training steps, print peak memory as JSON."""
    spec = json.loads(spec_json)
    import peft  # noqa: F401 - both variants carry the same imported modules in their resident set

    from .. import model as _model  # noqa: F401

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    base, _ = load_base_model(spec["model"], DTYPES[spec["dtype"]], device)
    model = build_variant(base, spec["variant"], spec["experts"], spec["r"], spec["dropout"])
    del base
    batch = make_batch(model.config.vocab_size, spec["batch"], spec["seq"], device)
    step = train_step_fn(model, batch)
    step()  # the first step allocates the optimizer state
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(spec["steps"]):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out.update(measure="torch.cuda.max_memory_allocated", peak_mb=peak / 2**20, before_mb=before / 2**20)
    else:
        before = _status_kb("VmRSS")
        reset = _reset_peak_rss()
        for _ in range(spec["steps"]):
            step()
        peak = _status_kb("VmHWM")
        if before is None or peak is None:
            import resource

            peak, before, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 0, False
        out.update(
            measure="peak RSS (VmHWM) of a worker process" + ("" if reset else ", since process start"),
            peak_mb=peak / 1024, before_mb=before / 1024, hwm_reset=reset,
        )
    out["step_delta_mb"] = out["peak_mb"] - out["before_mb"]
    print("MEMORY " + json.dumps(out), flush=True)
    return 0


def measure_memory(specs: dict[str, dict[str, Any]], timeout: float = 1800) -> dict[str, dict[str, Any] | str]:
    """Run :func:`memory_worker` once per spec, each in a fresh process so that variants never
    share an allocator's history (the processes run side by side: memory is per process).
    On CPU, glibc is told to serve big blocks with mmap so that freed memory leaves the
    resident set and the peak is the step's own. Returns each result, or an error message."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "dynmole.bench", "--memory-worker", json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for name, spec in specs.items()
    }
    deadline = time.monotonic() + timeout
    results: dict[str, dict[str, Any] | str] = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            results[name] = f"memory worker timed out after {timeout:.0f}s"
            continue
        lines = [line for line in stdout.splitlines() if line.startswith("MEMORY ")]
        if proc.returncode == 0 and lines:
            results[name] = json.loads(lines[-1][len("MEMORY "):])
        else:
            results[name] = f"memory worker failed (exit {proc.returncode}): {stderr[-2000:]}"
    return results


# --------------------------------------------------------------------------- section
def run_model_bench(
    size: ModelSize,
    *,
    model_name: str,
    dtype_name: str,
    device: torch.device,
    dropout: float,
    warmup: int,
    reps: int,
    log: Callable[[str], None] = print,
) -> tuple[list[Row], dict[str, Any]]:
    """The ``model`` section's rows and facts: training step, eval forward, generation and memory of PEFT
    LoRA against DynMoLE on one base model.

    One function on purpose (over 60 lines): its four commented blocks share the two models built once
    at the top, and reading them in order shows what each measurement runs before it.
    """
    dtype = DTYPES[dtype_name]
    log(f"[model] loading {model_name}")
    base, description = load_base_model(model_name, dtype, device)
    n, r = size.experts, size.r
    models = {name: build_variant(base, name, n, r, dropout) for name in (REFERENCE, "mole_dynmole")}
    mole = models["mole_dynmole"]
    info: dict[str, Any] = {
        "model": description,
        "num_experts": n,
        "r": r,
        "lora_rank": n * r,
        "target_modules": TARGET_MODULES,
        "trainable_params": {name: sum(p.numel() for p in _trainable(m)) for name, m in models.items()},
        "batch": size.batch,
        "seq": size.seq,
        "generate": {"prompt": size.gen_prompt, "new_tokens": size.gen_tokens, "batch": 1},
    }
    tokens = size.batch * size.seq
    batch = make_batch(base.config.vocab_size, size.batch, size.seq, device)
    tag = f"B={size.batch} S={size.seq} {dtype_name}"
    rows: list[Row] = []

    # Training step (forward + backward + AdamW), routing statistics off and on.
    scenario = f"train step {tag}"
    log(f"[model] {scenario}")
    fns = {REFERENCE: train_step_fn(models[REFERENCE], batch), "mole_dynmole": train_step_fn(mole, batch)}
    fns["mole_dynmole+stats"] = with_stats(mole, fns["mole_dynmole"])
    timings = interleaved(fns, warmup=warmup, reps=reps, device=device)
    stats_overhead = paired_ratio(timings["mole_dynmole+stats"], timings["mole_dynmole"])
    update = stats_update_seconds(mole, batch, reps, device)
    info["stats_update_ms"] = update * 1e3
    for name, timing in timings.items():
        extra: dict[str, Any] = {"tokens_per_s": tokens / timing.median}
        if name.endswith("+stats"):
            extra.update(overhead_vs_stats_off=stats_overhead[0], overhead_q1=stats_overhead[1],
                         overhead_q3=stats_overhead[2], stats_update_ms=update * 1e3,
                         stats_update_share=update / timings["mole_dynmole"].median)
        kind = "peft" if name == REFERENCE else "ours"
        rows.append(timing_row("model", scenario, name, kind, timing, **extra))
    summary = mole.stats.summary()
    info["stats_modules"] = len(summary)

    # Eval forward (no grad), statistics off and on.
    scenario = f"eval forward {tag}"
    log(f"[model] {scenario}")
    fns = {
        "base_model": eval_forward_fn(base, batch),
        REFERENCE: eval_forward_fn(models[REFERENCE], batch),
        "mole_dynmole": eval_forward_fn(mole, batch),
    }
    fns["mole_dynmole+stats"] = with_stats(mole, fns["mole_dynmole"])
    timings = interleaved(fns, warmup=warmup, reps=reps, device=device)
    eval_overhead = paired_ratio(timings["mole_dynmole+stats"], timings["mole_dynmole"])
    for name, timing in timings.items():
        extra = {"tokens_per_s": tokens / timing.median}
        if name.endswith("+stats"):
            extra.update(overhead_vs_stats_off=eval_overhead[0], overhead_q1=eval_overhead[1],
                         overhead_q3=eval_overhead[2], stats_update_ms=update * 1e3,
                         stats_update_share=update / timings["mole_dynmole"].median)
        kind = {"base_model": "base", REFERENCE: "peft"}.get(name, "ours")
        rows.append(timing_row("model", scenario, name, kind, timing, **extra))

    # Generation with KV cache, greedy, batch 1.
    scenario = f"generate {size.gen_tokens} tokens (prompt {size.gen_prompt}, KV cache) {dtype_name}"
    log(f"[model] {scenario}")
    prompt = make_batch(base.config.vocab_size, 1, size.gen_prompt, device, seed=1)["input_ids"]
    fns = {name: generate_fn(m, prompt, size.gen_tokens) for name, m in
           (("base_model", base), (REFERENCE, models[REFERENCE]), ("mole_dynmole", mole))}
    timings = interleaved(fns, warmup=warmup, reps=reps, device=device)
    for name, timing in timings.items():
        kind = {"base_model": "base", REFERENCE: "peft"}.get(name, "ours")
        rows.append(timing_row("model", scenario, name, kind, timing, tokens_per_s=size.gen_tokens / timing.median))

    # Memory: bytes saved for backward (in process, exact) ...
    log("[memory] autograd saved tensors")
    saved = {name: saved_activation_bytes(m, batch) for name, m in models.items()}
    scenario = f"train step {tag}: activations saved for backward (exact, params excluded)"
    for name, value in saved.items():
        rows.append(Row("memory", scenario, name, "peft" if name == REFERENCE else "ours",
                        ratio=value / saved[REFERENCE], extra={"unit": "MB", "value": value / 2**20}))
    del models, mole, base, fns
    # ... and peak training memory, one fresh worker process per variant.
    log("[memory] peak training memory (one worker process per variant)")
    specs = {
        name: {
            "model": model_name, "variant": name, "experts": n, "r": r, "dtype": dtype_name, "device": str(device),
            "dropout": dropout, "batch": size.batch, "seq": size.seq, "steps": 2,
            "threads": torch.get_num_threads(),
        }
        for name in (REFERENCE, "mole_dynmole")
    }
    measured: dict[str, Any] = {}
    for name, result in measure_memory(specs).items():
        if isinstance(result, str):
            log(f"[memory] {name}: {result}")
        else:
            measured[name] = result
    if len(measured) == 2:
        how = measured[REFERENCE]["measure"]
        for key, label in (("peak_mb", "peak"), ("step_delta_mb", "peak minus memory before the step")):
            scenario = f"train step {tag}: {label} ({how})"
            for name, result in measured.items():
                rows.append(Row("memory", scenario, name, "peft" if name == REFERENCE else "ours",
                                ratio=result[key] / measured[REFERENCE][key],
                                extra={"unit": "MB", "value": result[key]}))
    info["memory"] = measured
    info["saved_activation_bytes"] = saved
    return rows, info

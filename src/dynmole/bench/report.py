"""Rows of ``dynmole bench``, their table, the targets they are checked against, and the machine."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .timing import Timing


@dataclass
class Row:
    """One line of the table."""

    section: str  # layer | model | memory | train | eval
    scenario: str  # what was run, e.g. "d=4096 T=512 N=6 r=16 fp32 fwd+bwd"
    variant: str
    kind: str  # ours | peft | base | peer (ours)
    ms: float | None = None  # median wall time per call
    ratio: float | None = None  # to PEFT LoRA of equal total rank, same scenario
    ratio_q1: float | None = None
    ratio_q3: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def timing_row(section: str, scenario: str, variant: str, kind: str, timing: Timing, **extra: Any) -> Row:
    return Row(
        section=section, scenario=scenario, variant=variant, kind=kind, ms=timing.median * 1e3,
        ratio=timing.ratio, ratio_q1=timing.ratio_q1, ratio_q3=timing.ratio_q3,
        extra={
            "min_ms": min(timing.times) * 1e3, "ratio_min": timing.ratio_min,
            "times_ms": [round(t * 1e3, 3) for t in timing.times], **extra,
        },
    )


# --------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A ratio to PEFT LoRA that rows matching ``match`` must not exceed (their median)."""

    name: str
    limit: float
    match: Callable[[Row], bool]


def _layer(d: int | None, mode: str, variant: str, **point: int) -> Callable[[Row], bool]:
    def match(row: Row) -> bool:
        extra = row.extra
        return (row.section == "layer" and row.variant == variant and extra.get("mode") == mode
                and (d is None or extra.get("d") == d) and all(extra.get(k) == v for k, v in point.items()))

    return match


def _scenario(section: str, text: str, variant: str) -> Callable[[Row], bool]:
    return lambda row: row.section == section and row.variant == variant and text in row.scenario


TARGETS = (
    Target("DynMoLE layer fwd+bwd at d=4096 T=512 N=6 r=16", 1.10,
           _layer(4096, "fwd+bwd", "mole_dynmole", T=512, N=6, r=16)),
    Target("LD-MoLE layer fwd+bwd at SmolLM2's width d=576", 1.15, _layer(576, "fwd+bwd", "mole_ldmole")),
    Target("decode: greedy generate with KV cache, time per token", 1.10,
           _scenario("model", "generate", "mole_dynmole")),
    Target("training memory: what the step adds (peak minus before)", 1.05,
           _scenario("memory", "peak minus memory before the step", "mole_dynmole")),
    Target("training memory: peak", 1.10, _scenario("memory", ": peak (", "mole_dynmole")),
)


def check_targets(rows: Sequence[Row], targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """One entry per (target, matching row): the measured ratio, its quartiles, the FLOP floor
    where the row has one, and whether the median is within the target."""
    out = []
    for target in targets:
        for row in rows:
            if row.ratio is not None and target.match(row):
                out.append({
                    "target": target.name, "limit": target.limit, "scenario": row.scenario, "variant": row.variant,
                    "ratio": row.ratio, "ratio_q1": row.ratio_q1, "ratio_q3": row.ratio_q3,
                    "floor": row.extra.get("floor_mole_over_lora"), "met": row.ratio <= target.limit,
                })
    return out


def format_targets(checks: Sequence[dict[str, Any]]) -> str:
    """The targets block of the table: each target beside the row it is checked on."""
    if not checks:
        return ""
    lines = ["== targets: ratio to PEFT LoRA (median of the paired ratios; met = median <= target)"]
    for check in checks:
        quartiles = check["ratio_q1"] is not None
        spread = f" [{_fmt(check['ratio_q1'], 3)}, {_fmt(check['ratio_q3'], 3)}]" if quartiles else ""
        floor = f"  FLOP floor {check['floor']:.3f}" if check["floor"] is not None else ""
        lines.append(
            f"{check['target']:<58} <= {check['limit']:.2f}  measured {check['ratio']:.3f}{spread}{floor}  "
            f"{'met' if check['met'] else 'NOT met'}  ({check['scenario']})"
        )
    return "\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------- table
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
            notes.append(f"padding={100 * extra['padding_share']:.0f}% "
                         f"LM-head positions={100 * extra['head_positions_share']:.0f}%")
        for key, label in (("max_abs_loss_delta", "loss"), ("max_abs_loglik_delta", "loglik")):
            if key in extra:
                notes.append(f"max|d {label}| vs first={extra[key]:.2e}")
        if "x_base" in extra:
            notes.append(f"x base={extra['x_base']:.3f}")
        if "floor_mole_over_base" in extra:
            notes.append(f"(FLOP floor x base={extra['floor_mole_over_base']:.3f}, "
                         f"x LoRA={extra['floor_mole_over_lora']:.3f})")
        if "overhead_vs_stats_off" in extra:
            notes.append(f"stats on/off={extra['overhead_vs_stats_off']:.3f}")
        if "stats_update_share" in extra:
            notes.append(f"stats update alone={extra['stats_update_ms']:.1f} ms = "
                         f"{100 * extra['stats_update_share']:.2f}%")
        ratio_min = _fmt(extra.get("ratio_min"), 3)
        lines.append(
            f"{row.variant:<28} {row.kind:<12} {median:>11} {_fmt(row.ratio, 3):>7} {spread:>15} {ratio_min:>7}  "
            + " ".join(notes)
        )
    return "\n".join(lines).lstrip("\n")


def check_rows(rows: Sequence[Row]) -> list[str]:
    """Problems with the rows (empty when well-formed): every number positive and finite."""
    problems = []
    for row in rows:
        for key in ("ms", "ratio", "ratio_q1", "ratio_q3"):
            value = getattr(row, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{row.scenario} {row.variant}: {key}={value}")
    return problems


# --------------------------------------------------------------------------- machine
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


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None

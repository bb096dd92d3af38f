"""Interleaved timing for ``dynmole bench``: every variant of a scenario runs once per
repetition, in an order rotated by one each repetition, and ratios are paired per repetition."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

REFERENCE = "peft_lora"  # the variant every ratio is taken to, unless a section names another


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


def paired_ratio(a: Timing, b: Timing) -> tuple[float, float, float]:
    """Median, first and third quartile of the per-repetition ratio ``a / b``."""
    q1, q2, q3 = _quartiles([x / y for x, y in zip(a.times, b.times)])
    return q2, q1, q3


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

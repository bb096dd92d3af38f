"""Numeric helpers shared by the layer, the routing rules, entropies and losses."""

from __future__ import annotations

import contextlib

import torch


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` at least fp32: half/bf16 give fp32, fp32/fp64 stay as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (:func:`upcast_dtype`); no op when it already is."""
    dtype = upcast_dtype(x.dtype)
    return x if x.dtype == dtype else x.to(dtype)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off on ``device_type`` for the block (a no-op where it is off already)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def linear_upcast(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """``layer(x)`` computed in at least fp32 whatever the dtypes of ``x`` and of the layer's
    weights, and outside autocast: for the routing maths, which must not round to bf16/fp16."""
    dtype = upcast_dtype(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    with no_autocast(x.device.type):
        return torch.nn.functional.linear(x.to(dtype), layer.weight.to(dtype), bias)

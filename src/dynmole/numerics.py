"""Numeric helpers shared by the layer, the routing rules, entropies and losses."""

from __future__ import annotations

import torch


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` at least fp32: half/bf16 give fp32, fp32/fp64 stay as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (:func:`upcast_dtype`); no op when it already is."""
    dtype = upcast_dtype(x.dtype)
    return x if x.dtype == dtype else x.to(dtype)

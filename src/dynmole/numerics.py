"""Numeric helpers shared by the routing rules, entropies and losses."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32: half/bf16 become fp32, fp32/fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()

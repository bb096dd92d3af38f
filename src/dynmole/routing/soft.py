"""Soft routing (LoRAMoE): every expert, weighted by the router softmax (DynMoLE eq. 5)."""

from __future__ import annotations

import torch

from ..numerics import upcast


def soft(logits: torch.Tensor) -> torch.Tensor:
    """``g = softmax(logits)`` over the last dim (DynMoLE eq. 5). Computed in fp32."""
    return torch.softmax(upcast(logits), dim=-1)

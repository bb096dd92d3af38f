"""Top-k routing (MoLA; DynMoLE eq. 6)."""

from __future__ import annotations

import torch

from ..numerics import upcast


def top_k_mask(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``probs`` along the last dim (eq. 6)."""
    num_experts = probs.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"top-k needs 1 <= k <= num_experts ({num_experts}), got k={k}")
    index = probs.topk(k, dim=-1).indices
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, True)


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """MoLA gates: keep the ``k`` largest softmax probabilities and renormalise them to sum 1.

    Args:
        logits: router logits ``(..., N)``.
        k: experts per token, ``1 <= k <= N``.

    Returns:
        Gate weights ``(..., N)``, fp32, exactly zero for the experts not selected.
    """
    probs = torch.softmax(upcast(logits), dim=-1)
    kept = probs * top_k_mask(probs, k)
    return kept / kept.sum(dim=-1, keepdim=True)

"""Top-p routing (Huang et al. 2024; DynMoLE eq. 7)."""

from __future__ import annotations

from typing import Literal

import torch

from ..numerics import upcast

TopPMode = Literal["paper", "reference"]


def top_p_mask(probs: torch.Tensor, p: float, mode: TopPMode = "paper", min_keep: int = 0) -> torch.Tensor:
    """Boolean mask of the experts top-p keeps, along the last dim.

    ``mode="paper"`` (DynMoLE eq. 7, default): sort descending and keep the smallest prefix
    whose cumulative probability is >= ``p`` (the expert that crosses ``p`` is kept).
    ``mode="reference"``: the DynMoLE reference code keeps the experts whose cumulative sum is
    <= ``p`` (the expert that crosses ``p`` is dropped); this may keep no expert at all.

    ``min_keep`` also keeps the first ``min_keep`` experts of the same sort order (DynMoLE's
    keep-top-k floor). Both sets come from one sort, so with tied probabilities the mask is a
    prefix of length ``max(min_keep, |top-p set|)``, as in the reference code.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if mode not in ("paper", "reference"):
        raise ValueError(f"top_p mode must be 'paper' or 'reference', got {mode!r}")
    if not 0 <= min_keep <= probs.shape[-1]:
        raise ValueError(f"min_keep must be in [0, num_experts={probs.shape[-1]}], got {min_keep}")
    return sorted_prefix_mask(probs, p, mode == "paper", min_keep)


def sorted_prefix_mask(probs: torch.Tensor, p: float, paper: bool, min_keep: int) -> torch.Tensor:
    """:func:`top_p_mask` without the argument checks (for rules that check them once, when built):
    one sort, its cumulative sum, the first ``min_keep`` ranks set in place, one scatter back
    (``order`` is a permutation, so the scatter writes every entry)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    keep_sorted = (cumulative - sorted_probs) < p if paper else cumulative <= p
    if min_keep:
        keep_sorted.narrow(-1, 0, min_keep).fill_(True)
    return keep_sorted.scatter(-1, order, keep_sorted)


def top_p(
    logits: torch.Tensor, p: float, mode: TopPMode = "paper", renormalize: bool = False
) -> torch.Tensor:
    """Top-p gates ``g = softmax(logits) * mask`` (DynMoLE eq. 7).

    At least the top-1 expert is always kept (this matters only in ``"reference"`` mode, whose
    rule alone may keep none). Weights are not renormalised unless ``renormalize=True``, as in
    the DynMoLE reference code.
    """
    probs = torch.softmax(upcast(logits), dim=-1)
    mask = top_p_mask(probs, p, mode, min_keep=1)
    gates = probs * mask
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates

"""DynMoLE hybrid routing (DynMoLE eqs. 17-18)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..entropy import tsallis_entropy_above
from ..numerics import upcast
from .top_p import TopPMode, sorted_prefix_mask


@dataclass(frozen=True)
class DynamicRouter:
    """DynMoLE's hybrid rule (eqs. 17-18), its arguments checked once when built; a layer calls it
    on every forward.

    Per token, with ``p = softmax(logits)`` and ``S`` the normalised Tsallis entropy of ``p``:
    if ``S > threshold`` the token is routed soft (``g = p``, eq. 17, first case); otherwise
    ``g = p * mask`` where ``mask`` is the top-p set united with the top ``keep_top_k`` experts
    (eq. 18: at least ``keep_top_k`` experts always). Both sets come from one sort order
    (:func:`~dynmole.routing.top_p.sorted_prefix_mask`), so with tied probabilities the sparse
    branch keeps exactly ``max(keep_top_k, |top-p set|)`` experts. The entropy test is one
    comparison of ``sum_i p_i^q`` with a constant (:func:`~dynmole.entropy.tsallis_entropy_above`).

    Args:
        q: Tsallis entropic index (> 0; 1.0 is Shannon).
        threshold: normalised-entropy threshold in [0, 1]; ``None`` or ``1.0`` switch the soft
            branch off ("DynMoLE (Top-p)" in the paper's table), as the reference code does for
            any threshold >= 1 (rounding can put a uniform router's entropy just above 1).
        top_p: cumulative-probability threshold in (0, 1].
        keep_top_k: minimum number of experts in the sparse branch, 1..N.
        renormalize: renormalise kept weights to sum 1 (the reference code does not).
        top_p_mode: ``"paper"`` (eq. 7) or ``"reference"``, see
            :func:`~dynmole.routing.top_p.top_p_mask`.
        eps: added to ``p`` inside the entropy (the reference code's 1e-5, the default; 0 = the
            paper's formula). It lowers the normalised entropy slightly, most near uniform.

    Calling it on logits ``(..., N)`` returns ``(gates, soft_branch)``: gates ``(..., N)`` fp32
    with zeros for unselected experts, and a boolean ``(...)`` tensor, True where the token was
    routed soft.
    """

    q: float = 1.1
    threshold: float | None = 0.9
    top_p: float = 0.75
    keep_top_k: int = 2
    renormalize: bool = False
    top_p_mode: TopPMode = "paper"
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"entropy threshold must be in [0, 1], got {self.threshold}")
        if self.q <= 0:
            raise ValueError(f"Tsallis entropic index q must be > 0, got {self.q}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_p_mode not in ("paper", "reference"):
            raise ValueError(f"top_p_mode must be 'paper' or 'reference', got {self.top_p_mode!r}")
        if self.keep_top_k < 1:
            raise ValueError(f"keep_top_k must be >= 1, got {self.keep_top_k}")

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keep_top_k > logits.shape[-1]:
            raise ValueError(f"keep_top_k must be in [1, num_experts={logits.shape[-1]}], got {self.keep_top_k}")
        probs = torch.softmax(upcast(logits), dim=-1)
        mask = sorted_prefix_mask(probs, self.top_p, self.top_p_mode == "paper", self.keep_top_k)
        if self.threshold is None or self.threshold >= 1.0:
            soft_branch = torch.zeros(probs.shape[:-1], dtype=torch.bool, device=probs.device)
        else:
            soft_branch = tsallis_entropy_above(probs, self.threshold, q=self.q, eps=self.eps)
            mask.logical_or_(soft_branch.unsqueeze(-1))
        gates = probs * mask
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return gates, soft_branch


def dynamic_route(logits: torch.Tensor, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid routing, returning ``(gates, soft_branch)``; ``options`` are the fields of
    :class:`DynamicRouter` (its defaults are the papers')."""
    return DynamicRouter(**options)(logits)


def dynamic(logits: torch.Tensor, **options: Any) -> torch.Tensor:
    """DynMoLE gate weights (eqs. 17-18); ``options`` as for :class:`DynamicRouter`."""
    return DynamicRouter(**options)(logits)[0]

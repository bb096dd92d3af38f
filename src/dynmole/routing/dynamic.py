"""DynMoLE hybrid routing (DynMoLE eqs. 17-18)."""

from __future__ import annotations

import torch

from ..entropy import tsallis_entropy_above
from ..numerics import upcast
from .top_p import TopPMode, sorted_prefix_mask


class DynamicRouter:
    """DynMoLE's hybrid rule with its arguments checked once, when built (a layer calls it on
    every forward; see :func:`dynamic_route` for the rule and the arguments).

    Calling it on logits ``(..., N)`` returns ``(gates, soft_branch)``. Per call: a softmax, the
    top-p mask from one sort (:func:`~dynmole.routing.top_p.sorted_prefix_mask`), and the entropy
    test as one comparison of ``sum_i p_i^q`` with a constant
    (:func:`~dynmole.entropy.tsallis_entropy_above`).
    """

    def __init__(
        self,
        q: float = 1.1,
        threshold: float | None = 0.9,
        top_p: float = 0.75,
        keep_top_k: int = 2,
        renormalize: bool = False,
        top_p_mode: TopPMode = "paper",
        eps: float = 1e-5,
    ) -> None:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"entropy threshold must be in [0, 1], got {threshold}")
        if q <= 0:
            raise ValueError(f"Tsallis entropic index q must be > 0, got {q}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p_mode not in ("paper", "reference"):
            raise ValueError(f"top_p mode must be 'paper' or 'reference', got {top_p_mode!r}")
        if keep_top_k < 1:
            raise ValueError(f"keep_top_k must be >= 1, got {keep_top_k}")
        self.q = q
        self.threshold = None if threshold is None or threshold >= 1.0 else threshold
        self.top_p = top_p
        self.keep_top_k = keep_top_k
        self.renormalize = renormalize
        self.paper = top_p_mode == "paper"
        self.eps = eps

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keep_top_k > logits.shape[-1]:
            raise ValueError(f"keep_top_k must be in [1, num_experts={logits.shape[-1]}], got {self.keep_top_k}")
        probs = torch.softmax(upcast(logits), dim=-1)
        mask = sorted_prefix_mask(probs, self.top_p, self.paper, self.keep_top_k)
        if self.threshold is None:
            soft_branch = torch.zeros(probs.shape[:-1], dtype=torch.bool, device=probs.device)
        else:
            soft_branch = tsallis_entropy_above(probs, self.threshold, q=self.q, eps=self.eps)
            mask.logical_or_(soft_branch.unsqueeze(-1))
        gates = probs * mask
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return gates, soft_branch


def dynamic_route(
    logits: torch.Tensor,
    q: float = 1.1,
    threshold: float | None = 0.9,
    top_p: float = 0.75,
    keep_top_k: int = 2,
    renormalize: bool = False,
    top_p_mode: TopPMode = "paper",
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid routing, returning the gates and which tokens took the soft branch.

    Per token, with ``p = softmax(logits)`` and ``S`` the normalised Tsallis entropy of ``p``:
    if ``S > threshold`` the token is routed soft (``g = p``, eq. 17, first case); otherwise
    ``g = p * mask`` where ``mask`` is the top-p set united with the top ``keep_top_k`` experts
    (eq. 18: at least ``keep_top_k`` experts always). Both sets come from one sort order, so with
    tied probabilities the sparse branch keeps exactly ``max(keep_top_k, |top-p set|)`` experts.

    Args:
        logits: router logits ``(..., N)``.
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

    Returns:
        ``(gates, soft_branch)``: gates ``(..., N)`` fp32 with zeros for unselected experts, and
        a boolean ``(...)`` tensor, True where the token was routed soft.
    """
    return DynamicRouter(q, threshold, top_p, keep_top_k, renormalize, top_p_mode, eps)(logits)


def dynamic(
    logits: torch.Tensor,
    q: float = 1.1,
    threshold: float | None = 0.9,
    top_p: float = 0.75,
    keep_top_k: int = 2,
    renormalize: bool = False,
    top_p_mode: TopPMode = "paper",
    eps: float = 1e-5,
) -> torch.Tensor:
    """DynMoLE gate weights (eqs. 17-18); see :func:`dynamic_route` for the arguments."""
    return dynamic_route(logits, q, threshold, top_p, keep_top_k, renormalize, top_p_mode, eps)[0]

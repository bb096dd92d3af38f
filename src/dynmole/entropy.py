"""Router entropies: Shannon (DynMoLE eq. 8) and Tsallis (DynMoLE eq. 9).

Both take probabilities over the last dimension and return one value per distribution.
With ``normalize=True`` the value is divided by its maximum, reached at the uniform
distribution, so it lies in [0, 1] whatever the number of experts: this is what makes an
entropy threshold such as 0.9 (DynMoLE eq. 17) mean the same thing for 4 or 8 experts.
"""

from __future__ import annotations

import math

import torch

from .numerics import upcast

# Smallest probability used inside log/power, so that gradients stay finite at p == 0.
_TINY = 1e-12


def max_tsallis_entropy(num_experts: int, q: float) -> float:
    """Maximum of S_q over ``num_experts`` outcomes, reached at the uniform distribution.

    ``S_max = (1 - N^(1-q)) / (q - 1)``; for ``q == 1`` (Shannon) it is ``log N``.
    """
    if q <= 0:
        raise ValueError(f"Tsallis entropic index q must be > 0, got {q}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if q == 1.0:
        return math.log(num_experts)
    return (1.0 - num_experts ** (1.0 - q)) / (q - 1.0)


def shannon_entropy(p: torch.Tensor, normalize: bool = True, eps: float = 0.0) -> torch.Tensor:
    """Shannon entropy ``H(p) = -sum_i p_i log p_i`` (DynMoLE eq. 8) over the last dim.

    Args:
        p: probabilities, shape ``(..., N)``.
        normalize: divide by ``log N`` so the result lies in [0, 1] (0 when N == 1).
        eps: added to ``p`` before the log, as the DynMoLE reference code does (it uses 1e-5).
    """
    return tsallis_entropy(p, q=1.0, normalize=normalize, eps=eps)


def _entropy_sum(p: torch.Tensor, q: float, eps: float) -> torch.Tensor:
    """The sum that eq. 9 (eq. 12 at ``q == 1``) maps affinely to the entropy, over the last dim:
    ``sum_i p_i^q``, or ``sum_i p_i log p_i`` at ``q == 1``, of ``p + eps`` in at least fp32."""
    p = upcast(p)
    if eps:
        p = p + eps
    if q == 1.0:
        return (p * torch.log(p.clamp_min(_TINY))).sum(dim=-1)
    base = p if q > 1.0 else p.clamp_min(_TINY)
    return base.pow(q).sum(dim=-1)


def tsallis_entropy(
    p: torch.Tensor, q: float = 1.1, normalize: bool = True, eps: float = 0.0
) -> torch.Tensor:
    """Tsallis entropy ``S_q(p) = (1 - sum_i p_i^q) / (q - 1)`` (DynMoLE eq. 9) over the last dim.

    ``q == 1`` is handled exactly and gives Shannon entropy (DynMoLE eq. 12) rather than a
    division by zero.

    Args:
        p: probabilities, shape ``(..., N)``; computed in fp32 whatever their dtype.
        q: entropic index, > 0.
        normalize: divide by the maximum ``S_max`` (uniform distribution) so the result lies in [0, 1].
        eps: added to ``p`` before the power/log (the DynMoLE reference uses 1e-5; default 0).

    Returns:
        Tensor of shape ``p.shape[:-1]``.
    """
    if q <= 0:
        raise ValueError(f"Tsallis entropic index q must be > 0, got {q}")
    total = _entropy_sum(p, q, eps)
    entropy = -total if q == 1.0 else (1.0 - total) / (q - 1.0)
    if not normalize:
        return entropy
    s_max = max_tsallis_entropy(p.shape[-1], q)
    if s_max == 0.0:
        return torch.zeros_like(entropy)
    return entropy / s_max


def tsallis_entropy_above(p: torch.Tensor, threshold: float, q: float = 1.1, eps: float = 0.0) -> torch.Tensor:
    """``tsallis_entropy(p, q, normalize=True, eps=eps) > threshold`` (DynMoLE eq. 17's test), with
    the normalisation moved into the threshold: the sum of eq. 9 is compared with a constant, two
    ops fewer per call. ``S_q / S_max = (1 - sum_i p_i^q) / c`` with ``c = (q - 1) S_max =
    1 - N^(1-q)``, whose sign is that of ``q - 1`` (at ``q == 1``: ``-sum_i p_i log p_i / log N``).
    The same decision as the normalised entropy's except where the two roundings straddle the
    threshold (a last-bit difference). Returns a boolean tensor of shape ``p.shape[:-1]``."""
    s_max = max_tsallis_entropy(p.shape[-1], q)
    if s_max == 0.0:  # one outcome: the normalised entropy is 0
        return torch.zeros(p.shape[:-1], dtype=torch.bool, device=p.device)
    total = _entropy_sum(p, q, eps)
    if q == 1.0:
        return total < -threshold * s_max
    bound = 1.0 - threshold * (q - 1.0) * s_max
    return total < bound if q > 1.0 else total > bound

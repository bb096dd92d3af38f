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
    p = upcast(p)
    if eps:
        p = p + eps
    if q == 1.0:
        entropy = -(p * torch.log(p.clamp_min(_TINY))).sum(dim=-1)
    else:
        base = p if q > 1.0 else p.clamp_min(_TINY)
        entropy = (1.0 - base.pow(q).sum(dim=-1)) / (q - 1.0)
    if not normalize:
        return entropy
    s_max = max_tsallis_entropy(p.shape[-1], q)
    if s_max == 0.0:
        return torch.zeros_like(entropy)
    return entropy / s_max

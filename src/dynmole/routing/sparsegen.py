"""LD-MoLE routing: closed-form Sparsegen with a token-wise lambda from a small MLP."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..numerics import upcast

# The reference maps the MLP output through logsigmoid(.) + (1 - 1e-2), so lambda < 0.99.
LAMBDA_CEILING = 1.0 - 1e-2


def _sorted_prefix(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted scores ``u_(k)`` (descending), their prefix sums ``U_k`` and ``k = 1..N``."""
    u_sorted = logits.sort(dim=-1, descending=True).values
    prefix = u_sorted.cumsum(dim=-1)
    ks = torch.arange(1, logits.shape[-1] + 1, device=logits.device, dtype=logits.dtype)
    return u_sorted, prefix, ks


def sparsegen(logits: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """Closed-form Sparsegen (LD-MoLE), the solution of
    ``argmin_{g in simplex} ||g - u||^2 - lam ||g||^2`` with ``u = logits``.

    With ``u`` sorted descending and ``U_k`` its prefix sums:
    ``k(u) = max{k : 1 - lam + k u_(k) > U_k}``, ``tau = (U_{k(u)} - 1 + lam) / k(u)``,
    ``g_i = max(u_i - tau, 0) / (1 - lam)``; i.e. sparsemax of ``u / (1 - lam)``. The gates lie
    on the simplex with at least one non-zero, and gradients flow through ``tau`` to both the
    logits and ``lam``.

    Args:
        logits: router scores ``(..., N)``; computed in fp32.
        lam: ``(..., 1)`` tensor (or broadcastable, or a float), every value < 1.

    Returns:
        Gates ``(..., N)``, fp32.
    """
    u = upcast(logits)
    lam = torch.as_tensor(lam, dtype=u.dtype, device=u.device)
    u_sorted, prefix, ks = _sorted_prefix(u)
    support = (1.0 - lam + ks * u_sorted) > prefix
    k_u = support.sum(dim=-1, keepdim=True).clamp_min(1)
    prefix_at_k = prefix.gather(-1, k_u - 1)
    tau = (prefix_at_k - 1.0 + lam) / k_u.to(u.dtype)
    return torch.relu(u - tau) / (1.0 - lam)


def sparsity_lower_bound(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Smallest lambda that keeps at most ``k`` experts active (LD-MoLE analytical bound).

    ``lower = 1 - (U_k - k u_(k+1))`` on detached scores; shape ``(..., 1)``. With
    ``k >= N`` every lambda keeps at most N experts, so the bound is ``-inf``.
    """
    u_sorted, prefix, _ = _sorted_prefix(upcast(logits.detach()))
    if k >= logits.shape[-1]:
        return torch.full_like(prefix[..., :1], float("-inf"))
    return 1.0 - (prefix[..., k - 1 : k] - k * u_sorted[..., k : k + 1])


class LambdaMLP(nn.Module):
    """Predicts the Sparsegen lambda per token: ``Linear(d, h) -> ReLU -> Linear(h, 1)``, then
    ``logsigmoid(.) + (1 - 1e-2)`` so that ``lambda < 1`` (LD-MoLE). Runs in fp32.

    ``bias_init``: a constant for both layers' biases (the LD-MoLE reference code uses -2.5,
    which starts lambda near ``logsigmoid(-2.5) + 0.99 = -1.6``: dense routing); None keeps
    ``nn.Linear``'s default init. The weights always get ``nn.Linear``'s default (kaiming-uniform,
    a = sqrt(5)), as in the reference."""

    def __init__(self, in_features: int, hidden: int = 256, bias_init: float | None = None) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"lambda MLP hidden size must be >= 1, got {hidden}")
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        if bias_init is not None:
            nn.init.constant_(self.fc1.bias, bias_init)
            nn.init.constant_(self.fc2.bias, bias_init)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc1(hidden_states.float()))

    def head(self, pre_activation: torch.Tensor) -> torch.Tensor:
        """lambda from ``fc1``'s output: what follows the first layer. ``MoLELinear`` computes
        ``fc1`` in the router's matmul (``gate_features``) and the gate function calls this."""
        return F.logsigmoid(self.fc2(F.relu(pre_activation))) + LAMBDA_CEILING

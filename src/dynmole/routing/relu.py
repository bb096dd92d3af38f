"""ReMoLE / ReMoE routing: ReLU gates whose sparsity an adaptive L1 penalty controls."""

from __future__ import annotations

import torch

from ..numerics import upcast


def relu(logits: torch.Tensor) -> torch.Tensor:
    """``g = relu(logits)`` (ReMoE). A token may get no expert at all."""
    return torch.relu(upcast(logits))


def update_l1_coefficient(
    coefficient: torch.Tensor, active_experts: torch.Tensor, target_active: float, rate: float = 1.2
) -> torch.Tensor:
    """ReMoE's adaptive L1 coefficient: ``c <- c * rate^sign(active - target)``.

    When tokens use more experts than the target the penalty grows; when fewer, it shrinks.
    Pure tensor arithmetic (no host sync), so it can run every training step.

    Args:
        coefficient: current L1 coefficient (a scalar tensor).
        active_experts: mean number of experts with a non-zero gate per token.
        target_active: the target mean number of active experts.
        rate: multiplicative step, > 1.
    """
    return coefficient * rate ** torch.sign(active_experts - target_active)

"""Routing measured as routing: per module, how the gate mass is spread over experts and how far it
depends on the token.

Notation: ``N`` experts; for token ``t`` the gate distribution ``g_t`` is the token's gate vector
divided by its sum (the mass each expert receives, as ``RoutingStats``'s load counts it); ``T``
valid (non-padding) tokens; ``H(p) = -sum_i p_i log p_i`` (Shannon, nats, ``0 log 0 = 0``).

* load ``m = (1 / T) sum_t g_t``, the mean gate;
* **busiest-expert share** ``max_i m_i`` (uniform: ``1 / N``; one expert takes everything: 1);
* **load entropy** ``H(m) / log N`` in ``[0, 1]`` (1: every expert carries the same load);
* **input dependence** ``I / log N`` in ``[0, 1]``, where ``I = H(m) - (1 / T) sum_t H(g_t)`` is the
  mutual information between the token (uniform over the ``T`` tokens) and the expert drawn from
  its gate distribution. ``I <= H(m) <= log N``, and ``I = log N`` exactly when every token sends
  all its mass to one expert and the experts are used equally, so ``log N`` is the one constant
  that maps both ends (0: every token routed alike; 1: a perfectly input-dependent, balanced
  router) to fixed values for every module and number of experts. Dividing by ``H(m)`` instead
  would give the share of the load's entropy that depends on the input, undefined for a
  collapsed router (``H(m) = 0``), which is the case these measures must name.

A collapsed router (every token to one expert) has busiest share 1, load entropy 0 and input
dependence 0; uniform soft gates have busiest share ``1 / N``, load entropy 1 and input dependence
0: per-token entropy and experts per token cannot tell these apart from specialisation, these can.

All three are functions of two sums over tokens that the device accumulates without a host sync
(:func:`gate_sums`): ``sum_t g_t`` (a vector of ``N``) and ``sum_t H(g_t)`` (a scalar), with ``T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .entropy import shannon_entropy

COLLAPSE_SHARE = 0.9
"""A module's router has **collapsed** when its busiest expert carries at least this share of the load."""
SPECIALISE_DEPENDENCE = 0.2
"""A module's router **specialises** when it has not collapsed and its input dependence is at least this
(a fifth of the ``log N`` maximum; uniform soft gates give 0, top-2 of 6 experts used equally gives 0.61)."""


def collapsed(busiest: float) -> bool:
    """Whether a module with this busiest-expert share has collapsed (:data:`COLLAPSE_SHARE`)."""
    return busiest >= COLLAPSE_SHARE


def specialises(busiest: float, dependence: float) -> bool:
    """Whether a module specialises: input-dependent routing that has not collapsed (:data:`SPECIALISE_DEPENDENCE`)."""
    return not collapsed(busiest) and dependence >= SPECIALISE_DEPENDENCE


@dataclass(frozen=True)
class RoutingMeasures:
    """One module's routing: busiest-expert share, load entropy and input dependence (see the
    module docstring for the formulas)."""

    busiest_share: float
    load_entropy: float
    input_dependence: float


def _entropy(p: np.ndarray) -> float:
    """Shannon entropy ``-sum p log p`` (nats) of a distribution, ``0 log 0 = 0``."""
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _distribution(load: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(load, dtype=float)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"a load vector needs one entry per expert and at least 2 experts, got shape {values.shape}")
    total = values.sum()
    if total <= 0 or (values < 0).any():
        raise ValueError("a load vector needs non-negative entries with a positive sum")
    return values / total


def busiest_share(load: Sequence[float] | np.ndarray) -> float:
    """``max_i m_i`` of the load ``m`` (``load`` normalised to sum 1)."""
    return float(_distribution(load).max())


def load_entropy(load: Sequence[float] | np.ndarray) -> float:
    """``H(m) / log N`` of the load ``m`` (``load`` normalised to sum 1), in ``[0, 1]``."""
    m = _distribution(load)
    return _entropy(m) / math.log(len(m))


def input_dependence(gate_sum: Sequence[float] | np.ndarray, entropy_sum: float, tokens: float) -> float:
    """``(H(m) - entropy_sum / tokens) / log N`` with ``m = gate_sum / tokens``: the mutual information
    between token and expert over its maximum ``log N``, in ``[0, 1]`` (clipped at 0 against float
    rounding where every token is routed alike)."""
    if tokens <= 0:
        raise ValueError("input dependence needs at least one token")
    m = _distribution(gate_sum)
    return max(0.0, (_entropy(m) - entropy_sum / tokens) / math.log(len(m)))


def routing_measures(gate_sum: Sequence[float] | np.ndarray, entropy_sum: float, tokens: float) -> RoutingMeasures:
    """The three measures of one module from its accumulated sums (:func:`gate_sums`)."""
    return RoutingMeasures(busiest_share(gate_sum), load_entropy(gate_sum),
                           input_dependence(gate_sum, entropy_sum, tokens))


@torch.no_grad()
def gate_sums(
    gates: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_t g_t, sum_t H(g_t), T)`` over the valid tokens of ``gates`` (``[..., N]``, non-negative;
    a token's gates need not sum to 1: they are normalised here) that carry gate mass (a ReMoLE
    token with every gate 0 has no distribution and adds to none of the three), as device tensors:
    adding them up batch after batch needs no host sync. ``valid`` (shape ``gates.shape[:-1]``, 1 for
    a real token, 0 for padding; default all 1) weights each token."""
    flat = gates.detach().float().reshape(-1, gates.shape[-1])
    weight = torch.ones(flat.shape[0], device=flat.device) if valid is None else valid.reshape(-1).float()
    mass = flat.sum(dim=-1, keepdim=True)
    g = flat / mass.clamp_min(1e-12)
    entropy = shannon_entropy(g, normalize=False)
    routed = weight * (mass.squeeze(-1) > 0)
    return (g * weight.unsqueeze(-1)).sum(dim=0), (entropy * weight).sum(), routed.sum()

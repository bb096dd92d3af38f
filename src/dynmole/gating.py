"""Build a layer's gate function from a :class:`MoLEConfig`: the one place that maps a method
name to its routing rule, so that :class:`~dynmole.layers.MoLELinear` never branches on it."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from . import routing
from .config import MoLEConfig
from .layers import GateFn, RouteResult


def _plain(rule, logits: torch.Tensor, hidden: torch.Tensor) -> RouteResult:
    return RouteResult(gates=rule(logits))


def _dynamic(config: MoLEConfig, logits: torch.Tensor, hidden: torch.Tensor) -> RouteResult:
    gates, soft_branch = routing.dynamic_route(
        logits,
        q=config.q,
        threshold=config.threshold if config.soft_routing else None,
        top_p=config.top_p,
        keep_top_k=config.keep_top_k,
        renormalize=config.renormalize,
        top_p_mode=config.top_p_mode,
        eps=config.entropy_eps,
    )
    return RouteResult(gates=gates, soft_branch=soft_branch)


def _sparsegen(lambda_mlp: nn.Module, logits: torch.Tensor, hidden: torch.Tensor) -> RouteResult:
    lam = lambda_mlp(hidden)
    return RouteResult(gates=routing.sparsegen(logits, lam), lam=lam)


def build_gate_fn(config: MoLEConfig, num_experts: int, lambda_mlp: nn.Module | None = None) -> GateFn:
    """The gate function of one adapted module with ``num_experts`` experts."""
    method = config.method
    if method == "loramoe":
        return partial(_plain, routing.soft)
    if method == "mola":
        return partial(_plain, partial(routing.top_k, k=config.top_k))
    if method == "topp":
        rule = partial(routing.top_p, p=config.top_p, mode=config.top_p_mode, renormalize=config.renormalize)
        return partial(_plain, rule)
    if method == "dynmole":
        return partial(_dynamic, config)
    if method == "remole":
        return partial(_plain, routing.relu)
    if method == "ldmole":
        if lambda_mlp is None:
            raise ValueError("ldmole needs a lambda MLP")
        return partial(_sparsegen, lambda_mlp)
    raise ValueError(f"unknown method {method!r}")

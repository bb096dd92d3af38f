"""Build a layer's gate function from a :class:`MoLEConfig`: the one place that maps a method
name to its routing rule, so that :class:`~dynmole.layers.MoLELinear` never branches on it."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from . import routing
from .config import MoLEConfig
from .layers import GateFn, RouteResult
from .routing import DynamicRouter, LambdaMLP


def _plain(rule: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor,
           features: torch.Tensor | None) -> RouteResult:
    return RouteResult(gates=rule(logits))


def _dynamic(router: DynamicRouter, logits: torch.Tensor, features: torch.Tensor | None) -> RouteResult:
    gates, soft_branch = router(logits)
    return RouteResult(gates=gates, soft_branch=soft_branch)


def _sparsegen(lambda_mlp: LambdaMLP, logits: torch.Tensor, features: torch.Tensor | None) -> RouteResult:
    if features is None:
        raise ValueError("ldmole's gate needs the lambda MLP's first layer as the layer's gate_features")
    lam = lambda_mlp.head(features)
    return RouteResult(gates=routing.sparsegen(logits, lam), lam=lam)


def build_gate_fn(config: MoLEConfig, num_experts: int, lambda_mlp: LambdaMLP | None = None) -> GateFn:
    """The gate function of one adapted module with ``num_experts`` experts. For ``ldmole`` the
    layer must get ``lambda_mlp.fc1`` as its ``gate_features``: the gate reads that layer's output."""
    method = config.method
    if method == "loramoe":
        return partial(_plain, routing.soft)
    if method == "mola":
        return partial(_plain, partial(routing.top_k, k=config.top_k))
    if method == "topp":
        rule = partial(routing.top_p, p=config.top_p, mode=config.top_p_mode, renormalize=config.renormalize)
        return partial(_plain, rule)
    if method == "dynmole":
        router = DynamicRouter(
            q=config.q,
            threshold=config.threshold if config.soft_routing else None,
            top_p=config.top_p,
            keep_top_k=config.keep_top_k,
            renormalize=config.renormalize,
            top_p_mode=config.top_p_mode,
            eps=config.entropy_eps,
        )
        return partial(_dynamic, router)
    if method == "remole":
        return partial(_plain, routing.relu)
    if method == "ldmole":
        if lambda_mlp is None:
            raise ValueError("ldmole needs a lambda MLP")
        return partial(_sparsegen, lambda_mlp)
    raise ValueError(f"unknown method {method!r}")

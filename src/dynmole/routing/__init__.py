"""Routing rules: pure functions from router logits ``(..., N)`` to dense gates ``(..., N)``.

Each rule returns fp32 gates with exact zeros for the experts it did not select.
"""

from .dynamic import DynamicRouter, dynamic, dynamic_route
from .relu import relu, update_l1_coefficient
from .soft import soft
from .sparsegen import LambdaMLP, sparsegen, sparsity_lower_bound
from .top_k import top_k, top_k_mask
from .top_p import top_p, top_p_mask

__all__ = [
    "DynamicRouter",
    "LambdaMLP",
    "dynamic",
    "dynamic_route",
    "relu",
    "soft",
    "sparsegen",
    "sparsity_lower_bound",
    "top_k",
    "top_k_mask",
    "top_p",
    "top_p_mask",
    "update_l1_coefficient",
]

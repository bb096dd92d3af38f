"""The MoLE linear layer: a frozen ``nn.Linear`` plus N stacked LoRA experts and a router.

``y = W0 x + scaling * sum_i g_i(x) B_i A_i dropout(x)`` (DynMoLE eq. 3-4), computed as two
matmuls with the gate applied in between: ``A`` stacks the experts' down-projections
(``N*r x d_in``), ``B`` their up-projections (``d_out x N*r``). No loop over experts and no
host-device sync: a routing rule only produces a dense gate vector with zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class RouteResult:
    """What a gate function returns: dense gates, and what the losses and statistics need."""

    gates: torch.Tensor
    soft_branch: torch.Tensor | None = None  # DynMoLE: True where the token was routed soft
    lam: torch.Tensor | None = None  # LD-MoLE: the Sparsegen lambda per token


GateFn = Callable[[torch.Tensor, torch.Tensor], RouteResult]
"""``gate_fn(router_logits, hidden_states) -> RouteResult``."""


@dataclass
class RoutingRecord:
    """One adapted module's routing in one forward pass, kept for the losses and statistics."""

    module: str
    logits: torch.Tensor
    route: RouteResult


class RoutingRecorder:
    """Collects the :class:`RoutingRecord` of every adapted module during one forward."""

    def __init__(self) -> None:
        self.active = False
        self.records: list[RoutingRecord] = []

    def take(self) -> list[RoutingRecord]:
        records, self.records = self.records, []
        return records


class MoLELinear(nn.Module):
    """A frozen linear layer with a mixture of ``num_experts`` LoRA experts of rank ``r``.

    Args:
        base_layer: the frozen ``nn.Linear`` (its weights are not copied).
        num_experts: N.
        r: rank of each expert.
        alpha: LoRA alpha; expert outputs are scaled by ``alpha / r``.
        dropout: dropout probability on the experts' input.
        gate_fn: turns fp32 router logits (and the hidden states, for LD-MoLE's lambda) into gates.
        name: the module's qualified name, used in routing records.
        recorder: shared collector of routing records, or None.
        router_init_std: std of a normal router init; None = ``nn.Linear``'s kaiming-uniform
            (a = sqrt(5), bound ``1/sqrt(d_in)``), which the MoE-PEFT, DynMoLE and LD-MoLE code use.
        router_dropout: feed the dropout-applied input (the one the experts see) to the router
            and the gate function (LD-MoLE's reference code); off = the input without dropout.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        r: int,
        alpha: float,
        dropout: float,
        gate_fn: GateFn,
        name: str = "",
        recorder: RoutingRecorder | None = None,
        router_init_std: float | None = 0.02,
        router_dropout: bool = False,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.base_layer = base_layer
        self.num_experts = num_experts
        self.r = r
        self.scaling = alpha / r
        self.name = name
        self.gate_fn = gate_fn
        self.recorder = recorder
        self.router_dropout = router_dropout
        d_in, d_out = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(num_experts * r, d_in, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, num_experts * r, device=device))
        self.router = nn.Parameter(torch.empty(num_experts, d_in, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if router_init_std is None:
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        else:
            nn.init.normal_(self.router, std=router_init_std)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``W_g x`` in fp32, outside any autocast region (the router is kept in fp32)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.router.float())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dropped = self.dropout(x)
        routed = dropped if self.router_dropout else x
        logits = self.router_logits(routed)
        route = self.gate_fn(logits, routed)
        hidden = F.linear(dropped.to(self.lora_A.dtype), self.lora_A)
        gates = (route.gates * self.scaling).to(hidden.dtype)
        hidden = (hidden.unflatten(-1, (self.num_experts, self.r)) * gates.unsqueeze(-1)).flatten(-2)
        delta = F.linear(hidden, self.lora_B)
        if self.recorder is not None and self.recorder.active:
            self.recorder.records.append(RoutingRecord(self.name, logits, route))
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r={self.r}, scaling={self.scaling:g}"

"""Peer MoLE layers for the benchmark, written by us (not used for training).

Both compute the same function as :class:`~dynmole.layers.MoLELinear` (frozen base plus
gate-weighted LoRA experts, router in fp32) but dispatch the experts the way other code does:

* :class:`PerExpertLoopMoLE` - the dispatch of the DynMoLE reference code / MoE-PEFT
  (``LoRAMoE``/``DynMoLE`` blocks): every expert ``i`` has its own LoRA ``A_i``, ``B_i`` and its
  own dropout, runs on *all* tokens in fp32, is scaled, multiplied by its gate column and
  added to the running result, one expert after the other.
* :class:`GatherTopKMoLE` - the MoLA / MixLoRA top-k dispatch: for each expert, gather the
  tokens routed to it (``nonzero`` on the gates, a host sync), run the expert on those rows
  only, weight them by their gate and ``index_add_`` them back.

They take the same ``gate_fn`` as ``MoLELinear`` so that only the dispatch differs (a rule
that reads no gate features: the peers run DynMoLE's and MoLA's).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import GateFn


class _PeerBase(nn.Module):
    def __init__(
        self, base_layer: nn.Linear, num_experts: int, r: int, alpha: float, dropout: float, gate_fn: GateFn,
        router_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_experts = num_experts
        self.r = r
        self.scaling = alpha / r
        self.gate_fn = gate_fn
        d_in, d_out = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        # Adapters and router in fp32, as in MoE-PEFT.
        self.router = nn.Linear(d_in, num_experts, bias=False, device=device, dtype=torch.float32)
        self.lora_a = nn.ModuleList(
            nn.Linear(d_in, r, bias=False, device=device, dtype=torch.float32) for _ in range(num_experts)
        )
        self.lora_b = nn.ModuleList(
            nn.Linear(r, d_out, bias=False, device=device, dtype=torch.float32) for _ in range(num_experts)
        )
        self.dropouts = nn.ModuleList(
            nn.Dropout(dropout) if dropout > 0 else nn.Identity() for _ in range(num_experts)
        )
        nn.init.normal_(self.router.weight, std=router_init_std)
        for a, b in zip(self.lora_a, self.lora_b):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    @torch.no_grad()
    def load_from(self, mole: nn.Module) -> "_PeerBase":
        """Copy the weights of a :class:`~dynmole.layers.MoLELinear` with the same shape."""
        r = self.r
        self.router.weight.copy_(mole.router)
        for i in range(self.num_experts):
            self.lora_a[i].weight.copy_(mole.lora_A[i * r : (i + 1) * r])
            self.lora_b[i].weight.copy_(mole.lora_B[:, i * r : (i + 1) * r])
        return self

    def _expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.lora_b[i](self.lora_a[i](self.dropouts[i](x))) * self.scaling


class PerExpertLoopMoLE(_PeerBase):
    """Peer (written by us): the per-expert loop of the DynMoLE reference code / MoE-PEFT."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.base_layer(x)
        logits = self.router(x.to(torch.float32))
        gates = self.gate_fn(logits, None).gates
        for i in range(self.num_experts):
            expert_out = self._expert(i, x.to(torch.float32))
            residual = residual + (gates[..., i].unsqueeze(-1) * expert_out).to(x.dtype)
        return residual


class GatherTopKMoLE(_PeerBase):
    """Peer (written by us): MoLA / MixLoRA gather + ``index_add_`` top-k dispatch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat.to(torch.float32))
        gates = self.gate_fn(logits, None).gates
        out = torch.zeros(flat.shape[0], result.shape[-1], device=x.device, dtype=torch.float32)
        for i in range(self.num_experts):
            index = torch.nonzero(gates[:, i] > 0).squeeze(-1)  # host sync, as in MixLoRA
            if index.numel() == 0:
                continue
            expert_out = self._expert(i, flat[index].to(torch.float32)) * gates[index, i].unsqueeze(-1)
            out.index_add_(0, index, expert_out)
        return result + out.view(result.shape).to(result.dtype)

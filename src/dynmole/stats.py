"""Routing statistics, accumulated on the device without host syncs and read on demand."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .entropy import tsallis_entropy
from .layers import RoutingRecord
from .losses import token_weights
from .routing_measures import gate_sums, routing_measures


@dataclass
class _ModuleTotals:
    tokens: torch.Tensor
    experts: torch.Tensor
    entropy: torch.Tensor
    soft: torch.Tensor
    high_entropy: torch.Tensor
    load: torch.Tensor  # sum over tokens of each token's gates normalised to sum 1
    gate_entropy: torch.Tensor  # sum over tokens of the Shannon entropy of those normalised gates
    routed: torch.Tensor  # tokens with any gate mass (ReMoLE's can have none)
    histogram: torch.Tensor  # tokens by number of active experts (0..N)


@dataclass
class RoutingStats:
    """Per adapted module: experts active per token, router entropy (normalised Shannon and
    Tsallis), share of tokens DynMoLE routed soft, and each expert's load (share of the gate
    mass), and from these the measures of :mod:`dynmole.routing_measures`: the busiest expert's
    load share, the load entropy and the input dependence of the gates. Padding tokens never count.

    ``high_entropy_fraction`` is the share of tokens whose normalised Tsallis entropy exceeds
    ``threshold`` (DynMoLE's soft-routing threshold, eq. 17), for every method: it says how far a
    router is from the regime where DynMoLE's sparse branch would fire."""

    q: float = 1.1
    threshold: float = 0.9
    eps: float = 0.0  # added to p inside the entropy, as DynMoLE's routing decision does (entropy_eps)
    totals: dict[str, _ModuleTotals] = field(default_factory=dict)

    def reset(self) -> None:
        self.totals.clear()

    @torch.no_grad()
    def update(self, records: Sequence[RoutingRecord], attention_mask: torch.Tensor | None) -> None:
        for record in records:
            valid = token_weights(record, attention_mask).reshape(-1)
            probs = torch.softmax(record.logits, dim=-1).reshape(-1, record.logits.shape[-1])
            gates = record.route.gates.detach().reshape(probs.shape)
            active = (gates > 0).sum(dim=-1)
            soft = record.route.soft_branch
            soft = soft.reshape(-1).float() if soft is not None else torch.zeros_like(valid)
            load, gate_entropy, routed = gate_sums(gates, valid)
            num_experts = probs.shape[-1]
            entropy = tsallis_entropy(probs, q=self.q, eps=self.eps)
            update = _ModuleTotals(
                tokens=valid.sum(),
                experts=(active.float() * valid).sum(),
                entropy=(entropy * valid).sum(),
                soft=(soft * valid).sum(),
                high_entropy=((entropy > self.threshold).float() * valid).sum(),
                load=load,
                gate_entropy=gate_entropy,
                routed=routed,
                histogram=torch.zeros(num_experts + 1, device=valid.device).index_add_(0, active, valid),
            )
            previous = self.totals.get(record.module)
            if previous is None:
                self.totals[record.module] = update
            else:
                for name in update.__dataclass_fields__:
                    setattr(previous, name, getattr(previous, name) + getattr(update, name))

    def summary(self) -> dict[str, dict]:
        """Per module: ``tokens``, ``mean_experts``, ``entropy``, ``soft_fraction``,
        ``high_entropy_fraction``, ``load`` (fractions summing to 1), ``busiest_share``,
        ``load_entropy``, ``input_dependence`` and ``experts_histogram``. This reads the device (one sync)."""
        out: dict[str, dict] = {}
        for module, t in self.totals.items():
            tokens = max(float(t.tokens), 1.0)
            load_total = max(float(t.load.sum()), 1e-12)
            out[module] = {
                "tokens": int(float(t.tokens)),
                "mean_experts": float(t.experts) / tokens,
                "entropy": float(t.entropy) / tokens,
                "soft_fraction": float(t.soft) / tokens,
                "high_entropy_fraction": float(t.high_entropy) / tokens,
                "load": [float(v) / load_total for v in t.load.tolist()],
                **_measures(t),
                "experts_histogram": [int(v) for v in t.histogram.tolist()],
            }
        return out


def _measures(totals: _ModuleTotals) -> dict[str, float | None]:
    """The module's :func:`~dynmole.routing_measures.routing_measures`; None where no token carried gate mass."""
    load = totals.load.tolist()
    if sum(load) <= 0 or len(load) < 2:
        return {"busiest_share": None, "load_entropy": None, "input_dependence": None}
    measures = routing_measures(load, float(totals.gate_entropy), float(totals.routed))
    return dataclasses.asdict(measures)

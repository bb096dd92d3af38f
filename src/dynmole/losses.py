"""Auxiliary losses of the MoLE methods.

Every function takes per-token tensors with leading dims flattened or not, and a per-token
weight ``valid`` (1 for real tokens, 0 for padding) of the same leading shape, so padding
never counts. Coefficients are applied by :func:`aux_losses`, which averages each loss over
all adapted modules of all layers. :func:`add_aux_to_outputs` joins their total to the model's
LM loss (a ``ModelOutput``, the tuple of ``return_dict=False``, or TRL's fused LM head's output).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.nn import functional as F

from .config import MoLEConfig
from .entropy import tsallis_entropy
from .layers import RoutingRecord
from .routing import sparsity_lower_bound


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (``(..., [N])``) over the tokens where ``valid`` (``(...)``) is 1."""
    weight = valid.to(values.dtype)
    if values.dim() > weight.dim():
        weight = weight.unsqueeze(-1)
        total = (values * weight).flatten(0, -2).sum(0)
    else:
        total = (values * weight).sum()
    return total / valid.sum().clamp_min(1).to(values.dtype)


def balance_statistics(
    probs: torch.Tensor, gates: torch.Tensor, valid: torch.Tensor, mode: str = "soft"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One module's load-balance sums ``(f_sum, f_count, P_sum, P_count)``, so that
    ``f_i = f_sum_i / f_count`` and ``P_i = P_sum_i / P_count``; sums of several modules' statistics
    give the statistics of their pooled tokens (see :func:`balance_from_statistics`).

    Modes: ``"soft"`` (DynMoLE code): ``f_i`` mean gate weight, ``P_i`` mean router probability;
    ``"switch"`` (Switch; Mixtral's loss on top-k routing): ``f_i`` fraction of tokens with a
    non-zero gate for i, ``P_i`` mean router probability; ``"ldmole"`` (LD-MoLE code): ``f_i``
    share of i among all (token, expert) activations, ``P_i`` mean gate weight. Real tokens only.
    """
    weight = valid.to(probs.dtype).unsqueeze(-1)
    tokens = valid.to(probs.dtype).sum()

    def per_expert(values: torch.Tensor) -> torch.Tensor:
        return (values * weight).flatten(0, -2).sum(0)

    if mode == "soft":
        return per_expert(gates), tokens, per_expert(probs), tokens
    hard = per_expert((gates > 0).to(probs.dtype))
    if mode == "switch":
        return hard, tokens, per_expert(probs), tokens
    if mode == "ldmole":
        return hard, hard.sum(), per_expert(gates), tokens
    raise ValueError(f"balance mode must be 'soft', 'switch' or 'ldmole', got {mode!r}")


def balance_from_statistics(
    f_sum: torch.Tensor, f_count: torch.Tensor, p_sum: torch.Tensor, p_count: torch.Tensor
) -> torch.Tensor:
    """``N * sum_i f_i P_i`` from :func:`balance_statistics` sums (counts clamped at 1)."""
    num_experts = f_sum.shape[-1]
    return num_experts * ((f_sum / f_count.clamp_min(1)) * (p_sum / p_count.clamp_min(1))).sum()


def load_balance_loss(
    probs: torch.Tensor, gates: torch.Tensor, valid: torch.Tensor, mode: str = "soft"
) -> torch.Tensor:
    """``N * sum_i f_i P_i`` of one module (DynMoLE eq. 20 without alpha; Fedus et al. 2022).

    ``P_i`` is the mean router probability of expert i over real tokens; ``f_i`` is the mean
    gate weight (``mode="soft"``, the DynMoLE reference code) or the fraction of tokens
    dispatched to i (``mode="switch"``; with several experts per token these sum to the mean
    number of experts); ``mode="ldmole"`` is the LD-MoLE code's variant (see
    :func:`balance_statistics`). Equals 1 when routing is perfectly balanced.
    """
    return balance_from_statistics(*balance_statistics(probs, gates, valid, mode))


def entropy_loss(probs: torch.Tensor, valid: torch.Tensor, q: float = 1.1, eps: float = 0.0) -> torch.Tensor:
    """Mean normalised Tsallis entropy of the router distribution (DynMoLE eq. 19 without beta);
    ``eps`` is added to ``p`` inside the entropy (the reference code uses 1e-5)."""
    return masked_mean(tsallis_entropy(probs, q=q, normalize=True, eps=eps), valid)


def sparsity_loss(logits: torch.Tensor, lam: torch.Tensor, valid: torch.Tensor, k: int = 2) -> torch.Tensor:
    """LD-MoLE sparsity loss ``mean(relu(lower - lambda))``, where ``lower`` is the smallest
    lambda keeping at most ``k`` experts active (computed on detached scores)."""
    lower = sparsity_lower_bound(logits, k)
    return masked_mean(F.relu(lower - lam.float()).squeeze(-1), valid)


def l1_loss(gates: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """ReMoE's L1 penalty: mean over tokens of ``sum_i g_i`` (gates are >= 0)."""
    return masked_mean(gates.sum(dim=-1), valid)


def active_experts(gates: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean number of experts with a non-zero gate per real token."""
    return masked_mean((gates > 0).sum(dim=-1).to(torch.float32), valid)


def token_weights(record: RoutingRecord, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """1/0 weights for the tokens of ``record`` from the model's attention mask.

    The router sees hidden states ``(B, T, d)``; with a KV cache the mask covers past tokens
    too, so its last ``T`` columns are used. Without a mask every token counts.
    """
    leading = record.logits.shape[:-1]
    if attention_mask is None:
        return torch.ones(leading, device=record.logits.device)
    mask = attention_mask[..., -leading[-1] :] if len(leading) > 1 else attention_mask.reshape(-1)
    return mask.reshape(leading).to(device=record.logits.device, dtype=torch.float32)


def aux_losses(
    records: Sequence[RoutingRecord],
    attention_mask: torch.Tensor | None,
    config: MoLEConfig,
    l1_coefficient: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All auxiliary losses of ``config.method`` over ``records`` (one per adapted module).

    Each loss is averaged over modules, then multiplied by its coefficient. The load balance
    follows ``config.balance_pooled``: pooled, one ``f . P`` over all modules' tokens (modules
    with different expert counts are pooled per count, and the groups weighted by their number
    of modules), or one loss per module, averaged. Returns a dict with the parts that apply
    (``balance``, ``entropy``, ``sparsity``, ``l1``) and their ``total``; also ``active_experts``
    (detached, for the ReMoLE coefficient update and logging).
    """
    if not records:
        raise ValueError("no routing records: run a forward pass in training mode first")
    sums: dict[str, torch.Tensor] = {}
    pooled: dict[int, tuple[int, list[torch.Tensor]]] = {}  # expert count -> (modules, summed statistics)
    balance_weight, balance_rule = config.balance_weight, config.balance_rule

    def add(name: str, value: torch.Tensor) -> None:
        sums[name] = sums[name] + value if name in sums else value

    for record in records:
        valid = token_weights(record, attention_mask)
        probs = torch.softmax(record.logits, dim=-1)
        gates = record.route.gates
        if balance_weight > 0:
            statistics = balance_statistics(probs, gates, valid, balance_rule)
            if not config.balance_pooled:
                add("balance", balance_from_statistics(*statistics))
            else:
                count, previous = pooled.get(probs.shape[-1], (0, None))
                summed = statistics if previous is None else [a + b for a, b in zip(previous, statistics)]
                pooled[probs.shape[-1]] = (count + 1, list(summed))
        if config.entropy_weight:
            add("entropy", entropy_loss(probs, valid, config.q, config.entropy_eps))
        if record.route.lam is not None and config.sparsity_coef > 0:
            add("sparsity", sparsity_loss(record.logits, record.route.lam, valid, config.sparsity_k))
        if l1_coefficient is not None:
            add("l1", l1_loss(gates, valid))
        add("active_experts", active_experts(gates.detach(), valid))
    for count, statistics in pooled.values():
        add("balance", count * balance_from_statistics(*statistics))
    coefficients = {
        "balance": balance_weight,
        "entropy": config.entropy_weight,
        "sparsity": config.sparsity_coef,
        "l1": l1_coefficient,
    }
    count = len(records)
    parts = {name: coefficients[name] * total / count for name, total in sums.items() if name in coefficients}
    zero = records[0].logits.new_zeros(())
    losses = dict(parts, total=sum(parts.values(), zero))
    losses["active_experts"] = sums["active_experts"] / count
    return losses


# ------------------------------------------------------------ joining the LM loss
def loss_share(kwargs: dict[str, Any], like: torch.Tensor) -> torch.Tensor | float:
    """This micro-batch's share of the optimizer step's answer tokens, ``count / num_items_in_batch``,
    when the forward got ``num_items_in_batch`` and labels (else 1).

    The count is taken as transformers' ``ForCausalLMLoss`` sums (and the ``Trainer`` counts): the
    tokens of ``shift_labels`` when given, else of ``labels[..., 1:]``, that are not ``-100``. A
    device-side division (no host sync); a step with no answer tokens gives a share of 0.
    """
    items = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None and kwargs.get("labels") is not None:
        labels = kwargs["labels"][..., 1:]
    if items is None or labels is None:
        return 1.0
    count = labels.ne(-100).sum().to(like.device, like.dtype)
    if torch.is_tensor(items):
        return count / items.to(like.device, like.dtype).clamp_min(1)
    return count / max(items, 1)


def has_labels(kwargs: dict[str, Any]) -> bool:
    return kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None


def add_aux_to_outputs(outputs: Any, aux: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    """``outputs`` with the aux loss added to its loss, weighted by :func:`loss_share`.

    A ``ModelOutput`` gets it in ``loss``; the tuple of ``return_dict=False`` in its first element,
    which transformers makes the loss when labels are given (a tuple is rebuilt, so use the return value).

    TRL's fused LM head (``add_fused_lm_head``, which TRL's trainers put on the model) returns a
    ``FusedCausalLMOutput`` whose ``log_probs`` the trainer turns into its loss,
    ``-sum(log_probs) / n`` with ``n`` the answer tokens of the micro-batch or of the step; there the
    aux loss is also subtracted from every answer position's log-probability, which adds it to that
    loss with the same weight, ``answer tokens / n``, and keeps ``loss == -sum(log_probs) / n``.
    """
    if isinstance(outputs, tuple):
        if outputs and has_labels(kwargs) and torch.is_tensor(outputs[0]) and outputs[0].dim() == 0:
            return (outputs[0] + aux * loss_share(kwargs, aux), *outputs[1:])
        return outputs
    if getattr(outputs, "loss", None) is not None:
        outputs.loss = outputs.loss + aux * loss_share(kwargs, aux)
    log_probs, mask = getattr(outputs, "log_probs", None), getattr(outputs, "label_mask", None)
    if log_probs is not None and mask is not None:
        outputs.log_probs = log_probs - aux.to(log_probs.dtype) * mask
    return outputs

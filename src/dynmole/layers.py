"""The MoLE linear layer: a frozen ``nn.Linear`` plus N stacked LoRA experts and a router.

``y = W0 x + scaling * sum_i g_i(x) B_i A_i dropout(x)`` (DynMoLE eqs. 3-4), computed as two
matmuls with the gate applied in between: ``A`` stacks the experts' down-projections
(``N*r x d_in``), ``B`` their up-projections (``d_out x N*r``). No loop over experts and no
host-device sync: a routing rule only produces a dense gate vector with zeros.

The router ``W_g`` (``N x d_in``), a gate's own linear map of the router's input (LD-MoLE's
lambda-MLP first layer ``W_f``, the layer's ``gate_features``) and ``A`` all multiply the layer's
input. When they read the same tensor in the same dtype (the router sees the dropout-applied
input, or no dropout is active, as at inference; no autocast or an fp32 autocast) they run as
**one matmul** with ``[W_g; W_f; A]`` stacked at forward time (``torch.cat`` of the separate
parameters: the saved adapter, the state-dict keys and the optimizer's parameter groups stay as
they are); otherwise as one matmul for the router side and one for the experts.

Memory: :class:`_AdapterInput` saves only the layer's input and the one-byte dropout mask for
backward and recomputes ``dropout(x)`` from them, instead of autograd keeping ``x`` (the
router's weight gradient) and ``dropout(x)`` (the experts') side by side.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from .numerics import no_autocast, upcast_dtype


@dataclass
class RouteResult:
    """What a gate function returns: dense gates, and what the losses and statistics need."""

    gates: torch.Tensor
    soft_branch: torch.Tensor | None = None  # DynMoLE: True where the token was routed soft
    lam: torch.Tensor | None = None  # LD-MoLE: the Sparsegen lambda per token


GateFn = Callable[[torch.Tensor, torch.Tensor | None], RouteResult]
"""``gate_fn(router_logits, features) -> RouteResult``: ``router_logits`` in at least fp32;
``features`` the output of the layer's ``gate_features`` on the router's input, or None."""


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


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask of inverted dropout at rate ``p`` for ``x``: True with probability ``1 - p``,
    one byte per element."""
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)


def _noise(mask: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Inverted dropout's multiplier ``mask / (1 - p)`` in ``dtype``, so that ``dropout(x) = x * noise``
    (the same bits in forward and backward). The mask is read as uint8, whose conversion to a float
    dtype is vectorised on the CPU (a bool mask in a float product takes a path several times slower)."""
    return mask.view(torch.uint8).to(dtype).mul_(scale)


Block = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias) of one block of rows
Group = tuple[bool, torch.dtype, list[int]]  # (reads dropout(x), dtype, block indices): one matmul


def _groups(rows: Sequence[int], tokens: int, mask: torch.Tensor | None, router_dropout: bool,
            router_dtype: torch.dtype, expert_dtype: torch.dtype, held: bool = False) -> list[Group]:
    """The matmuls of the adapter's input side, for blocks of ``rows`` rows each: all but the last
    are the router's side (``W_g``, then ``W_f`` if any), in ``router_dtype`` on ``x`` or
    ``dropout(x)``; the last is ``A``, in ``expert_dtype`` on ``dropout(x)``.

    Blocks that read the same tensor in the same dtype share one matmul over their concatenated
    weights when that pays: when the stacked weight is ``held`` already, or when the ``tokens``
    are at least its rows (the concatenation copies ``sum(rows) x d_in`` values, each separate
    matmul re-reads the ``tokens x d_in`` input). Otherwise one matmul per block: for a single
    token, concatenating the weights would cost as much as the matmuls it saves."""
    experts_dropped = mask is not None
    keys = [(experts_dropped and router_dropout, router_dtype)] * (len(rows) - 1) + [(experts_dropped, expert_dtype)]
    stack = held or tokens >= sum(rows)
    groups: list[Group] = []
    for index, key in enumerate(keys):
        if stack and groups and (groups[-1][0], groups[-1][1]) == key:
            groups[-1][2].append(index)
        else:
            groups.append((key[0], key[1], [index]))
    return groups


def _stack(blocks: Sequence[Block], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The blocks' rows stacked in ``dtype`` and their bias (zeros for blocks without one, None
    when no block has one); a single block as it is."""
    weights = [w if w.dtype == dtype else w.to(dtype) for w, _ in blocks]
    biases = [b for _, b in blocks]
    if len(blocks) == 1:
        return weights[0], biases[0] if biases[0] is None or biases[0].dtype == dtype else biases[0].to(dtype)
    if all(b is None for b in biases):
        return torch.cat(weights), None
    filled = [w.new_zeros(w.shape[0]) if b is None else b for (w, _), b in zip(blocks, biases)]
    return torch.cat(weights), torch.cat(filled).to(dtype)


def _project(x: torch.Tensor, mask: torch.Tensor | None, scale: float, groups: list[Group],
             blocks: Sequence[Block], stacked: tuple[torch.Tensor, torch.Tensor | None] | None = None,
             ) -> list[torch.Tensor]:
    """Every block's output (``input @ W.T + b``), one matmul per group; ``stacked`` is the one
    group's stacked weight and bias when the caller holds it already."""
    dropped = x if mask is None else x * _noise(mask, scale, x.dtype)
    outputs = []
    for reads_dropped, dtype, indices in groups:
        inputs = dropped if reads_dropped else x
        weight, bias = stacked or _stack([blocks[i] for i in indices], dtype)
        out = F.linear(inputs if inputs.dtype == dtype else inputs.to(dtype), weight, bias)
        outputs += out.split([blocks[i][0].shape[0] for i in indices], dim=-1) if len(indices) > 1 else [out]
    return outputs


class _AdapterInput(torch.autograd.Function):
    """The router logits, the gate features and the experts' down-projection ``A dropout(x)``
    (DynMoLE eqs. 3-4; ``W_f`` is LD-MoLE's lambda-MLP first layer), saving for backward only
    ``x`` and the dropout keep-mask (one byte per element), from which backward recomputes
    ``dropout(x)``. Gradients go to ``W_g``, ``A``, ``W_f`` and ``b_f`` separately; with stacked
    blocks, one matmul gives all their weight gradients and one the input gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor | None, scale: float, router_dropout: bool,
                expert_dtype: torch.dtype, router: torch.Tensor, lora_A: torch.Tensor,
                feature_weight: torch.Tensor | None, feature_bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        blocks = _blocks(router, lora_A, feature_weight, feature_bias)
        groups = _groups([w.shape[0] for w, _ in blocks], x.numel() // x.shape[-1], mask, router_dropout,
                         upcast_dtype(x.dtype), expert_dtype)
        with no_autocast(x.device.type):
            outputs = _project(x, mask, scale, groups, blocks)
        ctx.save_for_backward(x, mask, router, lora_A, feature_weight, feature_bias)
        ctx.scale, ctx.groups = scale, groups
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mask, router, lora_A, feature_weight, feature_bias = ctx.saved_tensors
        blocks = _blocks(router, lora_A, feature_weight, feature_bias)
        needs = ctx.needs_input_grad
        # needs_input_grad of each block's (weight, bias), in the order of _blocks
        block_needs = [(needs[5], False)] + ([(needs[7], needs[8])] if feature_weight is not None else []) + [
            (needs[6], False)]
        block_grads: list[list[torch.Tensor | None]] = [[None, None] for _ in blocks]
        input_grads: dict[bool, torch.Tensor] = {}
        with no_autocast(x.device.type):
            noise = None if mask is None else _noise(mask, ctx.scale, x.dtype)
            dropped = x if noise is None else x * noise
            for reads_dropped, dtype, indices in ctx.groups:
                inputs = dropped if reads_dropped else x
                out_grads = [grads[i] if grads[i].dtype == dtype else grads[i].to(dtype) for i in indices]
                grad = out_grads[0] if len(indices) == 1 else torch.cat(out_grads, dim=-1)
                weight, _ = _stack([blocks[i] for i in indices], dtype)
                if any(block_needs[i][0] for i in indices):
                    flat_inputs = inputs.reshape(-1, inputs.shape[-1])
                    weight_grad = grad.reshape(-1, grad.shape[-1]).T @ (
                        flat_inputs if flat_inputs.dtype == dtype else flat_inputs.to(dtype))
                    for i, part in zip(indices, weight_grad.split([blocks[i][0].shape[0] for i in indices])):
                        block_grads[i][0] = part.to(blocks[i][0].dtype) if block_needs[i][0] else None
                for i, out_grad in zip(indices, out_grads):
                    if block_needs[i][1]:
                        block_grads[i][1] = out_grad.reshape(-1, out_grad.shape[-1]).sum(0).to(blocks[i][1].dtype)
                if needs[0]:
                    part = (grad @ weight).to(x.dtype)
                    earlier = input_grads.get(reads_dropped)
                    input_grads[reads_dropped] = part if earlier is None else part + earlier
            grad_x = input_grads.get(False)  # None when x needs no gradient
            if True in input_grads:  # through the dropout: times its multiplier
                through = input_grads[True]
                grad_x = through * noise if grad_x is None else torch.addcmul(grad_x, through, noise)
        router_grad, *feature_grads, a_grad = block_grads
        feature_weight_grad, feature_bias_grad = feature_grads[0] if feature_grads else (None, None)
        return grad_x, None, None, None, None, router_grad[0], a_grad[0], feature_weight_grad, feature_bias_grad


def _blocks(router: torch.Tensor, lora_A: torch.Tensor, feature_weight: torch.Tensor | None,
            feature_bias: torch.Tensor | None) -> list[Block]:
    """The row blocks of the input side, in stacking order: ``W_g``, ``W_f`` (with ``b_f``) if any, ``A``."""
    features = [(feature_weight, feature_bias)] if feature_weight is not None else []
    return [(router, None), *features, (lora_A, None)]


class MoLELinear(nn.Module, BaseTunerLayer):
    """A frozen linear layer with a mixture of ``num_experts`` LoRA experts of rank ``r``.

    It is PEFT's tuner layer of the ``DYNMOLE`` method (see :class:`dynmole.model.MoLEModel`), with
    one adapter: PEFT finds the adapter's weights by structure (everything but ``base_layer``), and
    ``PeftModel.disable_adapter()`` leaves only the base layer.

    Args:
        base_layer: the frozen ``nn.Linear`` (its weights are not copied).
        num_experts: N.
        r: rank of each expert.
        alpha: LoRA alpha; expert outputs are scaled by ``alpha / r``.
        dropout: dropout probability on the experts' input.
        gate_fn: turns the router logits (and ``gate_features``' output) into gates.
        name: the module's qualified name, used in routing records.
        recorder: shared collector of routing records, or None.
        router_init_std: std of a normal router init; None = ``nn.Linear``'s kaiming-uniform
            (a = sqrt(5), bound ``1/sqrt(d_in)``), which the MoE-PEFT, DynMoLE and LD-MoLE code use.
        router_dropout: feed the dropout-applied input (the one the experts see) to the router
            and ``gate_features`` (LD-MoLE's reference code); off = the input without dropout.
        gate_features: a linear map of the router's input whose output ``gate_fn`` gets as its
            second argument (LD-MoLE's lambda-MLP first layer); it runs in the router's matmul
            and dtype. Not registered here: its owner (the model's shared ``lambda_mlps``, or the
            layer's ``lambda_mlp``) holds it, so the state-dict keys do not depend on it.

    The router runs in at least fp32 (fp32 for fp32/bf16/fp16 inputs) outside autocast; the
    experts' ``A`` in its own dtype, or autocast's where autocast is on.
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
        gate_features: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer
        self.num_experts = num_experts
        self.r = r
        self.scaling = alpha / r
        self.name = name
        self.gate_fn = gate_fn
        self.recorder = recorder
        self.router_dropout = router_dropout
        self.dropout = dropout
        self.__dict__["gate_features"] = gate_features  # unregistered, see the docstring
        # {dtype: (stacked weight, bias)} while stacked weights are reused (reuse_stacked_weights)
        self.stacked_memo: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        d_in, d_out = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
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

    def _expert_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of ``A``'s matmul: autocast's where it is on (as ``F.linear`` would), else ``A``'s."""
        dtype = self.lora_A.dtype
        if dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return dtype

    def adapter_input(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(router logits, gate features or None, A dropout(x))`` for input ``x`` and the
        dropout keep-mask ``mask`` (None: no dropout)."""
        features = self.gate_features
        feature_weight, feature_bias = (None, None) if features is None else (features.weight, features.bias)
        expert_dtype = self._expert_dtype(x)
        scale = 1.0 / (1.0 - self.dropout)
        if torch.is_grad_enabled():
            outputs = _AdapterInput.apply(x, mask, scale, self.router_dropout, expert_dtype, self.router,
                                          self.lora_A, feature_weight, feature_bias)
        else:  # no autograd: the same matmuls, and a stacked weight reused while the memo is on
            blocks = _blocks(self.router, self.lora_A, feature_weight, feature_bias)
            groups = _groups([w.shape[0] for w, _ in blocks], x.numel() // x.shape[-1], mask, self.router_dropout,
                             upcast_dtype(x.dtype), expert_dtype, held=self.stacked_memo is not None)
            stacked = None
            if self.stacked_memo is not None and len(groups) == 1:
                dtype = groups[0][1]
                stacked = self.stacked_memo.get(dtype)
                if stacked is None:
                    stacked = self.stacked_memo[dtype] = _stack(blocks, dtype)
            with no_autocast(x.device.type):
                outputs = _project(x, mask, scale, groups, blocks, stacked)
        logits, *features_out, hidden = outputs
        return logits, (features_out[0] if features_out else None), hidden

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        mask = dropout_mask(x, self.dropout) if self.training and self.dropout > 0 else None
        logits, features, hidden = self.adapter_input(x, mask)
        route = self.gate_fn(logits, features)
        gates = route.gates * self.scaling
        if gates.dtype != hidden.dtype:
            gates = gates.to(hidden.dtype)
        hidden = (hidden.unflatten(-1, (self.num_experts, self.r)) * gates.unsqueeze(-1)).flatten(-2)
        delta = F.linear(hidden, self.lora_B)
        if self.recorder is not None and self.recorder.active:
            self.recorder.records.append(RoutingRecord(self.name, logits, route))
        return result + (delta if delta.dtype == result.dtype else delta.to(result.dtype))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r={self.r}, scaling={self.scaling:g}, dropout={self.dropout:g}"


@contextlib.contextmanager
def reuse_stacked_weights(layers: Iterable[MoLELinear]) -> Iterator[None]:
    """Within this block, a no-grad forward of each of ``layers`` stacks ``[W_g; W_f; A]`` once
    (per dtype) and reuses it, instead of concatenating the parameters on every call: for
    generation, where each forward is one token and the concatenation would cost as much as the
    matmul it saves. The adapter's weights must not change inside the block."""
    layers = list(layers)
    previous = [layer.stacked_memo for layer in layers]
    for layer in layers:
        if layer.stacked_memo is None:
            layer.stacked_memo = {}
    try:
        yield
    finally:
        for layer, memo in zip(layers, previous):
            layer.stacked_memo = memo

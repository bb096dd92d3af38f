"""Inject MoLE layers into a HF causal LM, collect aux losses and routing stats, save/load.

This is the only module that walks a HF model.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import distributed as dist
from torch import nn

from . import __version__
from .config import MoLEConfig
from .gating import build_gate_fn
from .io import atomic_write
from .layers import MoLELinear, RoutingRecorder
from .losses import aux_losses
from .routing import LambdaMLP, update_l1_coefficient
from .stats import RoutingStats

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(f".{name}.")
    return int(match.group(1)) if match else None


def _num_layers(model: nn.Module, names: list[str]) -> int:
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) if config is not None else None
    if layers is None and hasattr(config, "get_text_config"):
        layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    indices = [i for i in map(_layer_index, names) if i is not None]
    return int(layers) if layers else (max(indices) + 1 if indices else 1)


def _loss_share(kwargs: dict[str, Any], like: torch.Tensor) -> torch.Tensor | float:
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


class MoLEModel(nn.Module):
    """A HF causal LM whose target linear layers are :class:`MoLELinear`.

    ``forward`` accepts what the base model accepts; when labels are given in training mode the
    returned ``loss`` is the LM loss plus the method's auxiliary losses, and
    ``last_aux_losses`` holds each part (tensors, for logging). Attributes not found here are
    looked up on the base model, as PEFT's ``PeftModel`` does.

    Gradient accumulation: when the caller passes ``num_items_in_batch`` (the answer tokens of the
    whole optimizer step, as the HF ``Trainer``, TRL's ``SFTTrainer`` and transformers' recipe for
    accelerate loops do), the LM loss is a sum over this micro-batch's tokens divided by that count
    and the caller neither divides it by the accumulation steps nor leaves it per process. The aux
    loss is then weighted by the same share, ``this micro-batch's answer tokens / num_items_in_batch``
    (:func:`_loss_share`), so whatever the caller does to the LM loss (multiplying it by the number
    of processes, DDP averaging) it does alike to the aux loss: per optimizer step the aux loss is
    the answer-token-weighted mean over micro-batches (and processes), which is the plain mean of
    ``MoLETrainer`` when the micro-batches hold equally many answer tokens (the forward cannot
    know the accumulation steps or the process count that plain mean needs). Without
    ``num_items_in_batch`` the loss is the micro-batch's (LM mean + aux), as in a loop of your own
    that divides it by the accumulation steps.

    The new layers start in the mode (train/eval) of the model they wrap. ReMoLE's L1
    coefficient changes only in :meth:`update_remole_coefficient`, once per optimizer step
    (``MoLETrainer`` calls it; a loop of your own calls it after ``optimizer.step()``).
    """

    def __init__(self, model: nn.Module, config: MoLEConfig) -> None:
        super().__init__()
        self.base_model = model
        self.mole_config = config
        self.recorder = RoutingRecorder()
        self.stats = RoutingStats(q=config.q, threshold=config.threshold, eps=config.entropy_eps)
        self.stats_enabled = False
        self.last_aux_losses: dict[str, torch.Tensor] = {}
        # When False, the aux total is left in ``pending_aux_loss`` for a trainer to add with its
        # own scaling (the HF Trainer rescales the LM loss for token-averaging across devices).
        self.aux_in_loss = True
        self.pending_aux_loss: torch.Tensor | None = None
        self.lambda_mlps = nn.ModuleDict()
        self.register_buffer(
            "relu_l1_coef", torch.tensor(config.relu_l1_init) if config.method == "remole" else None
        )
        # ReMoLE: sum of the active-expert statistic over the micro-batches since the last update.
        self._remole_active_sum: torch.Tensor | None = None
        self._remole_micro_batches = 0
        for param in model.parameters():
            param.requires_grad_(False)
        self._inject()
        self._set_new_modules_mode(model.training)

    # ---------------------------------------------------------------- injection
    def _targets(self) -> list[tuple[str, nn.Linear]]:
        wanted = set(self.mole_config.target_modules)
        linears = [(n, m) for n, m in self.base_model.named_modules() if isinstance(m, nn.Linear)]
        found = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in wanted]
        missing = wanted - {n.rsplit(".", 1)[-1] for n, _ in found}
        if not found or missing:
            available = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
            raise ValueError(
                f"target module(s) {sorted(missing or wanted)} not found in the model; "
                f"its linear modules are: {', '.join(available)}"
            )
        return found

    def _lambda_mlp(self, in_features: int) -> LambdaMLP:
        config = self.mole_config
        device = self.base_model.get_input_embeddings().weight.device if hasattr(
            self.base_model, "get_input_embeddings"
        ) else None
        if not config.lambda_shared:
            return LambdaMLP(in_features, config.lambda_hidden, config.lambda_bias_init).to(device)
        key = str(in_features)
        if key not in self.lambda_mlps:
            self.lambda_mlps[key] = LambdaMLP(in_features, config.lambda_hidden, config.lambda_bias_init).to(device)
        return self.lambda_mlps[key]

    def _inject(self) -> None:
        config = self.mole_config
        targets = self._targets()
        num_layers = _num_layers(self.base_model, [n for n, _ in targets])
        for name, linear in targets:
            num_experts = config.experts_for_layer(_layer_index(name), num_layers)
            lambda_mlp = self._lambda_mlp(linear.in_features) if config.method == "ldmole" else None
            layer = MoLELinear(
                linear,
                num_experts=num_experts,
                r=config.r,
                alpha=config.alpha,
                dropout=config.dropout,
                gate_fn=build_gate_fn(config, num_experts, lambda_mlp),
                name=name,
                recorder=self.recorder,
                router_init_std=config.router_init,
                router_dropout=config.router_sees_dropout,
            )
            if lambda_mlp is not None and not config.lambda_shared:
                layer.lambda_mlp = lambda_mlp
            parent_name, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent_name) if parent_name else self.base_model, child, layer)

    def _set_new_modules_mode(self, mode: bool) -> None:
        """Put the wrapper, the MoLE layers and the lambda MLPs (not the base layers) in ``mode``."""
        self.training = mode
        for layer in self.mole_layers():
            base_mode = layer.base_layer.training
            layer.train(mode)
            layer.base_layer.train(base_mode)
        self.lambda_mlps.train(mode)

    def mole_layers(self) -> Iterator[MoLELinear]:
        return (m for m in self.base_model.modules() if isinstance(m, MoLELinear))

    def get_base_model(self) -> nn.Module:
        """The wrapped HF model (with the MoLE layers in it), as PEFT's ``PeftModel.get_base_model``."""
        return self.base_model

    # ---------------------------------------------------------------- forward
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        attention_mask = kwargs.get("attention_mask")
        want_aux = self.training and torch.is_grad_enabled()
        self.recorder.active = want_aux or self.stats_enabled
        try:
            outputs = self.base_model(*args, **kwargs)
        finally:
            self.recorder.active = False
        records = self.recorder.take()
        if self.stats_enabled and records:
            self.stats.update(records, attention_mask)
        if want_aux and records:
            l1_coefficient = self.relu_l1_coef.clone() if self.relu_l1_coef is not None else None
            losses = aux_losses(records, attention_mask, self.mole_config, l1_coefficient)
            self.last_aux_losses = {k: v.detach() for k, v in losses.items()}
            if self.relu_l1_coef is not None:
                active = losses["active_experts"].detach()
                self._remole_active_sum = active if self._remole_active_sum is None else self._remole_active_sum + active
                self._remole_micro_batches += 1
            if not self.aux_in_loss:
                self.pending_aux_loss = losses["total"]
            elif getattr(outputs, "loss", None) is not None:
                outputs.loss = outputs.loss + losses["total"] * _loss_share(kwargs, losses["total"])
        return outputs

    @torch.no_grad()
    def update_remole_coefficient(self) -> None:
        """ReMoLE: update the adaptive L1 coefficient once, ``c <- c * rate^sign(mean - target)``,
        from the mean active-expert count of the training forwards since the last call.

        Call it once per optimizer step, after ``optimizer.step()`` (``MoLETrainer`` does, through
        :class:`~dynmole.train.ReMoLECoefficientCallback`); with gradient accumulation the mean
        covers every micro-batch of the step. When ``torch.distributed`` is initialised the
        statistic is all-reduced (every rank must call this), so all ranks apply the same update.
        No host-device sync; a no-op for other methods, or when no training forward ran.
        """
        coefficient = self.relu_l1_coef
        if coefficient is None:
            return
        total = self._remole_active_sum if self._remole_active_sum is not None else coefficient.new_zeros(())
        stats = torch.stack([total.to(coefficient.device, torch.float32),
                             coefficient.new_tensor(float(self._remole_micro_batches), dtype=torch.float32)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        mean = stats[0] / stats[1].clamp_min(1.0)
        config = self.mole_config
        updated = update_l1_coefficient(coefficient, mean, config.relu_target_k, config.relu_l1_rate)
        coefficient.copy_(torch.where(stats[1] > 0, updated, coefficient))
        self._remole_active_sum, self._remole_micro_batches = None, 0

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Enable the base model's checkpointing, non-reentrant by default: the reentrant variant
        runs the first forward without grad, which would cut the aux losses off the router."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ---------------------------------------------------------------- statistics
    @contextmanager
    def collect_routing_stats(self, reset: bool = True) -> Iterator[RoutingStats]:
        """Within this block every forward adds to ``self.stats`` (read with ``.summary()``)."""
        if reset:
            self.stats.reset()
        previous, self.stats_enabled = self.stats_enabled, True
        try:
            yield self.stats
        finally:
            self.stats_enabled = previous

    # ---------------------------------------------------------------- parameters
    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights only (experts, routers, lambda MLPs, ReMoLE coefficient)."""
        state = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                state[name.removeprefix("base_model.")] = param.detach()
        if self.relu_l1_coef is not None:
            state["relu_l1_coef"] = self.relu_l1_coef.detach()
        return state

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, save_directory: str | Path, **_: Any) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter weights only)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        base_name = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        self.mole_config.save(
            directory / CONFIG_NAME, base_model_name_or_path=base_name, dynmole_version=__version__
        )

    def load_adapter_weights(self, path: str | Path) -> None:
        """Load ``adapter_model.safetensors`` into this model, with a clear error on any mismatch."""
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"cannot read adapter weights {path}: the file is corrupted or truncated ({err})") from None
        own = self.adapter_state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(
                f"adapter {path} does not fit this base model: {len(missing)} missing key(s) "
                f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}"
            )
        for key, tensor in state.items():
            if tensor.shape != own[key].shape:
                raise ValueError(
                    f"adapter {path} does not fit this base model: {key} has shape {tuple(tensor.shape)} "
                    f"in the file but {tuple(own[key].shape)} here"
                )
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor)  # adapter_state_dict() shares storage with the parameters

def get_mole_model(model: nn.Module, config: MoLEConfig) -> MoLEModel:
    """Adapt ``model`` (a HF causal LM) with MoLE layers; its own weights are frozen. The new
    layers take the mode of ``model`` (eval after ``from_pretrained``): call ``.train()`` to train."""
    return MoLEModel(model, config)


def load_mole_model(model: nn.Module, adapter_dir: str | Path) -> MoLEModel:
    """Adapt ``model`` with the adapter saved in ``adapter_dir`` by ``save_pretrained``.

    The result is in eval mode (no adapter dropout, no aux losses), as PEFT's
    ``PeftModel.from_pretrained``; call ``.train()`` to go on training it."""
    directory = Path(adapter_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: is {directory} a dynmole adapter folder?")
    mole = MoLEModel(model, MoLEConfig.load(directory / CONFIG_NAME))
    mole.load_adapter_weights(directory / WEIGHTS_NAME)
    return mole.eval()

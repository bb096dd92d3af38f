"""MoLE as a PEFT method: the tuner that injects MoLE layers into a HF causal LM, adds the aux
losses to its loss and collects routing statistics; and the two ways in, :func:`get_mole_model`
and :func:`load_mole_model`.

``import dynmole`` registers the method with PEFT under the PEFT type ``DYNMOLE``, so
``peft.get_peft_model(model, MoLEConfig(...))`` and ``peft.PeftModel.from_pretrained(model,
adapter_dir)`` build a MoLE model, and TRL's trainers take ``peft_config=MoLEConfig(...)``;
:func:`get_mole_model` and :func:`load_mole_model` call those two. This is the only module that
walks a HF model.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, register_peft_method
from peft.utils import WEIGHTS_NAME as WEIGHTS_NAME_PICKLED
from safetensors import SafetensorError
from torch import distributed as dist
from torch import nn

from .config import ADAPTER_TYPE, PEFT_TYPE, MoLEConfig
from .errors import DynmoleError
from .gating import build_gate_fn
from .layers import MoLELinear, RoutingRecorder, reuse_stacked_weights
from .losses import add_aux_to_outputs, aux_losses
from .routing import LambdaMLP, update_l1_coefficient
from .stats import RoutingStats

WEIGHTS_NAME = SAFETENSORS_WEIGHTS_NAME
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_PEFT_PREFIX = "base_model."  # PEFT's keys: "base_model.model.<HF module>..." and "base_model.<tuner attribute>"
_TUNER_STATE = ("lambda_mlps.", "relu_l1_coef")
DATA_PARALLEL_REFUSAL = (
    "a MoLE model does not run under torch.nn.DataParallel (its replicas would keep the aux losses and routing "
    "records to themselves): on several GPUs launch with torchrun or accelerate launch (DDP), or make one GPU "
    "visible with CUDA_VISIBLE_DEVICES"
)  # keys of the tuner's own weights in an adapter saved before PEFT


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


def _target_linears(model: nn.Module, config: MoLEConfig) -> list[str]:
    """Names of the linear modules of ``model`` that ``config.target_modules`` names (by their last
    component); raises naming the model's linear modules when a target name matches none."""
    wanted = set(config.target_modules)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    found = [name for name in linears if name.rsplit(".", 1)[-1] in wanted]
    missing = wanted - {name.rsplit(".", 1)[-1] for name in found}
    if not found or missing:
        available = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise DynmoleError(
            f"target module(s) {sorted(missing or wanted)} not found in the model; "
            f"its linear modules are: {', '.join(available)}"
        )
    return found


class MoLEModel(BaseTuner):
    """PEFT's tuner of the ``DYNMOLE`` method: the HF causal LM ``self.model`` with
    :class:`MoLELinear` layers in place of its target linear layers.

    PEFT builds it inside a ``PeftModelForCausalLM`` (``peft_model.base_model``), whose attribute
    look-ups fall through to it, so ``peft_model.last_aux_losses``,
    ``peft_model.collect_routing_stats()`` and ``peft_model.update_remole_coefficient()`` work;
    :func:`find_mole` finds it in a wrapped model. One adapter per model (PEFT names it
    ``default``); the experts cannot be merged into the base weights.

    ``forward`` accepts what the base model accepts; when labels are given in training mode the
    returned ``loss`` is the LM loss plus the method's auxiliary losses, and
    ``last_aux_losses`` holds each part (tensors, for logging).

    Gradient accumulation: when the caller passes ``num_items_in_batch`` (the answer tokens of the
    whole optimizer step, as the HF ``Trainer`` and transformers' recipe for accelerate loops do),
    the LM loss is a sum over this micro-batch's tokens divided by that count and the caller neither
    divides it by the accumulation steps nor leaves it per process. The aux loss is then weighted by
    the same share, ``this micro-batch's answer tokens / num_items_in_batch`` (:func:`~dynmole.losses.loss_share`),
    so whatever the caller does to the LM loss (multiplying it by the number of processes, DDP
    averaging) it does alike to the aux loss: per optimizer step the aux loss is the
    answer-token-weighted mean over micro-batches (and processes), which is the plain mean of
    ``MoLETrainer`` when the micro-batches hold equally many answer tokens (the forward cannot know
    the accumulation steps or the process count that plain mean needs). Without
    ``num_items_in_batch`` the loss is the micro-batch's (LM mean + aux), as in a loop of your own
    that divides it by the accumulation steps. TRL's trainers compute their loss from the
    per-token log-probabilities of their fused LM head: :func:`~dynmole.losses.add_aux_to_outputs` puts the aux loss
    there with the same weighting.

    The new layers start in the mode (train/eval) of the model they wrap. ReMoLE's L1
    coefficient changes only in :meth:`update_remole_coefficient`, once per optimizer step
    (``MoLETrainer`` calls it; under another trainer pass
    ``callbacks=[dynmole.train.ReMoLECoefficientCallback()]``; a loop of your own calls it after
    ``optimizer.step()``).
    """

    prefix = "dynmole_"
    tuner_layer_cls = MoLELinear
    uses_shared_state = True  # the routing recorder and LD-MoLE's shared lambda MLPs

    # ---------------------------------------------------------------- injection (PEFT's hooks)
    def _pre_injection_hook(self, model: nn.Module, config: MoLEConfig, adapter_name: str) -> None:
        """Check the target modules and set up what the layers share and the loss and statistics
        state, before PEFT injects the layers."""
        self._num_layers = _num_layers(model, _target_linears(model, config))
        self.recorder = RoutingRecorder()
        self.stats = RoutingStats(q=config.q, threshold=config.threshold, eps=config.entropy_eps)
        self.stats_enabled = False
        self.last_aux_losses: dict[str, torch.Tensor] = {}
        # False only inside ``deferred_aux_loss()``: the aux total is then left in ``pending_aux_loss``.
        self.aux_in_loss = True
        self.pending_aux_loss: torch.Tensor | None = None
        self.lambda_mlps = nn.ModuleDict()
        self.register_buffer(
            "relu_l1_coef", torch.tensor(config.relu_l1_init) if config.method == "remole" else None
        )
        # ReMoLE: sum of the active-expert statistic over the micro-batches since the last update.
        self._remole_active_sum: torch.Tensor | None = None
        self._remole_micro_batches = 0

    def _check_new_adapter_config(self, config: MoLEConfig) -> None:
        if len(self.peft_config) > 1:
            raise DynmoleError(
                "a MoLE model holds one adapter: load the other adapter into a base model of its own"
            )

    def _lambda_mlp(self, in_features: int) -> LambdaMLP:
        config = self.mole_config
        device = self.model.get_input_embeddings().weight.device if hasattr(
            self.model, "get_input_embeddings"
        ) else None
        if not config.lambda_shared:
            return LambdaMLP(in_features, config.lambda_hidden, config.lambda_bias_init).to(device)
        key = str(in_features)
        if key not in self.lambda_mlps:
            self.lambda_mlps[key] = LambdaMLP(in_features, config.lambda_hidden, config.lambda_bias_init).to(device)
        return self.lambda_mlps[key]

    def _create_and_replace(
        self,
        peft_config: MoLEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        """Put a :class:`MoLELinear` around ``target``, the module ``current_key`` of the HF model."""
        if not isinstance(target, nn.Linear):
            raise DynmoleError(
                f"{current_key} is a {type(target).__name__}, not an nn.Linear: MoLE adapts linear layers only; "
                f"leave {target_name} out of target_modules"
            )
        config = peft_config
        num_experts = config.experts_for_layer(_layer_index(current_key), self._num_layers)
        lambda_mlp = self._lambda_mlp(target.in_features) if config.method == "ldmole" else None
        layer = MoLELinear(
            target,
            num_experts=num_experts,
            r=config.r,
            alpha=config.alpha,
            dropout=config.dropout,
            gate_fn=build_gate_fn(config, num_experts, lambda_mlp),
            name=current_key,
            recorder=self.recorder,
            router_init_std=config.router_init,
            router_dropout=config.router_sees_dropout,
            gate_features=lambda_mlp.fc1 if lambda_mlp is not None else None,
        )
        if lambda_mlp is not None and not config.lambda_shared:
            layer.lambda_mlp = lambda_mlp
        self._replace_module(parent, target_name, layer, target)

    def _post_injection_hook(self, model: nn.Module, config: MoLEConfig, adapter_name: str) -> None:
        self._set_new_modules_mode(model.training)

    def _set_new_modules_mode(self, mode: bool) -> None:
        """Put the tuner, the MoLE layers and the lambda MLPs (not the base layers) in ``mode``."""
        self.training = mode
        for layer in self.mole_layers():
            base_mode = layer.base_layer.training
            layer.train(mode)
            layer.base_layer.train(base_mode)
        self.lambda_mlps.train(mode)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's: activate the adapter; ``inference_mode`` freezes its weights (else they train)."""
        super().set_adapter(adapter_name, inference_mode)
        for layer in self.mole_layers():
            for name, param in layer.named_parameters():
                if not name.startswith("base_layer."):
                    param.requires_grad_(not inference_mode)
        self.lambda_mlps.requires_grad_(not inference_mode)

    def _check_merge_allowed(self) -> None:
        raise DynmoleError(
            "a MoLE adapter cannot be merged into the base weights: each token's expert gates depend on its input"
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: MoLEConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's hook from a checkpoint's keys to the model's. An adapter saved before MoLE was a
        PEFT method (format_version < 3) names its weights as the HF model does (and ``lambda_mlps.*``,
        ``relu_l1_coef`` as the old wrapper did): they get PEFT's ``base_model.`` prefixes first. A
        checkpoint that does not fit the model (missing or unexpected keys, other shapes) is refused."""
        if not any(key.startswith(_PEFT_PREFIX) for key in state_dict):
            state_dict = {
                (_PEFT_PREFIX if key.startswith(_TUNER_STATE) else _PEFT_PREFIX + "model.") + key: tensor
                for key, tensor in state_dict.items()
            }
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = cls._get_adapter_state_dict(model, config, adapter_name, model.state_dict(), [])
        missing, unexpected = sorted(own.keys() - remapped.keys()), sorted(remapped.keys() - own.keys())
        if missing or unexpected:
            raise DynmoleError(
                f"the adapter does not fit this base model: {len(missing)} missing key(s) {missing[:3]}, "
                f"{len(unexpected)} unexpected key(s) {unexpected[:3]}"
            )
        for key, tensor in remapped.items():
            if tensor.shape != own[key].shape:
                raise DynmoleError(
                    f"the adapter does not fit this base model: {key} has shape {tuple(tensor.shape)} "
                    f"in the file but {tuple(own[key].shape)} here"
                )
        return remapped

    # ---------------------------------------------------------------- access
    @property
    def mole_config(self) -> MoLEConfig:
        """The adapter's :class:`MoLEConfig`."""
        return self.peft_config[self.active_adapters[0]]

    def mole_layers(self) -> Iterator[MoLELinear]:
        return (m for m in self.model.modules() if isinstance(m, MoLELinear))

    # ---------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_is_replica", False):  # set by torch.nn.parallel.replicate, i.e. DataParallel
            raise DynmoleError(DATA_PARALLEL_REFUSAL)
        attention_mask = kwargs.get("attention_mask")
        want_aux = self.training and torch.is_grad_enabled()
        self.recorder.active = want_aux or self.stats_enabled
        try:
            outputs = self.model(*args, **kwargs)
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
                total = self._remole_active_sum
                self._remole_active_sum = active if total is None else total + active
                self._remole_micro_batches += 1
            if not self.aux_in_loss:
                self.pending_aux_loss = losses["total"]
            else:
                outputs = add_aux_to_outputs(outputs, losses["total"], kwargs)
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
        """The HF model's ``generate``, with each MoLE layer's stacked ``[W_g; W_f; A]`` built once
        for the whole call instead of once per generated token (:func:`reuse_stacked_weights`)."""
        with reuse_stacked_weights(self.mole_layers()):
            return self.model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Enable the base model's checkpointing, non-reentrant by default: the reentrant variant
        runs the first forward without grad, which would cut the aux losses off the router."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @contextmanager
    def deferred_aux_loss(self) -> Iterator[None]:
        """Within this block a training forward leaves the aux total in ``pending_aux_loss`` instead
        of adding it to the loss, for a trainer that adds it with its own scaling (``MoLETrainer``:
        the HF Trainer rescales the LM loss after the forward). On leaving, forwards add it again and
        the pending loss (and its autograd graph) is dropped: take it inside the block."""
        previous, self.aux_in_loss = self.aux_in_loss, False
        try:
            yield
        finally:
            self.aux_in_loss, self.pending_aux_loss = previous, None

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


if PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:  # once per process, also if this module is reloaded
    register_peft_method(name=ADAPTER_TYPE.lower(), config_cls=MoLEConfig, model_cls=MoLEModel)


def find_mole(model: nn.Module) -> MoLEModel | None:
    """The :class:`MoLEModel` of ``model``: ``model`` itself, the tuner of a ``PeftModel``, or either
    inside DDP / DeepSpeed wrappers (which keep it in ``.module``); None for any other model."""
    while not isinstance(model, MoLEModel):
        if isinstance(model, PeftModel):
            model = model.base_model
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return None
    return model


def get_mole_model(model: nn.Module, config: MoLEConfig) -> PeftModel:
    """Adapt ``model`` (a HF causal LM) with MoLE layers: ``peft.get_peft_model(model, config)``, a
    ``PeftModelForCausalLM`` around a :class:`MoLEModel` (whose attributes it forwards). The weights
    of ``model`` are frozen. The new layers, and the wrapper, take the mode of ``model`` (eval after
    ``from_pretrained``): call ``.train()`` to train."""
    peft_model = get_peft_model(model, config)
    peft_model.training = model.training  # the wrapper's own flag; the tuner set its layers' mode
    return peft_model


def require_adapter_files(directory: Path) -> None:
    """Raise unless ``directory`` holds an adapter's config and its weights as safetensors. Weights
    pickled by ``save_pretrained(..., safe_serialization=False)`` (``adapter_model.bin``) are refused
    with how to re-save them: unpickling can run code, and dynmole loads weights from safetensors only."""
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory / CONFIG_NAME} not found: is {directory} a dynmole adapter folder?")
    if (directory / WEIGHTS_NAME).is_file():
        return
    if (directory / WEIGHTS_NAME_PICKLED).is_file():
        raise DynmoleError(
            f"{directory} holds its weights pickled ({WEIGHTS_NAME_PICKLED}, saved with safe_serialization=False), "
            f"which dynmole does not load (unpickling can run code); if you trust the file, re-save it as "
            f"safetensors: peft.PeftModel.from_pretrained(base, '{directory}').save_pretrained(new_folder)"
        )
    raise FileNotFoundError(f"{directory / WEIGHTS_NAME} not found: is {directory} a dynmole adapter folder?")


def load_mole_model(model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False) -> PeftModel:
    """Adapt ``model`` with the adapter saved in ``adapter_dir``: ``peft.PeftModel.from_pretrained``,
    which this also lets read adapters saved before MoLE was a PEFT method (format_version 1 and 2;
    ``load_mole_model(base, old_dir).save_pretrained(new_dir)`` converts one for PEFT alone).

    The result is in eval mode with the adapter frozen (no dropout, no aux losses), as PEFT loads
    adapters; ``is_trainable=True`` to go on training it (then call ``.train()``)."""
    directory = Path(adapter_dir)
    require_adapter_files(directory)
    config = MoLEConfig.load(directory / CONFIG_NAME)
    try:
        return PeftModel.from_pretrained(model, str(directory), config=config, is_trainable=is_trainable)
    except SafetensorError as err:
        raise DynmoleError(
            f"cannot read adapter weights {directory / WEIGHTS_NAME}: the file is corrupted or truncated ({err})"
        ) from None

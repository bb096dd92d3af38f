"""Fine-tuning on the HF ``Trainer``: MoLE methods, plus LoRA and DoRA through PEFT.

Multi-GPU and multi-node runs go through ``accelerate launch`` / ``torchrun``: the Trainer
handles data parallelism, so nothing here distributes work by itself.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from peft.utils import CONFIG_NAME
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..adapters import model_settings, saved_settings, unwrap
from ..data.example import Example
from ..data.tokenize import AnswerCollator, encode_example
from ..errors import DynmoleError
from ..layers import MoLELinear
from ..model import DATA_PARALLEL_REFUSAL, find_mole
from .answer_logits import ANSWER_SPAN_KEY, AnswerSpanCollator, answer_lm_loss, can_use_answer_logits
from .callbacks import JsonlLogger, ReMoLECoefficientCallback
from .config import TrainConfig
from .probe import RoutingProbe
from .runs import ADAPTER_NAME, LOG_NAME, STATE_NAME, finished_checkpoint, resume_checkpoint, start_run


def _non_finite_source(model: nn.Module) -> str:
    """Name the first trainable parameter, or gradient, holding NaN/inf (checked only on failure)."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if not torch.isfinite(param).all():
            return f"first non-finite weights: {name}"
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return f"first non-finite gradient: {name}"
    return "the adapter weights are finite, so the base model's forward produced it"


class MoLETrainer(Trainer):
    """``Trainer`` that adds the MoLE aux losses itself and logs their parts (MoLE models are PEFT
    models, whose adapters the Trainer saves and resumes as any PEFT adapter's).

    The Trainer rescales the LM loss (by the number of processes when it averages tokens across
    devices, and not by gradient-accumulation steps when the model normalises by the token
    count itself), so the aux loss is added here, after that rescaling, with the scale that
    keeps it a per-step mean: data-parallel ranks then average their per-rank aux losses.
    The parts are summed on the device each step and read (one sync) only when the Trainer logs.
    """

    def __init__(self, *args: Any, router_lr_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1 and find_mole(self.model) is not None:  # the Trainer would wrap it in DataParallel
            raise DynmoleError(DATA_PARALLEL_REFUSAL)
        self.router_lr_scale = router_lr_scale
        self._aux_sums: dict[str, torch.Tensor] = {}
        self._aux_steps = 0

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the routers in groups of their own at ``router_lr_scale``
        times the learning rate (before the scheduler is built, so it scales every group alike)."""
        optimizer = super().create_optimizer(model)
        if self.router_lr_scale != 1.0:
            routers = {id(p) for p in router_parameters(unwrap(model or self.model))}
            scale_parameter_groups(optimizer, routers, self.router_lr_scale)
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        mole = find_mole(model)
        if mole is None:
            return self._lm_loss(model, inputs, return_outputs, num_items_in_batch)
        with mole.deferred_aux_loss():
            result = self._lm_loss(model, inputs, return_outputs, num_items_in_batch)
            aux = mole.pending_aux_loss
        if aux is None:
            return result
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            aux = aux / self.current_gradient_accumulation_steps  # the Trainer won't divide this loss
        for name, value in mole.last_aux_losses.items():
            self._aux_sums[name] = self._aux_sums.get(name, 0) + value
        self._aux_steps += 1
        if return_outputs:
            loss, outputs = result
            return loss + aux, outputs
        return result + aux

    def _lm_loss(self, model, inputs, return_outputs, num_items_in_batch):  # noqa: ANN001
        """The Trainer's loss, on the answer positions only when the batch says where they are."""
        positions = inputs.pop(ANSWER_SPAN_KEY, None)  # from AnswerSpanCollator (answer_logits_only)
        if positions is not None and can_use_answer_logits(self, model, inputs):
            return answer_lm_loss(self, model, inputs, positions, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._aux_steps:
            for name, total in self._aux_sums.items():
                key = "experts_per_token" if name == "active_experts" else f"aux_{name}"
                logs[key] = round(float(total) / self._aux_steps, 6)
            self._aux_sums, self._aux_steps = {}, 0
        if "loss" in logs and not math.isfinite(logs["loss"]):
            raise FloatingPointError(
                f"training loss is {logs['loss']} at step {self.state.global_step}; "
                f"{_non_finite_source(self.model)}. Try a lower --lr, --precision fp32 or bf16 instead of fp16"
            )
        super().log(logs, *args, **kwargs)


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The router weights ``W_g`` of every MoLE layer of ``model`` (none for LoRA/DoRA)."""
    return [m.router for m in model.modules() if isinstance(m, MoLELinear) and m.router.requires_grad]


def scale_parameter_groups(optimizer: torch.optim.Optimizer, selected: set[int], scale: float) -> None:
    """Move the parameters whose ``id`` is in ``selected`` out of each optimizer group into a new
    group with the same settings and ``scale`` times its learning rate."""
    if scale <= 0:
        raise ValueError(f"router_lr_scale must be > 0, got {scale}")
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in selected]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in selected]
        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                   "params": moved, "lr": group["lr"] * scale})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]


def _precision_flags(precision: str) -> dict[str, bool]:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _probe_callbacks(model: nn.Module, tokenizer: Any, examples: list[Example] | None,
                     config: TrainConfig) -> list[TrainerCallback]:
    """The routing probe, when asked for and the model is a MoLE model (before the JSONL logger,
    so its values reach ``log.jsonl``)."""
    mole = find_mole(model)
    if config.routing_probe_steps <= 0 or mole is None:
        return []
    if not examples:
        raise ValueError("routing_probe_steps > 0 needs held-out probe examples")
    return [RoutingProbe(mole, tokenizer, examples[: config.routing_probe_size], config.routing_probe_steps,
                         config.output_dir, cutoff_len=config.cutoff_len)]


def _sampler_flags(group_by_length: bool) -> dict[str, Any]:
    """``TrainingArguments`` for length-grouped batches (none for the default random batches):
    ``train_sampling_strategy`` where transformers has it, else its older ``group_by_length``."""
    if not group_by_length:
        return {}
    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _collator(tokenizer: Any, answer_logits_only: bool) -> Any:
    """Right-padding collator; with ``answer_logits_only`` its batches also say where the answers
    are, for the LM head (:mod:`dynmole.training.answer_logits`)."""
    collator = AnswerCollator(tokenizer.pad_token_id)
    return AnswerSpanCollator(collator) if answer_logits_only else collator


def check_resume_settings(checkpoint: str | Path, model: nn.Module) -> None:
    """Refuse to resume ``checkpoint`` with adapter settings other than the ones it was trained with,
    naming each field that differs."""
    path = Path(checkpoint) / CONFIG_NAME
    requested = model_settings(model)
    if requested is None or not path.is_file():
        return
    saved = saved_settings(path)
    differ = [
        f"{key}: {saved[key]!r} in the checkpoint, {value!r} now" for key, value in requested.items()
        if key in saved and (sorted(saved[key]) != sorted(value) if key == "target_modules" else saved[key] != value)
    ]
    if differ:
        raise DynmoleError(
            f"cannot resume {checkpoint}: it was trained with other adapter settings ({'; '.join(differ)}); "
            "resume with its settings or use a new --output-dir"
        )


def training_arguments(config: TrainConfig) -> TrainingArguments:
    """The HF ``TrainingArguments`` of ``config``."""
    return TrainingArguments(
        output_dir=str(Path(config.output_dir)),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_ratio,  # below 1: a share of the steps (transformers' warmup_ratio is deprecated)
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach the check in MoLETrainer.log
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=max(config.save_steps, 1),
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        report_to=[] if config.report_to == "none" else [config.report_to],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # without an accelerator, torchrun/accelerate multi-process runs need use_cpu for DDP over gloo
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        dataloader_pin_memory=torch.cuda.is_available(),
        **_precision_flags(config.precision),
        **_sampler_flags(config.group_by_length),
    )


def _run(trainer: MoLETrainer, resume: Path | None, max_steps: int) -> tuple[float, float | None]:
    """Train (from ``resume``, a checkpoint, or from the start); returns (train loss, runtime in s)."""
    if resume is not None and finished_checkpoint(resume, max_steps):
        # Killed after the last step's checkpoint: the Trainer would take one step more (at lr 0).
        trainer._load_from_checkpoint(resume)
        trainer.state = trainer.state.load_from_json(str(Path(resume) / STATE_NAME))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        train_loss, runtime = (sum(losses) / len(losses) if losses else float("nan")), None
    else:
        try:
            result = trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"out of memory ({err}). Knobs to turn: --batch-size (with --grad-accum to keep the "
                "effective batch), --cutoff-len, --gradient-checkpointing, --precision bf16, fewer --num-experts "
                "or a lower --r"
            ) from err
        train_loss, runtime = result.training_loss, result.metrics.get("train_runtime")
    return train_loss, runtime


def train(
    model: nn.Module, tokenizer: Any, examples: list[Example], config: TrainConfig,
    probe_examples: list[Example] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune an adapted ``model`` on ``examples`` (cross-entropy on answer tokens + aux losses).

    ``probe_examples`` (held out) feed the routing probe when ``config.routing_probe_steps > 0``
    (:mod:`dynmole.training.probe`; MoLE models only). Returns the trained model and a summary
    (train loss, steps, runtime, log history). The final adapter is saved in ``<output_dir>/adapter``.
    """
    from datasets import Dataset

    if not examples:
        raise DynmoleError("no training examples")
    output_dir = Path(config.output_dir)
    resume = resume_checkpoint(output_dir, config.resume, config.overwrite)
    if resume is not None:
        check_resume_settings(resume, model)  # before start_run changes anything
    start_run(output_dir, resume, config.overwrite, config.max_steps)
    features = Dataset.from_list([encode_example(tokenizer, ex, config.cutoff_len) for ex in examples])
    args = training_arguments(config)
    trainer = MoLETrainer(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=_collator(tokenizer, config.answer_logits_only),
        processing_class=tokenizer,
        callbacks=[*_probe_callbacks(model, tokenizer, probe_examples, config), JsonlLogger(output_dir / LOG_NAME),
                   ReMoLECoefficientCallback()],
        router_lr_scale=config.router_lr_scale,
    )
    train_loss, runtime = _run(trainer, resume, config.max_steps)
    trainer.save_model(str(output_dir / ADAPTER_NAME))
    summary = {
        "train_loss": train_loss,
        "steps": trainer.state.global_step,
        "examples": len(examples),
        "runtime_s": runtime,
        "log_history": trainer.state.log_history,
    }
    return model, summary

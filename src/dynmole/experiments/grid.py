"""The grid of ``dynmole reproduce``: its runs planned, estimated and run, each through the pipeline.

A run is one method variant and one seed (:class:`RunSpec`): a fresh base model, adapted and
fine-tuned on the tasks mixed into one training set, evaluated on each task, through the one
pipeline (:mod:`.pipeline`). Each run writes ``runs/<variant>/seed<k>/result.json`` and its
per-example ``predictions.json`` (and the trainer's ``log.jsonl``); a run whose ``result.json``
exists is skipped, so an interrupted grid resumes. The command (:mod:`.reproduce`) reports them.

Tests inject a tiny model and toy examples through :class:`Inputs`.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..adapters import ALL_METHODS, PEFT_METHODS
from ..analysis import RunRecord
from ..analysis.runs import write_predictions
from ..config import MoLEConfig, setting_fields
from ..data import Example, scoring_protocol
from ..data.split import LEGACY_SPLIT
from ..evaluation import machine_description
from ..io import write_json
from ..pretrained import load_model_and_tokenizer
from ..training.config import TrainConfig
from ..training.runs import ADAPTER_NAME, CHECKPOINT_GLOB, ERROR_NAME, RESULT_NAME, checkpoint_step, scan_checkpoints
from .job import JOB_CLASSES, JobConfig, job_configs
from .pipeline import evaluate_model, fine_tune, prepare, run_record
from .profiles import CostModel, Profile, Variant

BASE = Variant("base", "Base (zero-shot)", "none")
"""The base model evaluated without training: one run, no seed."""
CHARS_PER_TOKEN = 4.0
_RESERVED = {"method": "--methods", "seed": "--seeds", "output_dir": "--output-dir"}
_RUN_CONTROL = {("train", "output_dir"), ("train", "resume"), ("train", "overwrite")}  # not settings of the result
_FIELDS = {cls: {f.name for f in setting_fields(cls)} for cls in JOB_CLASSES}


@dataclass
class Inputs:
    """What every run starts from: a fresh base model, the training mixture, the evaluation sets.

    Attributes:
        load_model: returns a fresh (untrained) base model and its tokenizer; called once per run.
        train_examples: the training mixture for a seed (its order may depend on the seed).
        eval_examples: evaluation examples per task.
        description: what the model and data are, for ``results.md``.
    """

    load_model: Callable[[], tuple[nn.Module, Any]]
    train_examples: Callable[[int], list[Example]]
    eval_examples: dict[str, list[Example]]
    description: str


def inputs_from_job(job: JobConfig) -> Inputs:
    """Inputs from ``job``'s model (``dynmole.pretrained``) and data source (``dynmole.data``)."""
    @functools.cache
    def mixture(seed: int) -> list[Example]:
        return job.train_examples(seed)

    return Inputs(
        # On a GPU from the start, so the base model's evaluation runs there too.
        load_model=lambda: load_model_and_tokenizer(job.model, trust_remote_code=job.trust_remote_code,
                                                    device="cuda" if torch.cuda.is_available() else None),
        train_examples=mixture,
        eval_examples=job.eval_examples(job.eval_limit),
        description=f"model `{job.model}`, {job.source} data (train limit {job.train_limit} per task, "
        f"eval limit {job.eval_limit} per task)",
    )


# ---------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: a variant, a seed, its configs and its folder."""

    variant: Variant
    seed: int | None
    job: JobConfig
    train: TrainConfig
    mole: MoLEConfig
    directory: Path

    @property
    def label(self) -> str:
        return self.variant.name if self.seed is None else f"{self.variant.name}, seed {self.seed}"

    @property
    def done(self) -> bool:
        return (self.directory / RESULT_NAME).is_file()


def parse_value(text: str) -> Any:
    """A ``--set`` value: comma-separated lists, none/null, true/false, int, float, else the string."""
    if "," in text:
        return [parse_value(part.strip()) for part in text.split(",") if part.strip()]
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-3", "peft.r=16"]`` -> ``{"lr": 0.001, "peft.r": 16}``, with the field names checked."""
    known = set().union(*_FIELDS.values())
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        name = key.removeprefix("peft.")
        if not sep or name not in known:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with a JobConfig/TrainConfig/MoLEConfig field")
        if name in _RESERVED:
            raise ValueError(f"--set {name}: use {_RESERVED[name]}")
        values[key] = parse_value(text.strip())
    return values


def _settings(profile: Profile, overrides: dict[str, Any], variant: Variant | None) -> dict[str, Any]:
    """A run's fields: profile < profile's PEFT ranks < ``--set`` < ``--set peft.*`` < variant."""
    peft = variant is not None and variant.method in PEFT_METHODS
    common = {k: v for k, v in overrides.items() if not k.startswith("peft.")}
    peft_only = {k.removeprefix("peft."): v for k, v in overrides.items() if k.startswith("peft.")}
    return {**profile.settings, **(profile.peft if peft else {}), **common, **(peft_only if peft else {}),
            **(variant.overrides if variant else {})}


def _configs(values: dict[str, Any], method: str, seed: int,
             directory: Path) -> tuple[JobConfig, TrainConfig, MoLEConfig]:
    """A run's settings records: ``values`` with its seed, folder and (unless the base run's "none") method."""
    chosen = {"method": method} if method in ALL_METHODS else {}
    run = {**values, "seed": seed, "output_dir": str(directory), **chosen}
    return job_configs(run)


def grid_job(profile: Profile, overrides: dict[str, Any]) -> JobConfig:
    """The job settings the whole grid shares (model, tasks, data)."""
    return _configs(_settings(profile, overrides, None), BASE.method, 0, Path("."))[0]


def plan(profile: Profile, variants: Sequence[Variant], seeds: Sequence[int] | Mapping[str, Sequence[int]],
         overrides: dict[str, Any], output_dir: str | Path, eval_base: bool) -> list[RunSpec]:
    """Every run of the grid, in table order (the base evaluation first when ``eval_base``);
    ``seeds`` are every variant's, or each variant's by key."""
    root = Path(output_dir) / "runs"
    specs = []
    if eval_base:
        job, train_config, mole = _configs(_settings(profile, overrides, None), BASE.method, 0, root / BASE.key)
        specs.append(RunSpec(BASE, None, job, train_config, mole, root / BASE.key))
    for variant in variants:
        values = _settings(profile, overrides, variant)
        for seed in seeds[variant.key] if isinstance(seeds, Mapping) else seeds:
            directory = root / variant.key / f"seed{seed}"
            specs.append(RunSpec(variant, seed, *_configs(values, variant.method, seed, directory), directory))
    return specs


# ---------------------------------------------------------------------------------- estimating
def _tokens(*texts: str) -> int:
    return math.ceil(sum(map(len, texts)) / CHARS_PER_TOKEN) + 1


def training_examples(spec: RunSpec, inputs: Inputs) -> list[Example]:
    """The run's training mixture in the format its evaluation protocol (``job.scoring``) scores."""
    return prepare(spec.job, spec.train, inputs.train_examples(spec.train.seed), None).train


def estimate(spec: RunSpec, inputs: Inputs, cost: CostModel) -> tuple[int, float]:
    """(training steps, seconds) of a run under ``cost``: padded tokens of each step's batch, plus
    every (example, choice) sequence of the evaluation, plus the set-up."""
    eval_tokens = sum(_tokens(e.prompt, c) for examples in inputs.eval_examples.values() for e in examples
                      for c in e.choices)
    seconds = cost.run_setup_s + eval_tokens * cost.eval_s_per_token
    if spec.seed is None:
        return 0, seconds
    config = spec.train
    lengths = [min(_tokens(e.prompt, e.answer), config.cutoff_len) for e in training_examples(spec, inputs)]
    batches = [lengths[i : i + config.batch_size] for i in range(0, len(lengths), config.batch_size)]
    steps = config.max_steps if config.max_steps > 0 else math.ceil(len(batches) / config.grad_accum * config.epochs)
    padded = [len(b) * max(b) for b in batches]
    train_tokens = sum(padded[i % len(padded)] for i in range(steps * config.grad_accum))
    return steps, seconds + train_tokens * cost.train_s_per_token


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def print_plan(specs: Sequence[RunSpec], inputs: Inputs, cost: CostModel) -> float:
    """Print each planned run (status, training steps, estimated time); returns the seconds left."""
    left = 0.0
    print(f"{'#':>3}  {'run':<36} {'status':<7} {'steps':>6} {'estimate':>9}  folder")
    for number, spec in enumerate(specs, 1):
        steps, seconds = estimate(spec, inputs, cost)
        left += 0.0 if spec.done else seconds
        print(f"{number:>3}  {spec.label:<36} {'done' if spec.done else 'to do':<7} {steps:>6} "
              f"{_duration(seconds):>9}  {spec.directory}")
    todo = sum(not s.done for s in specs)
    print(f"{todo} of {len(specs)} runs to do: about {_duration(left)} on {cost.hardware} "
          f"({cost.train_s_per_token * 1e3:g} ms per padded training token, {cost.eval_s_per_token * 1e3:g} ms "
          f"per evaluation token, {cost.run_setup_s:g} s set-up per run, {CHARS_PER_TOKEN:g} characters per token)")
    return left


# ---------------------------------------------------------------------------------- running
def _settings_record(spec: RunSpec) -> dict[str, Any]:
    """The run's ``job``, ``train`` and ``adapter`` settings as ``result.json`` stores them."""
    if spec.variant is BASE:  # nothing trained
        return run_record(spec.job, None, None)
    return run_record(spec.job, spec.train, spec.mole)


def changed_settings(spec: RunSpec, record: RunRecord) -> list[str]:
    """Settings in which a finished run differs from the planned one (the folder and the
    resume/overwrite switches aside, so a moved results folder still resumes)."""
    planned = json.loads(json.dumps(_settings_record(spec)))
    recorded = {part: dict(record.result.get(part, {})) for part in planned}
    if "scoring" in recorded["job"]:  # runs made before the rename recorded cloze as "choices"
        recorded["job"]["scoring"] = scoring_protocol(recorded["job"]["scoring"])
    recorded["job"].setdefault("split_version", LEGACY_SPLIT)  # runs made before split versions used the first
    return [f"{part}.{name}" for part, fields in planned.items() for name, value in fields.items()
            if (part, name) not in _RUN_CONTROL and recorded[part].get(name) != value]


def run_one(spec: RunSpec, inputs: Inputs, keep_adapter: bool = False) -> RunRecord:
    """Train (unless it is the base run) and evaluate one run; write its ``result.json``.

    A run interrupted after a checkpoint (``save_steps``) resumes from its newest complete
    checkpoint, its logs cut back to that step (by ``train``); any other folder left by an
    interrupted run is cleared first. The adapter and checkpoints are deleted afterwards unless
    ``keep_adapter`` (the tables and figures need only ``result.json``, ``log.jsonl`` and
    ``routing_probe.jsonl``).
    """
    started = time.time()
    checkpoint = scan_checkpoints(spec.directory)[0] if spec.variant is not BASE else None
    if checkpoint is None:
        shutil.rmtree(spec.directory, ignore_errors=True)
    else:
        print(f"  resuming {spec.label} from step {checkpoint_step(checkpoint)}", flush=True)
    spec.directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.train.seed)
    model, tokenizer = inputs.load_model()
    summary: dict[str, Any] = {}
    if spec.variant is not BASE:
        train_config = replace(spec.train, resume=checkpoint is not None)
        prepared = prepare(spec.job, train_config, inputs.train_examples(spec.train.seed), inputs.eval_examples)
        model, summary = fine_tune(model, tokenizer, spec.job, train_config, spec.mole, prepared)
    results, routing = evaluate_model(model, tokenizer, inputs.eval_examples, spec.job, progress=False,
                                      return_predictions=True)
    write_predictions(spec.directory, results.pop("predictions"))  # before result.json, which marks the run done
    result = {
        "variant": spec.variant.name,
        "key": spec.variant.key,
        "method": spec.variant.method,
        "seed": spec.seed,
        "overrides": spec.variant.overrides,
        "eval": results,
        "trainable_params": 0 if spec.variant is BASE else sum(p.numel() for p in model.parameters()
                                                                if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "routing": routing,
        **_settings_record(spec),
        "train_summary": {k: v for k, v in summary.items() if k != "log_history"},
        "machine": machine_description(),
        "wall_time_s": round(time.time() - started, 1),
    }
    write_json(spec.directory / RESULT_NAME, result)
    if not keep_adapter:
        shutil.rmtree(spec.directory / ADAPTER_NAME, ignore_errors=True)
        for checkpoint in spec.directory.glob(CHECKPOINT_GLOB):
            shutil.rmtree(checkpoint, ignore_errors=True)
    return RunRecord(spec.directory, result)


def run_all(specs: Sequence[RunSpec], inputs: Inputs, metric: str = "acc_norm",
            keep_adapters: bool = False) -> tuple[list[RunRecord], list[RunSpec]]:
    """Run every spec not done yet; returns (records of all finished runs, failed specs).

    A failing run is reported (traceback in its ``error.txt``) and the grid goes on.
    """
    records, failed = [], []
    for number, spec in enumerate(specs, 1):
        prefix = f"[{number}/{len(specs)}] {spec.label}"
        if spec.done:
            record = RunRecord.read(spec.directory)
            changed = changed_settings(spec, record)
            warning = (f" - WARNING: it ran with other {', '.join(changed)}; delete its folder to rerun"
                       if changed else "")
            records.append(record)
            print(f"{prefix}: done before, skipped{warning}", flush=True)
            continue
        print(f"{prefix}: running in {spec.directory}", flush=True)
        try:
            record = run_one(spec, inputs, keep_adapters)
        except Exception as err:  # one failure must not end a grid of many runs
            spec.directory.mkdir(parents=True, exist_ok=True)
            (spec.directory / ERROR_NAME).write_text(traceback.format_exc())
            print(f"{prefix}: FAILED ({type(err).__name__}: {err}); see {spec.directory / ERROR_NAME}", flush=True)
            failed.append(spec)
            continue
        records.append(record)
        average = 100 * record.result["eval"]["average"][metric]
        print(f"{prefix}: average {metric} {average:.1f}% in {record.result['wall_time_s']:.0f} s", flush=True)
    return records, failed

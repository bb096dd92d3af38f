"""``dynmole reproduce``: the papers' comparison in miniature.

Runs a grid of method variants x seeds from a profile (``reproduce_profiles``): every run
fine-tunes on the tasks mixed into one training set, as the papers do, and is evaluated on each
task. Each run writes ``runs/<variant>/seed<k>/result.json``, its per-example
``predictions.json`` (and the trainer's ``log.jsonl``); a run whose ``result.json`` exists is
skipped, so an interrupted grid resumes. Then ``results.md`` (the paper's table, mean ± std over
seeds, 95 % intervals and the paired tests of the papers' claims) and ``plots/`` are written
from all the grid's runs. ``--ablation NAME`` sweeps one field instead (DynMoLE's Figure 4).

Tests inject a tiny model and toy examples through :class:`Inputs` (``main(argv, inputs=...)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .analysis import RunRecord, ablation_report, grid_report, group_by_variant, paired_tests_markdown
from .analysis.runs import RESULT_NAME, write_predictions
from .config import METHODS, MoLEConfig, setting_fields
from .data import Example, format_examples, scoring_protocol
from .evaluate import describe_scoring, evaluate_tasks
from .io import write_json
from .job import JobConfig, machine_description
from .model import find_mole
from .outputs import checkpoint_step, scan_checkpoints
from .reproduce_profiles import ABLATIONS, PROFILES, VARIANTS, CostModel, Profile, Variant
from .routing_probe import probe_examples
from .train import ALL_METHODS, PEFT_METHODS, TrainConfig, adapt_model, train

BASE = Variant("base", "Base (zero-shot)", "none")
"""The base model evaluated without training: one run, no seed."""
CHARS_PER_TOKEN = 4.0
_RESERVED = {"method": "--methods", "seed": "--seeds", "output_dir": "--output-dir"}
_RUN_CONTROL = {("train", "output_dir"), ("train", "resume"), ("train", "overwrite")}  # not settings of the result
_FIELDS = {cls: {f.name for f in setting_fields(cls)} for cls in (JobConfig, TrainConfig, MoLEConfig)}


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
    from .pretrained import load_model_and_tokenizer

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


def _configs(values: dict[str, Any], method: str, seed: int, directory: Path) -> tuple[JobConfig, TrainConfig, MoLEConfig]:
    pick = {cls: {k: v for k, v in values.items() if k in names} for cls, names in _FIELDS.items()}
    job = JobConfig(**pick[JobConfig], **({"method": method} if method in ALL_METHODS else {}))
    train_config = TrainConfig(**pick[TrainConfig], seed=seed, output_dir=str(directory))
    mole = MoLEConfig(**pick[MoLEConfig], **({"method": method} if method in METHODS else {}))
    return job, train_config, mole


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
    return format_examples(inputs.train_examples(spec.train.seed), spec.job.scoring)


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
    job = dataclasses.asdict(spec.job)
    if spec.variant is BASE:  # nothing trained
        return {"job": job, "train": {}, "adapter": {}}
    adapter = spec.mole.to_dict()
    if spec.variant.method in PEFT_METHODS:
        adapter = {k: adapter[k] for k in ("r", "alpha", "dropout", "target_modules")}
    return {"job": job, "train": dataclasses.asdict(spec.train), "adapter": adapter}


def changed_settings(spec: RunSpec, record: RunRecord) -> list[str]:
    """Settings in which a finished run differs from the planned one (the folder and the
    resume/overwrite switches aside, so a moved results folder still resumes)."""
    planned = json.loads(json.dumps(_settings_record(spec)))
    recorded = {part: dict(record.result.get(part, {})) for part in planned}
    if "scoring" in recorded["job"]:  # runs made before the rename recorded cloze as "choices"
        recorded["job"]["scoring"] = scoring_protocol(recorded["job"]["scoring"])
    return [f"{part}.{name}" for part, fields in planned.items() for name, value in fields.items()
            if (part, name) not in _RUN_CONTROL and recorded[part].get(name) != value]


def _evaluate(model: nn.Module, tokenizer: Any, inputs: Inputs, job: JobConfig) -> tuple[dict, dict]:
    """Accuracy per task (with the per-example ``predictions``) and, for MoLE models, the routing
    statistics of those same forwards."""
    model.eval()
    evaluate = functools.partial(evaluate_tasks, model, tokenizer, inputs.eval_examples, job.eval_batch_size,
                                 job.scoring, False, return_predictions=True, max_length=job.eval_cutoff_len)
    if find_mole(model) is None:
        return evaluate(), {}
    with model.collect_routing_stats() as stats:
        results = evaluate()
    return results, stats.summary()


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
        model = adapt_model(model, spec.variant.method, spec.mole)
        train_config = dataclasses.replace(spec.train, resume=checkpoint is not None)
        probe = probe_examples(inputs.eval_examples, train_config.routing_probe_size, spec.job.scoring)
        model, summary = train(model, tokenizer, training_examples(spec, inputs), train_config, probe)
    results, routing = _evaluate(model, tokenizer, inputs, spec.job)
    write_predictions(spec.directory, results.pop("predictions"))  # before result.json, which marks the run done
    result = {
        "variant": spec.variant.name,
        "key": spec.variant.key,
        "method": spec.variant.method,
        "seed": spec.seed,
        "overrides": spec.variant.overrides,
        "eval": results,
        "trainable_params": 0 if spec.variant is BASE else sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "routing": routing,
        **_settings_record(spec),
        "train_summary": {k: v for k, v in summary.items() if k != "log_history"},
        "machine": machine_description(),
        "wall_time_s": round(time.time() - started, 1),
    }
    write_json(spec.directory / RESULT_NAME, result)
    if not keep_adapter:
        shutil.rmtree(spec.directory / "adapter", ignore_errors=True)
        for checkpoint in spec.directory.glob("checkpoint-*"):
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
            warning = f" - WARNING: it ran with other {', '.join(changed)}; delete its folder to rerun" if changed else ""
            records.append(record)
            print(f"{prefix}: done before, skipped{warning}", flush=True)
            continue
        print(f"{prefix}: running in {spec.directory}", flush=True)
        try:
            record = run_one(spec, inputs, keep_adapters)
        except Exception as err:  # one failure must not end a grid of many runs
            spec.directory.mkdir(parents=True, exist_ok=True)
            (spec.directory / "error.txt").write_text(traceback.format_exc())
            print(f"{prefix}: FAILED ({type(err).__name__}: {err}); see {spec.directory / 'error.txt'}", flush=True)
            failed.append(spec)
            continue
        records.append(record)
        average = 100 * record.result["eval"]["average"][metric]
        print(f"{prefix}: average {metric} {average:.1f}% in {record.result['wall_time_s']:.0f} s", flush=True)
    return records, failed


# ---------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynmole reproduce",
        description="The papers' comparison in miniature: method variants x seeds, trained on the tasks as one "
        "mixture, evaluated per task; writes per-run result.json, results.md (mean ± std over seeds) and plots.",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="mini",
                        help="sizing of the comparison (default: mini); see --list")
    parser.add_argument("--methods", help=f"comma-separated variants (default: all): {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the profile's)")
    parser.add_argument("--tasks", help="comma-separated tasks (default: the profile's)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="FIELD=VALUE",
                        help="any JobConfig/TrainConfig/MoLEConfig field, for every run (repeatable); "
                        "'peft.FIELD=VALUE' only for LoRA/DoRA. A variant's own fields always win.")
    parser.add_argument("--ablation", choices=sorted(ABLATIONS), help="sweep this field instead of the method grid")
    parser.add_argument("--values", help="comma-separated values for --ablation (default: the paper's range)")
    parser.add_argument("--output-dir", help="results folder (default: runs/reproduce-<profile>)")
    parser.add_argument("--metric", choices=("acc_norm", "acc"), default="acc_norm",
                        help="metric of the progress lines and ablation plots (results.md has both)")
    parser.add_argument("--keep-adapters", action="store_true", help="keep each run's trained adapter")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and an estimated time, run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="write results.md, the paired tests and the plots from the runs already finished, run nothing")
    parser.add_argument("--list", action="store_true", help="list the profiles, variants and ablations, run nothing")
    return parser


def _print_catalogue() -> None:
    print("profiles:")
    for profile in PROFILES.values():
        print(f"  {profile.name:<14} {profile.description}")
    print("variants (--methods):")
    for variant in VARIANTS.values():
        print(f"  {variant.key:<14} {variant.name:<18} method={variant.method} {variant.overrides or ''}")
    print("ablations (--ablation):")
    for ablation in ABLATIONS.values():
        values = ", ".join(f"{v:g}" for v in ablation.values)
        print(f"  {ablation.field:<14} {ablation.label} of {VARIANTS[ablation.variant].name}: {values}")


def _csv(text: str | None, kind: Callable[[str], Any] = str) -> list[Any] | None:
    return [kind(part.strip()) for part in text.split(",") if part.strip()] if text else None


def _variants(args: argparse.Namespace, profile: Profile) -> list[Variant]:
    if args.ablation:
        return ABLATIONS[args.ablation].points(tuple(_csv(args.values, parse_value) or ()) or None)
    keys = _csv(args.methods) or list(profile.variants or VARIANTS)
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return [VARIANTS[k] for k in keys]


def _notes(profile: Profile, inputs: Inputs, job: JobConfig, seeds: Sequence[int], failed: Sequence[RunSpec]) -> str:
    """The paragraphs above the tables: what was run and how to read the cells."""
    lines = [
        f"Profile `{profile.name}`: {profile.description}",
        f"Inputs: {inputs.description}. Tasks {', '.join(inputs.eval_examples)} trained as one mixture, "
        f"evaluated per task. Scoring (training uses its format): {describe_scoring(job.scoring)}.",
        f"Cells: mean ± sample std over each row's finished runs (column `seeds`: how many; this grid runs seeds "
        f"{', '.join(map(str, seeds))}). "
        "Experts / token: routing statistics over the evaluation forwards. "
        "Each run's settings: its `result.json` under `runs/`.",
    ]
    if failed:
        lines.append(f"**Failed runs (not in the table):** {', '.join(s.label for s in failed)}.")
    return "\n\n".join(lines)


def _finished_elsewhere(output_dir: Path, specs: Sequence[RunSpec]) -> list[str]:
    """Finished runs in ``output_dir`` that ``specs`` (this command's selection) leave out, as
    ``variant/seedN`` paths: a grid run in pieces writes each piece's report over the last one."""
    selected = {spec.directory.resolve() for spec in specs}
    root = output_dir / "runs"
    return [path.parent.relative_to(root).as_posix() for path in sorted(root.rglob(RESULT_NAME))
            if path.parent.resolve() not in selected]


def main(argv: Sequence[str] | None = None, inputs: Inputs | None = None) -> int:
    """Run ``dynmole reproduce``; ``inputs`` replaces loading the model and data (tests).
    Returns 0, or 1 when a run failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        _print_catalogue()
        return 0
    if args.values and not args.ablation:
        parser.error("--values needs --ablation")
    if args.methods and args.ablation:
        parser.error("--ablation sweeps one variant of its own: leave out --methods")
    profile = PROFILES[args.profile]
    try:
        overrides = parse_assignments(args.assignments)
        if args.tasks:
            overrides["tasks"] = _csv(args.tasks)
        variants = _variants(args, profile)
        try:
            explicit = _csv(args.seeds, int)
        except ValueError:
            raise ValueError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
        seeds_by_variant = {v.key: explicit or list(profile.seeds_of(v.key)) for v in variants}
        seeds = sorted(set().union(*seeds_by_variant.values()))
        output_dir = Path(args.output_dir or f"runs/reproduce-{profile.name}")
        job = grid_job(profile, overrides)
        specs = plan(profile, variants, seeds_by_variant, overrides, output_dir, job.eval_base and not args.ablation)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    inputs = inputs or inputs_from_job(job)
    if args.dry_run:
        print(f"profile {profile.name}: {len(variants)} variant(s) x seeds {', '.join(map(str, seeds))}; "
              f"{inputs.description}; tasks {', '.join(inputs.eval_examples)}; results in {output_dir}")
        print_plan(specs, inputs, profile.cost)
        return 0
    if args.report_only:
        records, failed = [RunRecord.read(spec.directory) for spec in specs if spec.done], []
        print(f"{len(records)} of {len(specs)} planned runs are finished; reporting those, running nothing")
    else:
        records, failed = run_all(specs, inputs, args.metric, args.keep_adapters)
    if not records:
        print("no finished runs: nothing to report")
        return 1
    notes = _notes(profile, inputs, job, seeds, failed)
    if args.ablation:
        ablation = ABLATIONS[args.ablation]
        points: dict[float, list[RunRecord]] = {}
        for record in records:
            points.setdefault(float(record.result["overrides"][ablation.field]), []).append(record)
        written = ablation_report(points, output_dir, ablation.field, ablation.label, args.metric, ablation.log_x, notes)
        paired = ""
    else:
        groups = group_by_variant(records)
        paired = paired_tests_markdown(groups)
        written = grid_report(groups, output_dir, f"Comparison: profile {profile.name}", notes, paired)
    print("wrote " + ", ".join(str(p) for p in written))
    left_out = [] if args.ablation else _finished_elsewhere(output_dir, specs)
    if left_out:
        print(f"note: {len(left_out)} other finished run(s) in {output_dir / 'runs'} are not in this report "
              f"({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}); name them in --methods/--seeds, "
              "with --report-only to run nothing, to report them together")
    if paired:
        print(f"\n{paired}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

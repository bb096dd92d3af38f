"""``dynmole reproduce``: the papers' comparison in miniature.

Runs a grid of method variants x seeds from a profile (:mod:`.profiles`; the runs: :mod:`.grid`):
every run fine-tunes on the tasks mixed into one training set, as the papers do, and is evaluated
on each task. Then ``results.md`` (the paper's table, mean ± std over seeds, 95 % intervals and
the paired tests of the papers' claims) and ``plots/`` are written from all the grid's runs
(:mod:`dynmole.analysis`). ``--ablation NAME`` sweeps one field instead (DynMoLE's Figure 4).

Tests inject a tiny model and toy examples through :class:`Inputs` (``main(argv, inputs=...)``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..analysis import RunRecord, ablation_report, grid_report, group_by_variant, paired_tests_markdown
from ..evaluation import describe_scoring
from ..training.runs import RESULT_NAME
from .grid import (
    Inputs,
    RunSpec,
    grid_job,
    inputs_from_job,
    parse_assignments,
    parse_value,
    plan,
    print_plan,
    run_all,
    run_one,
)
from .job import JobConfig
from .profiles import ABLATIONS, PROFILES, VARIANTS, Profile, Variant

__all__ = ["Inputs", "RunSpec", "build_parser", "main", "parse_assignments", "plan", "run_all", "run_one"]


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
    parser.add_argument("--dry-run", action="store_true",
                        help="print the planned runs and an estimated time, run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="write results.md, the paired tests and the plots from the runs already finished, "
                        "run nothing")
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
    _report(args, output_dir, specs, records, _notes(profile, inputs, job, seeds, failed))
    return 1 if failed else 0


def _report(args: argparse.Namespace, output_dir: Path, specs: Sequence[RunSpec], records: list[RunRecord],
            notes: str) -> None:
    """Write the grid's (or the ablation's) ``results.md`` and plots, and print what was written."""
    if args.ablation:
        ablation = ABLATIONS[args.ablation]
        points: dict[float, list[RunRecord]] = {}
        for record in records:
            points.setdefault(float(record.result["overrides"][ablation.field]), []).append(record)
        written = ablation_report(points, output_dir, ablation.field, ablation.label, args.metric, ablation.log_x,
                                  notes)
        paired = ""
    else:
        groups = group_by_variant(records)
        paired = paired_tests_markdown(groups)
        written = grid_report(groups, output_dir, f"Comparison: profile {args.profile}", notes, paired)
    print("wrote " + ", ".join(str(p) for p in written))
    left_out = [] if args.ablation else _finished_elsewhere(output_dir, specs)
    if left_out:
        print(f"note: {len(left_out)} other finished run(s) in {output_dir / 'runs'} are not in this report "
              f"({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}); name them in --methods/--seeds, "
              "with --report-only to run nothing, to report them together")
    if paired:
        print(f"\n{paired}")


if __name__ == "__main__":
    sys.exit(main())

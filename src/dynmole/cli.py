"""``dynmole`` command line: parsing and dispatch only.

Each command's options come from the settings dataclasses (:mod:`dynmole.options`); a handler here
turns them into settings records and calls the library (:mod:`dynmole.experiments.commands`,
:mod:`dynmole.experiments.reproduce`, :mod:`dynmole.bench.command`). A user's mistake prints one
line ``error: ...`` (:func:`main`); third-party noise is kept off the console (:mod:`dynmole._console`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from ._console import quiet_third_party
from .errors import DynmoleError
from .experiments import commands
from .experiments.job import JOB_CLASSES, JobConfig
from .experiments.job import job_configs as _job_configs
from .options import add_fields, option_values
from .pretrained import DEFAULT_MODEL

DEBUG_ENV = "DYNMOLE_DEBUG"

# The main job's bounded defaults: it must finish in < 15 minutes on a 2-core CPU.
DEMO_DEFAULTS = {
    "tasks": ["arc_e", "piqa", "siqa", "winogrande"],  # short prompts: BoolQ's passages cost 4x more
    "train_limit": 120,
    "eval_limit": 100,
    "max_steps": 60,
    "batch_size": 8,
    "lr": 1e-3,
    "router_lr_scale": 10.0,  # where the routers learn in 60 steps (docs/regime.md); said when the demo starts
    "routing_probe_steps": 60,  # held-out routing before and after training, printed beside the accuracies
    "r": 8,
    "alpha": 16,
    "cutoff_len": 256,
    "logging_steps": 5,
    "output_dir": "runs/demo",
    "overwrite": True,  # the demo's own folder: a second `make demo` replaces the first one's results
}


def _settings(args: argparse.Namespace, classes: Sequence[type], defaults: dict[str, Any]) -> list[Any]:
    """The settings records ``args`` give: ``(JobConfig, TrainConfig, MoLEConfig)`` for the job
    classes, else ``[JobConfig]``; a config class refusing a value is the user's mistake."""
    try:
        values = option_values(args, classes, defaults)
        if tuple(classes) == JOB_CLASSES:
            return list(_job_configs(values))
        return [JobConfig(**{k: v for k, v in values.items() if k in JobConfig.__dataclass_fields__})]
    except (TypeError, ValueError) as err:
        raise DynmoleError(_one_line(err)) from err


def _cmd_run(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    commands.run_command(*_settings(args, JOB_CLASSES, defaults), log_samples=args.log_samples)


def _cmd_train(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    commands.train_job(*_settings(args, JOB_CLASSES, defaults), skip_invalid=args.skip_invalid)


def _cmd_eval(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    (job,) = _settings(args, (JobConfig,), defaults)
    commands.check_output_file(args.output, args.log_samples, args.harness)  # before any work
    if args.harness:
        commands.eval_harness_job(job, args.harness, args.adapter, args.output)
    else:
        commands.eval_job(job, args.adapter, args.output, args.log_samples)


def _cmd_compare(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    from .analysis.compare import compare_files  # numpy and the analysis: only when asked for

    print(compare_files(args.a, args.b, args.metric, args.resamples, args.seed), end="")


def _cmd_generate(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    print(commands.generate(args.model, args.adapter, args.prompt, args.max_new_tokens, args.trust_remote_code))


def _cmd_bench(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    from .bench.command import main as bench_main  # torch.compile and the benchmarks: only when asked for

    sys.exit(bench_main(args.passthrough))


def _cmd_reproduce(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    from .experiments.reproduce import main as reproduce_main  # the analysis and plotting: only when asked for

    sys.exit(reproduce_main(args.passthrough))


_PASSTHROUGH = {"bench": _cmd_bench, "reproduce": _cmd_reproduce}


_JOB_COMMANDS = (
    ("demo", "The main job on the embedded defaults: zero-shot eval, DynMoLE fine-tuning of SmolLM2, eval "
             "(< 15 min on 2 CPU cores).", DEMO_DEFAULTS),
    ("run", "Evaluate the base model, fine-tune, evaluate again; writes results.json/results.md and the adapter.", {}),
)
_CONFIG_HELP = "YAML or JSON file with option values (command-line options override it)"
_LOG_SAMPLES_HELP = ("keep every example's id, label, each choice's scores and the predictions in the results "
                     "file (what 'dynmole compare' reads)")


def build_parser() -> argparse.ArgumentParser:
    description = "Mixture-of-LoRA-Experts fine-tuning (DynMoLE, LD-MoLE and baselines)."
    parser = argparse.ArgumentParser(prog="dynmole", description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help=f"on an error, show its traceback ({DEBUG_ENV}=1 too)")
    for name, help_text, defaults in _JOB_COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.add_argument("--config", help=_CONFIG_HELP)
        p.add_argument("--log-samples", action="store_true", help=_LOG_SAMPLES_HELP)
        add_fields(p, JOB_CLASSES, defaults)
        p.set_defaults(handler=_cmd_run, defaults=defaults)
    p = sub.add_parser("train", help="Fine-tune an adapter (no evaluation).", description="Fine-tune an adapter.",
                       parents=[common])
    p.add_argument("--config", help=_CONFIG_HELP)
    p.add_argument("--skip-invalid", action="store_true", help="skip and count malformed rows of a local data file")
    add_fields(p, JOB_CLASSES, {})
    p.set_defaults(handler=_cmd_train, defaults={})
    _add_eval(sub.add_parser("eval", help="Accuracy of a base model, or base + adapter, on the benchmarks.",
                             parents=[common]))
    _add_generate(sub.add_parser("generate", help="Answer a prompt with a base model and an optional adapter.",
                                 parents=[common]))
    _add_compare(sub.add_parser("compare", help="Paired test of two results files written with --log-samples: "
                                "the difference per task and on average, its interval and p-values.",
                                parents=[common]))
    for name, help_text in (
        ("bench", "Performance benchmark (docs/performance.md); options after 'bench' go to it."),
        ("reproduce", "The papers' comparison, ablations and routing plots (docs/reproduce.md)."),
    ):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file with option values")
    p.add_argument("--adapter", help="adapter folder (dynmole or PEFT) to load on the base model")
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--log-samples", action="store_true", help=_LOG_SAMPLES_HELP + "; needs --output")
    p.add_argument("--harness", metavar="TASKS",
                   help="evaluate with lm-evaluation-harness instead: its task names and/or task YAML paths, "
                        "comma-separated (its prompts and metrics; --eval-limit documents per task; needs "
                        "pip install 'dynmole[harness]')")
    add_fields(p, (JobConfig,), {})
    p.set_defaults(handler=_cmd_eval, defaults={})


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registry name, folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--adapter", help="adapter folder (dynmole or PEFT)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder")
    p.set_defaults(handler=_cmd_generate, defaults={})


def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A.json", help="results file of A (dynmole eval/run --log-samples), or a grid "
                                               "run's predictions.json")
    p.add_argument("b", metavar="B.json", help="results file of B, scored on the same examples")
    p.add_argument("--metric", choices=("acc_norm", "acc"), default="acc_norm", help="(default: acc_norm)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.set_defaults(handler=_cmd_compare, defaults={})


def job_configs(argv: Sequence[str]) -> list[Any]:
    """The ``(JobConfig, TrainConfig, MoLEConfig)`` a ``demo``/``run``/``train`` command line gives."""
    args = build_parser().parse_args(argv)
    return _settings(args, JOB_CLASSES, args.defaults)


def _one_line(err: BaseException) -> str:
    """``err``'s message on one line, naming the file of an ``OSError`` (and without the quotes
    ``KeyError`` puts around its message)."""
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror}"
    elif len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    else:
        text = str(err)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the library's user-facing error or one of the few others a user's input
    causes (a missing file or folder, undecodable text, bad YAML, running out of memory); anything
    else is a bug and keeps its traceback."""
    kinds: list[type[BaseException]] = [DynmoleError, FileNotFoundError, IsADirectoryError, UnicodeDecodeError]
    for module, name in (("torch", "OutOfMemoryError"), ("yaml", "YAMLError")):
        if module in sys.modules:  # (not imported: cannot have raised)
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(err, tuple(kinds))


def _dispatch(argv: list[str]) -> None:
    if argv and argv[0] in _PASSTHROUGH:  # these commands parse their own options
        _PASSTHROUGH[argv[0]](argparse.Namespace(passthrough=[a for a in argv[1:] if a != "--debug"]), {})
        return
    args = build_parser().parse_args(argv)
    defaults = args.defaults
    del args.defaults
    args.handler(args, defaults)


def main(argv: Sequence[str] | None = None) -> None:
    """Run a command. A user's mistake (:func:`_is_user_error`) prints one line ``error: ...`` to
    stderr and exits with status 2; with ``--debug`` or ``DYNMOLE_DEBUG=1`` it raises, traceback and all.
    Ctrl-C prints one line saying how to resume and exits with status 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party()
    try:
        _dispatch(argv)
    except KeyboardInterrupt:
        command = argv[0] if argv else "dynmole"
        print(f"interrupted: `dynmole {command}` stopped before it finished; a run that saves checkpoints "
              "(--save-steps) continues from the newest complete one with --resume, and `dynmole reproduce` "
              "skips finished runs when started again", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0") or not _is_user_error(err):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)

"""``dynmole`` command line: a thin shell that parses, builds configs and calls the library.

Every option comes from a dataclass field (its ``metadata["help"]`` is the help text); a YAML
or JSON file given with ``--config`` sets the same fields, and options on the command line
override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from .config import MoLEConfig, is_dynmole_adapter_config, setting_fields
from .errors import DynmoleError

DEBUG_ENV = "DYNMOLE_DEBUG"

# The main job's bounded defaults: it must finish in < 15 minutes on a 2-core CPU.
DEMO_DEFAULTS = {
    "tasks": ["arc_e", "piqa", "siqa", "winogrande"],  # short prompts: BoolQ's passages cost 4x more
    "train_limit": 120,
    "eval_limit": 100,
    "max_steps": 60,
    "batch_size": 8,
    "lr": 1e-3,
    "r": 8,
    "alpha": 16,
    "cutoff_len": 256,
    "logging_steps": 5,
    "output_dir": "runs/demo",
    "overwrite": True,  # the demo's own folder: a second `make demo` replaces the first one's results
}


def _parse_num_experts(text: str) -> int | list[int] | str:
    if text.isdigit():
        return int(text)
    if "," in text:
        return [int(part) for part in text.split(",")]
    return text


def _annotation(tp: Any) -> Any:
    """A dataclass field's annotation as a type (they are strings under ``from __future__ import annotations``)."""
    return eval(tp, vars(typing) | {"types": types}) if isinstance(tp, str) else tp


def _field_type(tp: Any) -> tuple[Any, bool]:
    """(parser for one value, is_list) for a dataclass field annotation."""
    tp = _annotation(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if len(args) == 1:
            return _field_type(args[0])
        return _parse_num_experts, False
    if typing.get_origin(tp) is list:
        return str, True
    return tp, False


def _add_fields(parser: argparse.ArgumentParser, classes: Sequence[type], defaults: dict[str, Any]) -> None:
    """One option per dataclass field; a name two classes share (``method``) is added once."""
    seen: set[str] = set()
    for cls in classes:
        group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
        _add_class_fields(group, cls, defaults, seen)


def _add_class_fields(group: Any, cls: type, defaults: dict[str, Any], seen: set[str]) -> None:
    for f in [f for f in setting_fields(cls) if f.name not in seen]:
        seen.add(f.name)
        kind, is_list = _field_type(f.type)
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        elif is_list:
            group.add_argument(flag, dest=f.name, type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
                               default=argparse.SUPPRESS, help=help_text + " [comma-separated]")
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text)


_EXPECTED = {int: "an integer", float: "a number", str: "a string",
             _parse_num_experts: "an integer, a list of integers or groups such as 2-4-6-8"}


def _file_value(f: dataclasses.Field, value: Any, path: str) -> Any:
    """The value of field ``f`` read from config file ``path``, converted and checked by the rules of
    its command-line option: a string goes through the option's parser (a YAML ``lr: 1e-3`` is a
    string), a boolean must be a YAML/JSON boolean (never the string "false", which is truthy)."""
    kind, is_list = _field_type(f.type)
    expected = ("true or false (a boolean, not a string or number)" if kind is bool else
                "a list of names or a comma-separated string" if is_list else _EXPECTED[kind])
    error = DynmoleError(f"config file {path}: {f.name} must be {expected}, got {value!r}")
    if value is None:
        if type(None) in typing.get_args(_annotation(f.type)):
            return None
        raise error
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise error
    if is_list:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return [item.strip() for item in items if item.strip()]
        raise error
    if kind is _parse_num_experts and isinstance(value, list):
        if all(isinstance(n, int) and not isinstance(n, bool) for n in value):
            return value
        raise error
    if isinstance(value, (bool, list, dict)):
        raise error
    try:
        return kind(str(value))
    except ValueError:
        raise error from None


def _read_config_file(path: str) -> dict[str, Any]:
    """The option values in ``--config`` file ``path`` (YAML for .yaml/.yml, else JSON)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"not UTF-8 text ({err.reason} at byte {err.start})"
        raise DynmoleError(f"--config {path}: {reason}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise DynmoleError(f"--config {path}: bad YAML{where}: {getattr(err, 'problem', None) or err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            where = f"line {err.lineno}, column {err.colno}"
            raise DynmoleError(f"--config {path}: bad JSON at {where}: {err.msg}") from None
    if not isinstance(data, dict):
        raise DynmoleError(f"config file {path} must hold a mapping of option names to values")
    return data


def _build(cls: type, values: dict[str, Any], defaults: dict[str, Any]) -> Any:
    names = {f.name for f in setting_fields(cls)}
    if cls is MoLEConfig and values.get("method") in ("lora", "dora"):
        names.discard("method")  # PEFT methods use r/alpha/dropout/target_modules only
    return cls(**{k: v for k, v in {**defaults, **values}.items() if k in names})


def _configs(args: argparse.Namespace, classes: Sequence[type], defaults: dict[str, Any]) -> list[Any]:
    values = dict(vars(args))
    for key in ("command", "handler", "config"):
        values.pop(key, None)
    try:
        if args.config:
            from_file = _read_config_file(args.config)
            fields = {f.name: f for cls in classes for f in setting_fields(cls)}
            unknown = sorted(set(from_file) - set(fields))
            if unknown:
                raise DynmoleError(f"unknown option(s) in {args.config}: {', '.join(unknown)}")
            values = {**{k: _file_value(fields[k], v, args.config) for k, v in from_file.items()}, **values}
        return [_build(cls, values, defaults) for cls in classes]
    except (TypeError, ValueError) as err:  # a config class refusing a value
        raise DynmoleError(_one_line(err)) from err


def _cmd_run(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    from .job import JobConfig, run_job
    from .train import TrainConfig

    job, train_config, mole = _configs(args, (JobConfig, TrainConfig, MoLEConfig), defaults)
    _print_data_note(job)
    result = run_job(job, train_config, mole)
    print(result["table"])
    print(f"results: {Path(train_config.output_dir) / 'results.json'}; adapter: {Path(train_config.output_dir) / 'adapter'}")


def _cmd_train(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    import torch

    from .data import format_examples
    from .job import JobConfig
    from .outputs import check_output_dir
    from .pretrained import load_model_and_tokenizer
    from .routing_probe import probe_examples
    from .train import TrainConfig, adapt_model, train

    job, train_config, mole = _configs(args, (JobConfig, TrainConfig, MoLEConfig), defaults)
    check_output_dir(train_config.output_dir, train_config.resume, train_config.overwrite)  # before any work
    torch.manual_seed(train_config.seed)  # the adapter's initialisation, as run/demo/reproduce seed it
    _print_data_note(job)
    examples = job.train_examples(train_config.seed, skip_invalid=args.skip_invalid)  # the data first
    examples = format_examples(examples, job.scoring)  # the format `dynmole eval --scoring` evaluates
    probe = None
    if train_config.routing_probe_steps > 0:  # held-out examples, in the training format
        held_out = job.eval_examples(train_config.routing_probe_size)
        probe = probe_examples(held_out, train_config.routing_probe_size, job.scoring)
    model, tokenizer = load_model_and_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    model = adapt_model(model, job.method, mole)
    model.print_trainable_parameters()
    _, summary = train(model, tokenizer, examples, train_config, probe)
    print(f"trained {summary['steps']} steps on {summary['examples']} examples, train loss "
          f"{summary['train_loss']:.4f}; adapter: {Path(train_config.output_dir) / 'adapter'}")


def _print_data_note(job: Any) -> None:
    """Say which rows of a local data file are trained on and which are held out."""
    note = job.data_note()
    if note:
        print(note)


def _is_peft_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a PEFT adapter: its ``adapter_config.json`` parses to an object with
    ``peft_type`` and without dynmole's marker (ours may carry ``peft_type`` too)."""
    try:
        data = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False  # load_mole_model says what is wrong with the folder
    return isinstance(data, dict) and "peft_type" in data and not is_dynmole_adapter_config(data)


def _load_for_inference(model_name: str, adapter: str | None, trust_remote_code: bool):
    from .pretrained import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name, trust_remote_code=trust_remote_code)
    if adapter:
        if _is_peft_adapter(Path(adapter)):
            from peft import PeftModel

            from .model import require_adapter_files

            require_adapter_files(Path(adapter))

            model = PeftModel.from_pretrained(model, adapter)
        else:
            from .model import load_mole_model

            model = load_mole_model(model, adapter)
    return model.eval(), tokenizer


def _cmd_eval(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    from .evaluate import describe_scoring, evaluate_tasks, results_tables, write_results
    from .io import ensure_writable_dir
    from .job import JobConfig, machine_description

    (job,) = _configs(args, (JobConfig,), defaults)
    if args.output:  # before any work
        if Path(args.output).is_dir():
            raise DynmoleError(f"--output {args.output} is a folder: give the path of the results file")
        ensure_writable_dir(Path(args.output).parent, "folder of --output")
    if args.harness:
        _eval_harness(args, job)
        return
    _print_data_note(job)
    examples = job.eval_examples(job.eval_limit)  # the data first: its errors show at once
    model, tokenizer = _load_for_inference(job.model, args.adapter, job.trust_remote_code)
    name = f"{job.model} + {args.adapter}" if args.adapter else f"{job.model} (zero-shot)"
    results = evaluate_tasks(model, tokenizer, examples, job.eval_batch_size, job.scoring,
                             max_length=job.eval_cutoff_len)
    print(results_tables({name: results}, job.scoring))
    if args.output:
        write_results(args.output, {name: results}, {
            "model": job.model, "adapter": args.adapter, "scoring": job.scoring,
            "scoring_description": describe_scoring(job.scoring), "machine": machine_description(),
            "splits": job.split_descriptions("eval", job.eval_limit),
        })
        print(f"results: {args.output}")


def _eval_harness(args: argparse.Namespace, job: Any) -> None:
    """``dynmole eval --harness``: lm-evaluation-harness tasks, their prompts and metrics (``--tasks``,
    ``--source`` and ``--scoring`` do not apply); each task's data is loaded before the model."""
    from .harness import evaluate_harness, harness_table, load_harness_tasks
    from .io import write_json
    from .job import machine_description

    tasks = load_harness_tasks([t.strip() for t in args.harness.split(",") if t.strip()])
    model, tokenizer = _load_for_inference(job.model, args.adapter, job.trust_remote_code)
    results = evaluate_harness(model, tokenizer, tasks, job.eval_limit, job.eval_batch_size)
    print(harness_table(results))
    if args.output:
        write_json(args.output, {"results": results, "metadata": {
            "model": job.model, "adapter": args.adapter, "harness_tasks": args.harness, "machine": machine_description()}})
        print(f"results: {args.output}")


def _cmd_generate(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    import torch

    model, tokenizer = _load_for_inference(args.model, args.adapter, args.trust_remote_code)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def _cmd_bench(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    from . import bench

    sys.exit(bench.main(args.passthrough))


def _cmd_reproduce(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    from . import reproduce

    sys.exit(reproduce.main(args.passthrough))


_PASSTHROUGH = {"bench": _cmd_bench, "reproduce": _cmd_reproduce}


def build_parser() -> argparse.ArgumentParser:
    from .job import JobConfig
    from .pretrained import DEFAULT_MODEL
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="dynmole", description="Mixture-of-LoRA-Experts fine-tuning (DynMoLE, LD-MoLE and baselines).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help=f"on an error, show its traceback ({DEBUG_ENV}=1 too)")
    job_classes = (JobConfig, TrainConfig, MoLEConfig)
    for name, help_text, defaults in (
        ("demo", "The main job on the embedded defaults: zero-shot eval, DynMoLE fine-tuning of SmolLM2, eval (< 15 min on 2 CPU cores).", DEMO_DEFAULTS),
        ("run", "Evaluate the base model, fine-tune, evaluate again; writes results.json/results.md and the adapter.", {}),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.add_argument("--config", help="YAML or JSON file with option values (command-line options override it)")
        _add_fields(p, job_classes, defaults)
        p.set_defaults(handler=_cmd_run, defaults=defaults)
    p = sub.add_parser("train", help="Fine-tune an adapter (no evaluation).", description="Fine-tune an adapter.",
                       parents=[common])
    p.add_argument("--config", help="YAML or JSON file with option values (command-line options override it)")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count malformed rows of a local data file")
    _add_fields(p, job_classes, {})
    p.set_defaults(handler=_cmd_train, defaults={})
    p = sub.add_parser("eval", help="Accuracy of a base model, or base + adapter, on the benchmarks.", parents=[common])
    p.add_argument("--config", help="YAML or JSON file with option values")
    p.add_argument("--adapter", help="adapter folder (dynmole or PEFT) to load on the base model")
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--harness", metavar="TASKS",
                   help="evaluate with lm-evaluation-harness instead: its task names and/or task YAML paths, "
                        "comma-separated (its prompts and metrics; --eval-limit documents per task; needs "
                        "pip install 'dynmole[harness]')")
    _add_fields(p, (JobConfig,), {})
    p.set_defaults(handler=_cmd_eval, defaults={})
    p = sub.add_parser("generate", help="Answer a prompt with a base model and an optional adapter.", parents=[common])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--adapter", help="adapter folder (dynmole or PEFT)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder")
    p.set_defaults(handler=_cmd_generate, defaults={})
    for name, help_text in (
        ("bench", "Performance benchmark (docs/performance.md); options after 'bench' go to it."),
        ("reproduce", "The papers' comparison, ablations and routing plots (docs/reproduce.md)."),
    ):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def job_configs(argv: Sequence[str]) -> list[Any]:
    """The ``(JobConfig, TrainConfig, MoLEConfig)`` a ``demo``/``run``/``train`` command line gives."""
    from .job import JobConfig
    from .train import TrainConfig

    args = build_parser().parse_args(argv)
    return _configs(args, (JobConfig, TrainConfig, MoLEConfig), args.defaults)


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
    stderr and exits with status 2; with ``--debug`` or ``DYNMOLE_DEBUG=1`` it raises, traceback and all."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _dispatch(argv)
    except Exception as err:
        if "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0") or not _is_user_error(err):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)

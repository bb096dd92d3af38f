"""``dynmole`` command line: a thin shell that parses, builds configs and calls the library.

Every option comes from a dataclass field (its ``metadata["help"]`` is the help text); a YAML
or JSON file given with ``--config`` sets the same fields, and options on the command line
override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from .config import MoLEConfig

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
}


def _parse_num_experts(text: str) -> int | list[int] | str:
    if text.isdigit():
        return int(text)
    if "," in text:
        return [int(part) for part in text.split(",")]
    return text


def _field_type(tp: Any) -> tuple[Any, bool]:
    """(parser for one value, is_list) for a dataclass field annotation."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"types": types})  # annotations are strings under __future__
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
    for f in [f for f in dataclasses.fields(cls) if f.name not in seen]:
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


def _read_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"error: config file {path} must hold a mapping of option names to values")
    return data


def _build(cls: type, values: dict[str, Any], defaults: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    if cls is MoLEConfig and values.get("method") in ("lora", "dora"):
        names.discard("method")  # PEFT methods use r/alpha/dropout/target_modules only
    return cls(**{k: v for k, v in {**defaults, **values}.items() if k in names})


def _configs(args: argparse.Namespace, classes: Sequence[type], defaults: dict[str, Any]) -> list[Any]:
    values = dict(vars(args))
    for key in ("command", "handler", "config"):
        values.pop(key, None)
    if args.config:
        from_file = _read_config_file(args.config)
        known = {f.name for cls in classes for f in dataclasses.fields(cls)}
        unknown = sorted(set(from_file) - known)
        if unknown:
            raise SystemExit(f"error: unknown option(s) in {args.config}: {', '.join(unknown)}")
        values = {**from_file, **values}
    try:
        return [_build(cls, values, defaults) for cls in classes]
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def _cmd_run(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    from .job import JobConfig, run_job
    from .train import TrainConfig

    job, train_config, mole = _configs(args, (JobConfig, TrainConfig, MoLEConfig), defaults)
    result = run_job(job, train_config, mole)
    print(result["table"])
    print(f"results: {Path(train_config.output_dir) / 'results.json'}; adapter: {Path(train_config.output_dir) / 'adapter'}")


def _cmd_train(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    import torch

    from .data import format_examples, load_examples, load_mixture
    from .job import JobConfig
    from .pretrained import load_model_and_tokenizer
    from .routing_probe import probe_examples
    from .train import TrainConfig, adapt_model, train

    job, train_config, mole = _configs(args, (JobConfig, TrainConfig, MoLEConfig), defaults)
    torch.manual_seed(train_config.seed)  # the adapter's initialisation, as run/demo/reproduce seed it
    model, tokenizer = load_model_and_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    examples = load_mixture(job.tasks, "train", job.train_limit, job.source, job.eval_fraction,
                            skip_invalid=args.skip_invalid, seed=train_config.seed)
    examples = format_examples(examples, job.scoring)  # the format `dynmole eval --scoring` evaluates
    probe = None
    if train_config.routing_probe_steps > 0:  # held-out examples, in the training format
        held_out = {t: load_examples(t, "eval", job.source, train_config.routing_probe_size, job.eval_fraction)
                    for t in job.tasks}
        probe = probe_examples(held_out, train_config.routing_probe_size, job.scoring)
    model = adapt_model(model, job.method, mole)
    model.print_trainable_parameters()
    _, summary = train(model, tokenizer, examples, train_config, probe)
    print(f"trained {summary['steps']} steps on {summary['examples']} examples, train loss "
          f"{summary['train_loss']:.4f}; adapter: {Path(train_config.output_dir) / 'adapter'}")


def _load_for_inference(model_name: str, adapter: str | None, trust_remote_code: bool):
    from .pretrained import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name, trust_remote_code=trust_remote_code)
    if adapter:
        if (Path(adapter) / "adapter_config.json").is_file() and "peft_type" in (Path(adapter) / "adapter_config.json").read_text():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        else:
            from .model import load_mole_model

            model = load_mole_model(model, adapter)
    return model.eval(), tokenizer


def _cmd_eval(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    from .data import load_examples, split_description
    from .evaluate import describe_scoring, evaluate_tasks, results_tables, write_results
    from .job import JobConfig, machine_description

    (job,) = _configs(args, (JobConfig,), defaults)
    model, tokenizer = _load_for_inference(job.model, args.adapter, job.trust_remote_code)
    examples = {t: load_examples(t, "eval", job.source, job.eval_limit, job.eval_fraction) for t in job.tasks}
    name = f"{job.model} + {args.adapter}" if args.adapter else f"{job.model} (zero-shot)"
    results = evaluate_tasks(model, tokenizer, examples, job.eval_batch_size, job.scoring)
    print(results_tables({name: results}, job.scoring))
    if args.output:
        write_results(args.output, {name: results}, {
            "model": job.model, "adapter": args.adapter, "scoring": job.scoring,
            "scoring_description": describe_scoring(job.scoring), "machine": machine_description(),
            "splits": [split_description(t, "eval", job.source, job.eval_fraction, job.eval_limit) for t in job.tasks],
        })
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
    job_classes = (JobConfig, TrainConfig, MoLEConfig)
    for name, help_text, defaults in (
        ("demo", "The main job on the embedded defaults: zero-shot eval, DynMoLE fine-tuning of SmolLM2, eval (< 15 min on 2 CPU cores).", DEMO_DEFAULTS),
        ("run", "Evaluate the base model, fine-tune, evaluate again; writes results.json/results.md and the adapter.", {}),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML or JSON file with option values (command-line options override it)")
        _add_fields(p, job_classes, defaults)
        p.set_defaults(handler=_cmd_run, defaults=defaults)
    p = sub.add_parser("train", help="Fine-tune an adapter (no evaluation).", description="Fine-tune an adapter.")
    p.add_argument("--config", help="YAML or JSON file with option values (command-line options override it)")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count malformed rows of a local data file")
    _add_fields(p, job_classes, {})
    p.set_defaults(handler=_cmd_train, defaults={})
    p = sub.add_parser("eval", help="Accuracy of a base model, or base + adapter, on the benchmarks.")
    p.add_argument("--config", help="YAML or JSON file with option values")
    p.add_argument("--adapter", help="adapter folder (dynmole or PEFT) to load on the base model")
    p.add_argument("--output", help="write the results JSON here")
    _add_fields(p, (JobConfig,), {})
    p.set_defaults(handler=_cmd_eval, defaults={})
    p = sub.add_parser("generate", help="Answer a prompt with a base model and an optional adapter.")
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


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in _PASSTHROUGH:  # these commands parse their own options
        _PASSTHROUGH[argv[0]](argparse.Namespace(passthrough=argv[1:]), {})
        return
    args = parser.parse_args(argv)
    defaults = args.defaults
    del args.defaults
    args.handler(args, defaults)

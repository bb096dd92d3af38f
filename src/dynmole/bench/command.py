"""The ``dynmole bench`` command: its options, presets and sections, run in one process (see the
package docstring, :mod:`dynmole.bench`)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ..config import METHODS
from ..io import write_json
from .layer import DTYPES, LayerPoint, check_compile, run_layer_bench
from .model import ModelSize, memory_worker, run_model_bench
from .report import Row, check_rows, check_targets, format_table, format_targets, load_average, machine_info
from .train import run_train_bench

TARGET_POINT = (4096, 512, 6, 16)  # d, T, N, r

# Sizes of the full grid.
FULL_D = (576, 2048, 4096)
FULL_T = (1, 512, 4096)
FULL_N = (6, 8)
FULL_R = (8, 16, 24)


@dataclass
class Preset:
    points: list[LayerPoint]
    compiled_points: list[LayerPoint]
    warmup: int
    reps: int
    model: ModelSize


def preset(name: str) -> Preset:
    target = LayerPoint(*TARGET_POINT)
    smollm2 = ModelSize("smollm2-135m", experts=6, r=16, batch=4, seq=128, reps=7, gen_tokens=32, gen_prompt=16)
    if name == "tiny":  # for the tests: a few seconds
        point = LayerPoint(32, 8, 3, 2)
        return Preset([point], [], 1, 2, ModelSize("tiny-1", 3, 2, 2, 8, 2, 3, 4))
    if name == "quick":  # tiny sizes, < 2 minutes
        points = [LayerPoint(256, 64, 6, 8), LayerPoint(576, 128, 6, 16)]
        return Preset(points, [points[0]], 1, 5, ModelSize("tiny", 6, 16, 2, 32, 5, 8, 8))
    if name == "full":
        points = [LayerPoint(d, t, n, r) for d in FULL_D for t in FULL_T for n in FULL_N for r in FULL_R]
        points.sort(key=lambda p: (p != target, p.d * p.T))
        return Preset(points, [target, LayerPoint(576, 512, 6, 16)], 2, 15, smollm2)
    # default: the target point first, then SmolLM2's width, a decode step and a wide/short pair
    points = [
        target,
        LayerPoint(576, 512, 6, 16),
        LayerPoint(2048, 512, 8, 8),
        LayerPoint(576, 4096, 8, 24),
        LayerPoint(4096, 1, 6, 16),
    ]
    return Preset(points, [target, LayerPoint(576, 512, 6, 16)], 2, 11, smollm2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynmole bench",
        description="Speed and memory of dynmole's MoLE layers and models against PEFT LoRA of equal total rank "
        "(N*r), measured interleaved in one process.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes and a tiny random model (< 2 minutes)")
    size.add_argument("--full", action="store_true", help="the whole grid d x T x N x r (hours on a CPU)")
    size.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: a few seconds
    parser.add_argument("--json", metavar="PATH", help="write the rows and machine info as JSON")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="base layer / model dtype")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sections", default="layer,model", help="comma-separated: layer, model, train")
    parser.add_argument("--methods", default=",".join(METHODS), help="routing rules of the MoLE layer rows")
    parser.add_argument("--model", help="model of the model section: a registry name, a folder, or 'tiny'")
    parser.add_argument("--reps", type=int, help="timed repetitions (default: per preset)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up rounds (default: per preset)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant and check")
    parser.add_argument("--no-peers", action="store_true", help="skip the per-expert-loop and gather peers")
    parser.add_argument("--dropout", type=float, default=0.05, help="adapter dropout (train-mode rows)")
    parser.add_argument(
        "--points", help="layer sizes instead of the preset's, comma-separated DxTxNxR, e.g. 4096x512x6x16"
    )
    parser.add_argument(
        "--threads", type=int,
        help="torch.set_num_threads for the run (default: torch's own; 1 with the internal test preset)",
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: one memory measurement
    return parser


def parse_points(text: str) -> list[LayerPoint]:
    points = []
    for item in text.split(","):
        try:
            d, t, n, r = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"a point looks like DxTxNxR, e.g. 4096x512x6x16; got {item!r}") from None
        if min(d, t, n, r) < 1:
            raise ValueError(f"every size must be >= 1, got {item!r}")
        points.append(LayerPoint(d, t, n, r))
    return points


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_worker:
        return memory_worker(args.memory_worker)
    threads = torch.get_num_threads()
    if args.threads or args.tiny:
        # Tiny sizes gain nothing from intra-op threads, and on a busy machine the threads' barriers
        # cost milliseconds per op.
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _checked(args: argparse.Namespace) -> tuple[str, Preset, int, int, list[str]]:
    """(preset name, preset, warmup, reps, methods) of ``args``; raises ``ValueError`` with the message
    of the first bad option."""
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    name = "tiny" if args.tiny else "quick" if args.quick else "full" if args.full else "default"
    setup = preset(name)
    if args.points:
        setup.points = parse_points(args.points)
        setup.compiled_points = [p for p in setup.points if p in setup.compiled_points] or setup.points[:1]
    warmup = setup.warmup if args.warmup is None else args.warmup
    reps = setup.reps if args.reps is None else args.reps
    if reps < 1 or warmup < 0:
        raise ValueError("--reps must be >= 1 and --warmup >= 0")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return name, setup, warmup, reps, methods


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Run the sections ``args`` ask for, print the table and the targets, write the JSON report."""
    try:
        name, setup, warmup, reps, methods = _checked(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python -m dynmole.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": name,
        "dtype": args.dtype,
        "machine": machine_info(device),
        "load_average_start": load_average(),
        "timing": "interleaved round-robin (order rotated each repetition); median of reps; ratio = median of "
        "per-repetition ratios to the PEFT LoRA row of the same scenario (q1, q3 = its quartiles)",
        "warmup": warmup,
        "reps": reps,
    }
    rows = []

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:6.1f}s {message}", file=sys.stderr, flush=True)

    if not args.no_compile and "dynmole" in methods:
        log("[compile] torch._dynamo.explain on a tiny MoLELinear per routing rule")
        report["compile_check"] = check_compile(methods, device, DTYPES[args.dtype])
    if "layer" in sections:
        rows += run_layer_bench(
            setup.points, dtype_name=args.dtype, device=device, methods=methods, dropout=args.dropout,
            warmup=warmup, reps=reps, peers=not args.no_peers,
            compiled_points=[] if args.no_compile else setup.compiled_points, log=log,
        )
    if "model" in sections:
        model_rows, model_info = run_model_bench(
            setup.model, model_name=args.model or setup.model.model, dtype_name=args.dtype, device=device,
            dropout=args.dropout, warmup=warmup, reps=args.reps or setup.model.reps, log=log,
        )
        rows += model_rows
        report["model"] = model_info
    if "train" in sections:
        train_rows, train_info = run_train_bench(
            name, model_name=args.model or setup.model.model, device=device, dropout=args.dropout,
            warmup=args.warmup, reps=args.reps, log=log,
        )
        rows += train_rows
        report["train"] = train_info
    _finish(report, rows, args.json, started)
    return 0


def _finish(report: dict[str, Any], rows: list[Row], json_path: str | None, started: float) -> None:
    """Complete ``report`` with the rows, targets and problems; print the table; write the JSON."""
    report["load_average_end"] = load_average()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["rows"] = [asdict(row) for row in rows]
    report["targets"] = targets = check_targets(rows)
    problems = check_rows(rows)
    report["problems"] = problems
    print(format_table(rows) + format_targets(targets))
    print(f"\n({report['seconds']}s; load average {report['load_average_start']} -> {report['load_average_end']}; "
          f"{report['machine']['torch_threads']} torch threads on {report['machine']['cpu_count']} CPUs)")
    if json_path:
        write_json(json_path, report)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)

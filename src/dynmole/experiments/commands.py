"""What the ``demo``, ``run``, ``train``, ``eval`` and ``generate`` commands do, as library calls.

The command line (:mod:`dynmole.cli`) parses options into settings records and calls these; each
is usable from Python the same way. Fine-tuning goes through the one pipeline (:mod:`.pipeline`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..adapters import load_adapter
from ..config import MoLEConfig
from ..errors import DynmoleError
from ..evaluation import describe_scoring, results_tables, write_results
from ..evaluation.harness import evaluate_harness, harness_table, load_harness_tasks
from ..evaluation.report import machine_description
from ..io import atomic_write, ensure_writable_dir, write_json
from ..pretrained import load_model_and_tokenizer
from ..training.config import TrainConfig
from ..training.probe import probe_records, routing_before_after
from ..training.runs import ADAPTER_NAME, RESULTS_MD_NAME, RESULTS_NAME, check_output_dir
from .job import JobConfig
from .pipeline import evaluate_model, fine_tune, prepare, run_record

ROUTING_SLICE = 16
"""Examples per task whose routing statistics ``dynmole run`` records (``routing_stats_eval_slice``)."""


def print_data_note(job: JobConfig) -> None:
    """Say which rows of a local data file are trained on and which are held out."""
    note = job.data_note()
    if note:
        print(note)


def run_job(job: JobConfig, train_config: TrainConfig, mole: MoLEConfig, log_samples: bool = False) -> dict[str, Any]:
    """Evaluate the base model, fine-tune with ``job.method``, evaluate again, write results.

    Writes ``<output_dir>/results.json`` and ``results.md``; the adapter lands in
    ``<output_dir>/adapter``. Returns the results dict. The output folder is checked first
    (:func:`dynmole.training.runs.check_output_dir`), before anything is loaded or evaluated.
    The routing statistics are those of the first :data:`ROUTING_SLICE` evaluation examples of
    each task, evaluated again with the statistics on: the main evaluation keeps the
    shared-context path, whose numbers the statistics' full sequences would move by float rounding.
    With ``log_samples`` each run's results also keep every example's choice scores and predictions
    (``"samples"``, as ``dynmole eval --log-samples``), which ``dynmole compare`` reads.
    """
    started = time.time()
    check_output_dir(train_config.output_dir, train_config.resume, train_config.overwrite)
    torch.manual_seed(train_config.seed)
    train_examples = job.train_examples(train_config.seed)  # the data first: its errors show at once
    eval_examples = job.eval_examples(job.eval_limit)
    prepared = prepare(job, train_config, train_examples, eval_examples)
    model, tokenizer = load_model_and_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    runs: dict[str, dict[str, Any]] = {}
    if job.eval_base:
        runs["base (zero-shot)"] = evaluate_model(model, tokenizer, eval_examples, job, routing=False,
                                                  log_samples=log_samples)[0]
    model, summary = fine_tune(model, tokenizer, job, train_config, mole, prepared)
    runs[f"{job.method} (fine-tuned)"] = evaluate_model(model, tokenizer, eval_examples, job, routing=False,
                                                       log_samples=log_samples)[0]
    routing_slice = {task: examples[:ROUTING_SLICE] for task, examples in eval_examples.items()}
    routing = evaluate_model(model, tokenizer, routing_slice, job, progress=False)[1]
    metadata = {
        **run_record(job, train_config, mole),
        "splits": {
            "train": job.split_descriptions("train", job.train_limit),
            "eval": job.split_descriptions("eval", job.eval_limit),
        },
        "scoring": job.scoring,
        "scoring_description": describe_scoring(job.scoring),
        "machine": machine_description(),
        "train_summary": {k: v for k, v in summary.items() if k != "log_history"},
        "routing_stats_eval_slice": routing,
        "wall_time_s": round(time.time() - started, 1),
    }
    output_dir = Path(train_config.output_dir)
    probes = probe_records(output_dir)
    if probes:
        metadata["routing_probe"] = {"examples": len(prepared.probe or []), "before": probes[0], "after": probes[-1]}
    write_results(output_dir / RESULTS_NAME, runs, metadata)
    table = results_tables(runs, job.scoring) + (
        f"\n{routing_before_after(probes, len(prepared.probe or []))}" if len(probes) > 1 else "")
    atomic_write(output_dir / RESULTS_MD_NAME, lambda tmp: Path(tmp).write_text(
        f"# {job.method} on {job.model}\n\nScoring: {metadata['scoring_description']}.\n\n"
        f"{table}\nMachine: {metadata['machine']}\n"))
    return {"runs": runs, "metadata": metadata, "table": table}


def run_command(job: JobConfig, train_config: TrainConfig, mole: MoLEConfig,
                log_samples: bool = False) -> dict[str, Any]:
    """``dynmole run``/``demo``: :func:`run_job`, saying which data it uses and printing its tables."""
    print_data_note(job)
    if train_config.router_lr_scale != 1.0:
        print(f"routers train at {train_config.router_lr_scale:g}x the learning rate (--router-lr-scale): a departure "
              "from the papers, which train them at the learning rate (docs/regime.md)")
    result = run_job(job, train_config, mole, log_samples)
    output_dir = Path(train_config.output_dir)
    print(result["table"])
    print(f"results: {output_dir / RESULTS_NAME}; adapter: {output_dir / ADAPTER_NAME}")
    return result


def train_job(job: JobConfig, train_config: TrainConfig, mole: MoLEConfig,
              skip_invalid: bool = False) -> dict[str, Any]:
    """``dynmole train``: fine-tune on ``job``'s data without evaluating; returns the training summary.
    The routing probe's held-out examples are loaded only when it is on (``routing_probe_steps``)."""
    check_output_dir(train_config.output_dir, train_config.resume, train_config.overwrite)  # before any work
    torch.manual_seed(train_config.seed)  # the adapter's initialisation, as run/demo/reproduce seed it
    print_data_note(job)
    examples = job.train_examples(train_config.seed, skip_invalid=skip_invalid)  # the data first
    held_out = job.eval_examples(train_config.routing_probe_size) if train_config.routing_probe_steps > 0 else None
    prepared = prepare(job, train_config, examples, held_out)
    model, tokenizer = load_model_and_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    _, summary = fine_tune(model, tokenizer, job, train_config, mole, prepared, show_parameters=True)
    print(f"trained {summary['steps']} steps on {summary['examples']} examples, train loss "
          f"{summary['train_loss']:.4f}; adapter: {Path(train_config.output_dir) / ADAPTER_NAME}")
    return summary


def load_for_inference(model_name: str, adapter: str | None, trust_remote_code: bool) -> tuple[Any, Any]:
    """A base model by name (:mod:`dynmole.pretrained`) with an optional adapter folder, dynmole's
    or PEFT's (:func:`dynmole.adapters.load_adapter`), in eval mode, and its tokenizer."""
    model, tokenizer = load_model_and_tokenizer(model_name, trust_remote_code=trust_remote_code)
    if adapter:
        model = load_adapter(model, adapter)
    return model.eval(), tokenizer


def check_output_file(output: str | None, log_samples: bool = False, harness: str | None = None) -> None:
    """Refuse an ``--output`` results path that is a folder or cannot be written, and ``--log-samples``
    without ``--output`` or with ``--harness`` (before any work)."""
    if log_samples and not output:
        raise DynmoleError("--log-samples needs --output: the samples are written into the results file it names")
    if log_samples and harness:
        raise DynmoleError("--log-samples applies to dynmole's own evaluation, not to --harness")
    if output:
        if Path(output).is_dir():
            raise DynmoleError(f"--output {output} is a folder: give the path of the results file")
        ensure_writable_dir(Path(output).parent, "folder of --output")


def eval_job(job: JobConfig, adapter: str | None, output: str | None, log_samples: bool = False) -> None:
    """``dynmole eval``: accuracy of the base model, or base + ``adapter``, on ``job``'s held-out data.
    With ``log_samples`` the results file ``output`` also keeps, per task, every example's id, gold
    label, each choice's scores and the predicted choices (``"samples"``), which ``dynmole compare`` reads."""
    print_data_note(job)
    examples = job.eval_examples(job.eval_limit)  # the data first: its errors show at once
    model, tokenizer = load_for_inference(job.model, adapter, job.trust_remote_code)
    name = f"{job.model} + {adapter}" if adapter else f"{job.model} (zero-shot)"
    results = evaluate_model(model, tokenizer, examples, job, routing=False, log_samples=log_samples)[0]
    print(results_tables({name: results}, job.scoring))
    if output:
        write_results(output, {name: results}, {
            "model": job.model, "adapter": adapter, "scoring": job.scoring,
            "scoring_description": describe_scoring(job.scoring), "machine": machine_description(),
            "splits": job.split_descriptions("eval", job.eval_limit),
        })
        print(f"results: {output}")


def eval_harness_job(job: JobConfig, harness: str, adapter: str | None, output: str | None) -> None:
    """``dynmole eval --harness``: lm-evaluation-harness tasks, their prompts and metrics (``--tasks``,
    ``--source`` and ``--scoring`` do not apply); each task's data is loaded before the model."""
    tasks = load_harness_tasks([t.strip() for t in harness.split(",") if t.strip()])
    model, tokenizer = load_for_inference(job.model, adapter, job.trust_remote_code)
    results = evaluate_harness(model, tokenizer, tasks, job.eval_limit, job.eval_batch_size)
    print(harness_table(results))
    if output:
        write_json(output, {"results": results, "metadata": {
            "model": job.model, "adapter": adapter, "harness_tasks": harness, "machine": machine_description()}})
        print(f"results: {output}")


def generate(model_name: str, adapter: str | None, prompt: str, max_new_tokens: int, trust_remote_code: bool) -> str:
    """``dynmole generate``: the greedy continuation of ``prompt``."""
    model, tokenizer = load_for_inference(model_name, adapter, trust_remote_code)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


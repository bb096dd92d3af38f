"""Watch the routers learn: routing statistics on held-out tokens during training.

Every ``routing_probe_steps`` optimizer steps, :class:`RoutingProbe` runs the MoLE model in eval
mode over a fixed set of held-out examples (prompt + gold answer, teacher-forced, as training
sees them), collects :class:`~dynmole.stats.RoutingStats`, and

* adds model-wide means to the training log (``probe_entropy``, ``probe_experts``,
  ``probe_soft_fraction``, ``probe_high_entropy_fraction``, ``probe_layers_below``, and
  ``probe_max_load``: the busiest expert's share of the gate mass, 1/N when balanced; the measures
  of :mod:`dynmole.routing_measures`: ``probe_load_entropy``, ``probe_input_dependence``, and the
  shares of modules whose router has collapsed or specialises, ``probe_collapsed`` and
  ``probe_specialised``);
* appends the per-module statistics to ``routing_probe.jsonl`` in the output folder, one record
  per probe, so curves per layer can be drawn afterwards.

``probe_layers_below`` is the share of adapted modules in which a majority of held-out tokens has
a normalised Tsallis entropy below the soft-routing threshold (DynMoLE eq. 17): the regime in which
DynMoLE's sparse branch takes over. The probe costs one forward of the probe set, without grad.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback

from ..data.example import Example
from ..data.formats import format_examples
from ..data.tokenize import AnswerCollator, encode_example
from ..model import MoLEModel
from ..routing_measures import collapsed, specialises
from .runs import PROBE_LOG_NAME

_PROBE_KEYS = ("entropy", "mean_experts", "soft_fraction", "high_entropy_fraction")
_MEASURE_KEYS = ("busiest_share", "load_entropy", "input_dependence")


def summarize_probe(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Model-wide means of a :meth:`RoutingStats.summary` (each module counts once)."""
    modules = list(summary.values())
    if not modules:
        return {}
    mean = {key: sum(m[key] for m in modules) / len(modules) for key in _PROBE_KEYS}
    below = sum(m["high_entropy_fraction"] < 0.5 for m in modules) / len(modules)
    measured = [m for m in modules if m.get("busiest_share") is not None]
    routing = {}
    if measured:
        count = len(measured)
        routing = {
            "probe_load_entropy": sum(m["load_entropy"] for m in measured) / count,
            "probe_input_dependence": sum(m["input_dependence"] for m in measured) / count,
            "probe_collapsed": sum(collapsed(m["busiest_share"]) for m in measured) / count,
            "probe_specialised": sum(specialises(m["busiest_share"], m["input_dependence"]) for m in measured) / count,
        }
    return {
        "probe_max_load": sum(max(m["load"]) for m in modules) / len(modules),
        "probe_entropy": mean["entropy"],
        "probe_experts": mean["mean_experts"],
        "probe_soft_fraction": mean["soft_fraction"],
        "probe_high_entropy_fraction": mean["high_entropy_fraction"],
        "probe_layers_below": below,
        **routing,
    }


class RoutingProbe(TrainerCallback):
    """Logs routing statistics of ``examples`` (held out) every ``every`` steps and at step 0.

    Args:
        model: the MoLE tuner of the model being trained (:func:`~dynmole.model.find_mole`).
        tokenizer: its tokenizer.
        examples: the held-out probe examples (encoded once, up to ``cutoff_len`` tokens).
        every: probe every this many optimizer steps.
        output_dir: where ``routing_probe.jsonl`` is written (by the main process only).
        batch_size: sequences per probe forward.
        cutoff_len: maximum tokens per probe example.
    """

    def __init__(self, model: MoLEModel, tokenizer: Any, examples: Sequence[Example], every: int,
                 output_dir: str | Path, batch_size: int = 16, cutoff_len: int = 512) -> None:
        if every < 1:
            raise ValueError(f"routing_probe_steps must be >= 1, got {every}")
        if not examples:
            raise ValueError("the routing probe needs at least one held-out example")
        self.model = model
        self.every = every
        self.path = Path(output_dir) / PROBE_LOG_NAME
        features = [encode_example(tokenizer, ex, cutoff_len) for ex in examples]
        collate = AnswerCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.batches = [collate(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]
        self.pending: dict[str, float] = {}

    def probe(self) -> dict[str, dict[str, Any]]:
        """Per-module routing statistics of the probe set under the current weights."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), self.model.collect_routing_stats() as stats:
                for batch in self.batches:
                    self.model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device))
            return stats.summary()
        finally:
            self.model.train(was_training)

    def _record(self, state: Any) -> None:
        summary = self.probe()
        self.pending = summarize_probe(summary)
        if state.is_world_process_zero:
            modules = {name: {**{k: round(v[k], 5) for k in _PROBE_KEYS},
                              **{k: None if v[k] is None else round(v[k], 5) for k in _MEASURE_KEYS},
                              "load": [round(x, 4) for x in v["load"]]}
                       for name, v in summary.items()}
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": state.global_step, **self.pending, "modules": modules}) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer signature
        if state.global_step == 0:
            self._record(state)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step % self.every == 0:
            self._record(state)
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs is not None and self.pending:
            logs.update({k: round(v, 6) for k, v in self.pending.items()})
            self.pending = {}


def probe_set(eval_examples: dict[str, list[Example]], size: int) -> list[Example]:
    """``size`` held-out examples taken round-robin over the tasks (each task's first ones), so
    every task is in the probe whatever its size."""
    pools = [list(examples) for examples in eval_examples.values() if examples]
    chosen: list[Example] = []
    for depth in range(max(map(len, pools), default=0)):
        chosen += [pool[depth] for pool in pools if depth < len(pool)]
        if len(chosen) >= size:
            break
    return chosen[:size]


def probe_examples(eval_examples: dict[str, list[Example]], size: int, scoring: str) -> list[Example]:
    """The routing probe's held-out examples (:func:`probe_set`) in the format training sees for
    the evaluation protocol ``scoring``."""
    return format_examples(probe_set(eval_examples, size), scoring)


_BEFORE_AFTER = (("probe_experts", "experts per token", "{:.2f}"), ("probe_entropy", "router entropy", "{:.3f}"),
                 ("probe_max_load", "busiest expert's share", "{:.3f}"),
                 ("probe_input_dependence", "input dependence", "{:.3f}"),
                 ("probe_collapsed", "modules collapsed", "{:.0%}"),
                 ("probe_specialised", "modules specialised", "{:.0%}"))


def probe_records(output_dir: str | Path) -> list[dict[str, Any]]:
    """The routing probe's records of a run folder (``routing_probe.jsonl``; empty without a probe)."""
    path = Path(output_dir) / PROBE_LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def routing_before_after(records: Sequence[dict[str, Any]], examples: int) -> str:
    """A markdown table of the held-out routing at the first and the last probe (before and after
    training): experts per token, normalised Tsallis entropy, the busiest expert's share, the input
    dependence and the shares of modules collapsed / specialised (:mod:`dynmole.routing_measures`);
    empty with fewer than two probes."""
    if len(records) < 2:
        return ""
    header = "| routing on " + f"{examples} held-out examples | " + " | ".join(name for _, name, _ in _BEFORE_AFTER)
    lines = [header + " |", "|---|" + "---:|" * len(_BEFORE_AFTER)]
    for label, record in (("before training", records[0]), (f"after {records[-1]['step']} steps", records[-1])):
        cells = [form.format(record[key]) if record.get(key) is not None else "-" for key, _, form in _BEFORE_AFTER]
        lines.append(f"| {label} (step {record['step']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

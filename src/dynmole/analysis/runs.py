"""Reading finished runs: their ``result.json``, per-example predictions, training log and
routing statistics."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..config import MoLEConfig
from ..data import scoring_protocol
from ..io import atomic_write
from ..training.runs import LOG_NAME, PREDICTIONS_NAME, PROBE_LOG_NAME, RESULT_NAME

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class RunRecord:
    """One finished run: its folder and the contents of its ``result.json``."""

    directory: Path
    result: dict[str, Any]

    @classmethod
    def read(cls, directory: str | Path) -> "RunRecord":
        directory = Path(directory)
        return cls(directory, json.loads((directory / RESULT_NAME).read_text()))

    @property
    def variant(self) -> str:
        return self.result["variant"]

    @property
    def key(self) -> str | None:
        """The variant's key (``dynmole.experiments.profiles.VARIANTS``), None for runs that do not record it."""
        return self.result.get("key")

    @property
    def scoring(self) -> str:
        """The evaluation protocol, ``"cloze"`` or ``"label"`` (runs made before the rename say
        ``"choices"``, and runs made before ``eval.scoring`` existed were cloze)."""
        return scoring_protocol(self.result.get("eval", {}).get("scoring", "cloze"))

    def predictions(self) -> dict[str, dict[str, list[Any]]] | None:
        """Per task the run's per-example predictions (parallel lists ``id``, ``label``, ``acc``,
        ``acc_norm``: gold and predicted choice indices), or None when the run has no
        ``predictions.json`` (runs made before it existed)."""
        path = self.directory / PREDICTIONS_NAME
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def routing(self) -> dict[str, dict[str, Any]]:
        """Per adapted module: the routing statistics over the evaluation forwards (empty for LoRA/DoRA)."""
        return self.result.get("routing") or {}

    def log(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every training-log record that has ``key``."""
        path = self.directory / LOG_NAME
        if not path.is_file():
            return []
        records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return [(int(r["step"]), float(r[key])) for r in records if key in r]

    def probes(self) -> list[dict[str, Any]]:
        """The routing probe's records (``routing_probe.jsonl``: held-out routing statistics during
        training), in step order; empty when the run had no probe."""
        path = self.directory / PROBE_LOG_NAME
        if not path.is_file():
            return []
        records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return sorted(records, key=lambda r: r["step"])

    def probe_curve(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every routing-probe record that has ``key`` (e.g. ``probe_entropy``)."""
        return [(int(p["step"]), float(p[key])) for p in self.probes() if key in p]

    def entropy_curve(self) -> list[tuple[int, float]]:
        """Normalised router entropy over training: the logged entropy loss divided by its
        coefficient (empty when the run had no entropy loss)."""
        adapter = self.result.get("adapter") or {}
        if "method" not in adapter:
            return []
        weight = MoLEConfig.from_dict(adapter).entropy_weight
        return [(step, value / weight) for step, value in self.log("aux_entropy")] if weight else []


def write_predictions(directory: str | Path, predictions: Mapping[str, Mapping[str, Sequence[Any]]]) -> Path:
    """Write a run's per-task predictions (``evaluate_tasks(..., return_predictions=True)``) to
    ``directory/predictions.json`` atomically: compact JSON, one line per task."""
    path = Path(directory) / PREDICTIONS_NAME
    lines = [f"{json.dumps(task)}: {json.dumps(dict(lists), separators=(',', ':'))}"
             for task, lists in predictions.items()]
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def group_by_variant(records: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    """Records by variant name, in first-seen order."""
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.variant, []).append(record)
    return groups


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def layer_index(module: str) -> int | None:
    """The decoder-layer index in a module name such as ``model.layers.3.mlp.up_proj``."""
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


def mean_experts(routing: dict[str, dict[str, Any]]) -> float | None:
    """Experts active per token, averaged over modules weighted by their tokens (None without routing)."""
    tokens = sum(s["tokens"] for s in routing.values())
    if not tokens:
        return None
    return sum(s["mean_experts"] * s["tokens"] for s in routing.values()) / tokens


def by_layer(routing: dict[str, dict[str, Any]], key: str) -> dict[str, dict[int, float]]:
    """Statistic ``key`` per projection (last name component, in the model's order) and layer,
    e.g. ``{"up_proj": {0: 2.1, 1: 3.4}}``; modules outside a numbered layer are left out."""
    out: dict[str, dict[int, float]] = {}
    for module, stats in routing.items():
        layer = layer_index(module)
        if layer is not None:
            out.setdefault(module.rsplit(".", 1)[-1], {})[layer] = float(stats[key])
    return {name: dict(sorted(values.items())) for name, values in out.items()}


def load_by_layer(routing: dict[str, dict[str, Any]]) -> dict[int, list[float]]:
    """Each expert's load per layer, averaged over the layer's modules weighted by their tokens."""
    sums: dict[int, list[float]] = {}
    tokens: dict[int, float] = {}
    for module, stats in routing.items():
        layer = layer_index(module)
        if layer is None:
            continue
        weighted = [share * stats["tokens"] for share in stats["load"]]
        previous = sums.get(layer, [0.0] * len(weighted))
        sums[layer] = [a + b for a, b in zip(previous, weighted)]
        tokens[layer] = tokens.get(layer, 0.0) + stats["tokens"]
    return {layer: [v / max(tokens[layer], 1.0) for v in sums[layer]] for layer in sorted(sums)}

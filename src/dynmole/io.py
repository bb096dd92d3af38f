"""Atomic file writes (a crash never leaves a half-written file that looks valid), and the check
that a folder can be written to before any work is done."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import DynmoleError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def ensure_writable_dir(folder: str | Path, what: str = "folder") -> Path:
    """Create ``folder`` if needed and check that a file can be written in it; raise
    :class:`DynmoleError` naming it (and ``what`` it is for) otherwise."""
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise DynmoleError(f"cannot write to the {what} {folder}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DynmoleError(f"cannot write to the {what} {folder}: {err.strerror or err}") from None
    return folder

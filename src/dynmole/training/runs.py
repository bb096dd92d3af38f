"""A training run's output folder: checked before any work, and never holding two runs' files.

A run writes into its folder its checkpoints (``checkpoint-N``), its logs (``log.jsonl``,
``routing_probe.jsonl``), its final adapter (``adapter/``) and, for ``dynmole run``, its results
(``results.json``, ``results.md``). A folder holding such files belongs to that run: a new run
there needs ``resume`` (continue it from its newest complete checkpoint) or ``overwrite`` (delete
those files first; with ``resume``, only when there is no complete checkpoint). TensorBoard's
event files are left alone: each run writes its own subfolder.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from ..errors import DynmoleError
from ..io import atomic_write, ensure_writable_dir

logger = logging.getLogger(__name__)

# The file names of a run folder: the one place they are spelled.
ADAPTER_NAME = "adapter"  # the final adapter's folder
LOG_NAME = "log.jsonl"  # the Trainer's log records (JsonlLogger)
PROBE_LOG_NAME = "routing_probe.jsonl"  # the routing probe's records (RoutingProbe)
RESULTS_NAME = "results.json"  # `dynmole run`: the evaluations and their settings
RESULTS_MD_NAME = "results.md"  # `dynmole run`: the same as tables
RESULT_NAME = "result.json"  # a `dynmole reproduce` run: its evaluation and settings (marks it done)
PREDICTIONS_NAME = "predictions.json"  # a `dynmole reproduce` run: per-example predictions
ERROR_NAME = "error.txt"  # a failed `dynmole reproduce` run: its traceback
STATE_NAME = "trainer_state.json"  # the Trainer writes it last into a checkpoint
CHECKPOINT_GLOB = "checkpoint-*"
LOG_FILES = (LOG_NAME, PROBE_LOG_NAME)
FINAL_OUTPUTS = (ADAPTER_NAME, RESULTS_NAME, RESULTS_MD_NAME)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoint_step(path: Path) -> int | None:
    """The step in a ``checkpoint-N`` folder's name (None for any other name, e.g. ``checkpoint-20.bak``)."""
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match[1]) if match and path.is_dir() else None


def _incomplete(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None when its save finished."""
    state = checkpoint / STATE_NAME
    if not state.is_file():
        return f"no {STATE_NAME}, which the Trainer writes last: its save was interrupted"
    try:
        json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, TypeError):
        return f"its {STATE_NAME} is cut short or unreadable: its save was interrupted"
    return None


def scan_checkpoints(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """``(newest complete checkpoint or None, why each newer checkpoint folder was skipped)``.

    Only folders named ``checkpoint-<step>`` count; a checkpoint is complete when its
    ``trainer_state.json`` (the last file the Trainer writes into it) holds a whole JSON state.
    """
    folders = [(step, path) for path in Path(output_dir).glob("checkpoint-*")
               if (step := checkpoint_step(path)) is not None]
    skipped = []
    for _, path in sorted(folders, reverse=True):
        reason = _incomplete(path)
        if reason is None:
            return path, skipped
        skipped.append(f"{path.name}: {reason}")
    return None, skipped


def finished_checkpoint(checkpoint: str | Path, max_steps: int) -> bool:
    """Whether ``checkpoint`` was saved at the run's last step (``max_steps`` > 0 reached)."""
    state = json.loads((Path(checkpoint) / STATE_NAME).read_text())
    return max_steps > 0 and state.get("global_step", 0) >= max_steps


def run_files(output_dir: str | Path) -> list[str]:
    """The names of the run files (see the module docstring) in ``output_dir``, sorted."""
    folder = Path(output_dir)
    named = [name for name in (*FINAL_OUTPUTS, *LOG_FILES) if (folder / name).exists()]
    return sorted(named + [p.name for p in folder.glob(CHECKPOINT_GLOB) if checkpoint_step(p) is not None])


def check_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Raise :class:`DynmoleError` unless a run can write into ``output_dir`` without mixing its
    files with another run's: the folder must be writable, and files of an earlier run there need
    ``resume`` (with a complete checkpoint to resume from) or ``overwrite``. Creates the folder;
    changes nothing else, so it can run before any model or data is loaded."""
    folder = Path(output_dir)
    ensure_writable_dir(folder, "output folder")
    found = run_files(folder)
    if not found:
        return
    checkpoint, skipped = scan_checkpoints(folder)
    if overwrite or (resume and checkpoint is not None):
        return
    listed = ", ".join(found)
    if resume:
        why = "; ".join(skipped) or "no checkpoint-N folder"
        raise DynmoleError(f"--resume: {folder} has no complete checkpoint to resume from ({why}) but holds files "
                           f"of an earlier run ({listed}): pass --overwrite to start again, or choose another "
                           "--output-dir")
    if any(name in found for name in FINAL_OUTPUTS):
        raise DynmoleError(f"{folder} holds a finished run ({listed}): pass --overwrite to replace it (its files are "
                           "deleted first), or choose another --output-dir")
    hint = f"--resume to continue it from {checkpoint.name}, " if checkpoint is not None else ""
    raise DynmoleError(f"{folder} holds an interrupted run ({listed}): pass {hint}--overwrite to start again (its "
                       "files are deleted first), or choose another --output-dir")


def _logged_step(line: str) -> int | None:
    """The step of a JSONL log record, None for a line that is not one (e.g. cut short by a kill)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def trim_logs(directory: str | Path, step: int) -> None:
    """Drop the records after ``step`` (and any line cut short) from a run's JSONL logs, so a
    resumed run logs each step once."""
    for name in LOG_FILES:
        path = Path(directory) / name
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if (logged := _logged_step(line)) is not None
                    and logged <= step]
            atomic_write(path, lambda tmp, kept=kept: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def _delete(folder: Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def resume_checkpoint(output_dir: str | Path, resume: bool, overwrite: bool) -> Path | None:
    """Check ``output_dir`` (:func:`check_output_dir`) and return the checkpoint a run there
    resumes from: with ``resume`` the newest complete one, each newer one it skips logged with the
    reason; None to start afresh. Changes nothing in the folder (see :func:`start_run`)."""
    check_output_dir(output_dir, resume, overwrite)
    if not resume:
        return None
    checkpoint, skipped = scan_checkpoints(output_dir)
    for reason in skipped:
        logger.warning("skipping %s", reason)
    if checkpoint is None:
        logger.warning("--resume given but no complete checkpoint in %s: starting from scratch", output_dir)
    else:
        logger.warning("resuming from %s", checkpoint)
    return checkpoint


def start_run(output_dir: str | Path, checkpoint: Path | None, overwrite: bool, max_steps: int) -> None:
    """Make ``output_dir`` ready for a run resuming from ``checkpoint`` (from :func:`resume_checkpoint`).

    Resuming, it cuts the logs back to the checkpoint's step and, unless the checkpoint is the
    run's last step (``max_steps``), deletes the final adapter and results (they would describe
    another state than the one the resumed run ends in). Starting afresh, ``overwrite`` deletes the
    earlier run's files.
    """
    folder = Path(output_dir)
    if checkpoint is None:
        if overwrite:
            _delete(folder, run_files(folder))
        return
    trim_logs(folder, checkpoint_step(checkpoint))
    if not finished_checkpoint(checkpoint, max_steps):
        _delete(folder, list(FINAL_OUTPUTS))

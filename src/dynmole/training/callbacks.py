"""Trainer callbacks of every run: the JSONL log and ReMoLE's adaptive L1 coefficient.

The routing probe, a callback too, has its own module (:mod:`.probe`).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from ..model import find_mole


class JsonlLogger(TrainerCallback):
    """Appends every log record (loss, aux parts, routing, learning rate) to ``log.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - Trainer signature
        if state.is_world_process_zero and logs:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class ReMoLECoefficientCallback(TrainerCallback):
    """ReMoLE: updates the adaptive L1 coefficient once per optimizer step (after the step), from
    the active-expert statistic of all its micro-batches, all-reduced across ranks under DDP.
    Does nothing for other methods (see :meth:`MoLEModel.update_remole_coefficient`)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001 - Trainer signature
        mole = find_mole(model) if model is not None else None
        if mole is not None:
            mole.update_remole_coefficient()

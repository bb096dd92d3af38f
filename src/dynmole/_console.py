"""What the command line leaves out of the console: third-party lines that say nothing to the user.

The console shows our own lines, progress bars and real warnings. Noise we cause by our own calls is
fixed at those calls (the "Loading weights" bar: ``pretrained.load_model_and_tokenizer``; the hub
retries of an offline harness task: ``evaluation.harness``). What remains comes from code we do not
own, and :func:`quiet_third_party` filters exactly that, each line by its message and nothing else:

- DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to
  detect it." (logger ``DeepSpeed``, printed on stdout): the HF ``Trainer`` calls accelerate's
  ``unwrap_model``, which imports ``deepspeed`` whenever it is installed (the ``deepspeed`` extra)
  though nobody asked for it, and the import looks for an accelerator. Kept when DeepSpeed is asked
  for (``accelerate launch`` with a DeepSpeed config sets ``ACCELERATE_USE_DEEPSPEED``).
- transformers' ``FutureWarning`` "`is_gradient_checkpointing` is deprecated": PEFT's ``PeftModel``
  reads that property of the base model on every adapter built or loaded (peft 0.21 on transformers 5).
- lm-eval's "`pretrained` model kwarg is not of type `str`" and "Passed an already-initialized model
  through `pretrained`": ``HFLM`` says so for every model it is given built, which is the documented
  way to evaluate an adapter (``evaluation.harness``), never launched under accelerate or parallelized.

Only the command line calls :func:`quiet_third_party`: a library must not change a program's warning
filters or loggers when it is imported.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

_WARNINGS = (("`is_gradient_checkpointing` is deprecated", FutureWarning),)
_LOG_LINES = {
    "DeepSpeed": ("Setting accelerator to CPU.",),
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
}


class _DropLines(logging.Filter):
    """Drops a logger's records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _deepspeed_asked_for() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def quiet_third_party() -> None:
    """Filter the lines listed in this module's docstring; calling it again changes nothing.

    A logger's filter set before its library is imported stays: the library gets the same
    ``logging.Logger`` object by its name.
    """
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    for name, starts in _LOG_LINES.items():
        if name == "DeepSpeed" and _deepspeed_asked_for():
            continue
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(starts))

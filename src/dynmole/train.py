"""The training API in one namespace, as docs/library.md and earlier versions name it
(``dynmole.train.train``, ``dynmole.train.TrainConfig``, ``dynmole.train.ReMoLECoefficientCallback``).

The code lives in :mod:`dynmole.training` and :mod:`dynmole.adapters`; this module only re-exports it.
"""

from .adapters import ALL_METHODS, PEFT_METHODS, adapt_model
from .training.callbacks import JsonlLogger, ReMoLECoefficientCallback
from .training.config import PRECISIONS, TrainConfig
from .training.trainer import MoLETrainer, check_resume_settings, router_parameters, scale_parameter_groups, train

__all__ = [
    "ALL_METHODS",
    "JsonlLogger",
    "MoLETrainer",
    "PEFT_METHODS",
    "PRECISIONS",
    "ReMoLECoefficientCallback",
    "TrainConfig",
    "adapt_model",
    "check_resume_settings",
    "router_parameters",
    "scale_parameter_groups",
    "train",
]

"""dynmole: Mixture of LoRA Experts fine-tuning with dynamic routing."""

from . import entropy, losses, routing
from ._version import __version__
from .config import METHODS, MoLEConfig
from .layers import MoLELinear
from .model import MoLEModel, get_mole_model, load_mole_model

__all__ = [
    "METHODS",
    "MoLEConfig",
    "MoLELinear",
    "MoLEModel",
    "entropy",
    "get_mole_model",
    "load_mole_model",
    "losses",
    "routing",
    "__version__",
]

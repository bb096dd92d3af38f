"""dynmole: Mixture of LoRA Experts fine-tuning with dynamic routing."""

__version__ = "0.1.0"

from . import entropy, losses, routing  # noqa: E402
from .config import METHODS, MoLEConfig  # noqa: E402
from .layers import MoLELinear  # noqa: E402
from .model import MoLEModel, get_mole_model, load_mole_model  # noqa: E402

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

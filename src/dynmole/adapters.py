"""Method name -> adapter: a MoLE method (:mod:`dynmole.model`) or PEFT LoRA/DoRA.

The one place that knows which methods exist and which library serves each: it builds an adapter
on a base model (:func:`adapt_model`), loads a saved one of either kind (:func:`load_adapter`),
decides a run's :class:`MoLEConfig` from its method (:func:`adapter_config`), and writes the one
settings record results files and resume checks compare (:func:`settings_record`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from peft.utils import CONFIG_NAME
from torch import nn

from .config import METHODS, MoLEConfig, is_dynmole_adapter_config, setting_fields
from .model import find_mole, get_mole_model, load_mole_model, require_adapter_files

PEFT_METHODS = ("lora", "dora")
ALL_METHODS = PEFT_METHODS + METHODS
PEFT_SETTINGS = ("r", "alpha", "dropout", "target_modules")
"""The :class:`MoLEConfig` fields a PEFT LoRA/DoRA adapter uses (its ``r``, ``lora_alpha``,
``lora_dropout`` and ``target_modules``)."""


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` without its DDP / DeepSpeed wrappers (which keep it in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def adapter_config(method: str, values: Mapping[str, Any]) -> MoLEConfig:
    """The :class:`MoLEConfig` of a run of ``method`` from ``values`` (settings by field name; others
    are ignored): a MoLE method names itself, PEFT LoRA/DoRA (and a base run) keep the default
    ``method`` and use the :data:`PEFT_SETTINGS` only. The one place a run's method and its
    adapter's ``method`` are reconciled."""
    names = {f.name for f in setting_fields(MoLEConfig)} - {"method"}
    chosen = {k: v for k, v in values.items() if k in names}
    return MoLEConfig(**chosen, **({"method": method} if method in METHODS else {}))


def adapt_model(model: nn.Module, method: str, mole: MoLEConfig) -> nn.Module:
    """Wrap ``model`` with the adapter of ``method``: a MoLE method, or PEFT LoRA/DoRA."""
    if method in METHODS:
        return get_mole_model(model, dataclasses.replace(mole, method=method))
    if method in PEFT_METHODS:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=mole.r,
            lora_alpha=mole.alpha,
            lora_dropout=mole.dropout,
            target_modules=list(mole.target_modules),
            use_dora=method == "dora",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(ALL_METHODS)}")


def settings_record(method: str, mole: MoLEConfig) -> dict[str, Any]:
    """The adapter settings a run of ``method`` records (``results.json``, ``result.json``): every
    :class:`MoLEConfig` setting for a MoLE method, the :data:`PEFT_SETTINGS` for LoRA/DoRA."""
    settings = mole.to_dict()
    return settings if method in METHODS else {k: settings[k] for k in PEFT_SETTINGS}


def _peft_settings(data: dict[str, Any]) -> dict[str, Any]:
    """A PEFT LoRA/DoRA adapter config's settings, under :class:`MoLEConfig`'s names."""
    return {"method": "dora" if data.get("use_dora") else "lora", "r": data.get("r"), "alpha": data.get("lora_alpha"),
            "dropout": data.get("lora_dropout"), "target_modules": sorted(data.get("target_modules") or [])}


def model_settings(model: nn.Module) -> dict[str, Any] | None:
    """The adapter settings of a MoLE or PEFT ``model`` (None for anything else)."""
    mole = find_mole(model)
    if mole is not None:
        return mole.mole_config.to_dict()
    peft_config = getattr(unwrap(model), "peft_config", {}).get("default")
    return _peft_settings(peft_config.to_dict()) if peft_config is not None else None


def saved_settings(path: str | Path) -> dict[str, Any]:
    """The adapter settings in the ``adapter_config.json`` at ``path``, dynmole's or PEFT's."""
    data = json.loads(Path(path).read_text())
    return MoLEConfig.load(path).to_dict() if is_dynmole_adapter_config(data) else _peft_settings(data)


def is_peft_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a PEFT adapter: its ``adapter_config.json`` parses to an object with
    ``peft_type`` and without dynmole's marker (ours may carry ``peft_type`` too)."""
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False  # load_mole_model says what is wrong with the folder
    return isinstance(data, dict) and "peft_type" in data and not is_dynmole_adapter_config(data)


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """``model`` with the adapter saved in ``folder``, dynmole's or PEFT's, for inference."""
    if is_peft_adapter(Path(folder)):
        from peft import PeftModel

        require_adapter_files(Path(folder))  # safetensors only, as load_mole_model
        return PeftModel.from_pretrained(model, str(folder))
    return load_mole_model(model, folder)

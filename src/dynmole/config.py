"""MoLEConfig: one dataclass for every MoLE method, with the papers' defaults.

Each field carries its help text in ``metadata["help"]``; the CLI and the docs are built from it.
MoLEConfig is a ``peft.PeftConfig`` of PEFT type ``DYNMOLE`` (a member this module adds to PEFT's
``PeftType``), so PEFT and TRL take it where they take a ``LoraConfig``; the fields it inherits
from PEFT are bookkeeping, and :func:`setting_fields` leaves them out.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftConfig
from peft.utils import CONFIG_NAME, PeftType, TaskType

from ._version import __version__
from .errors import DynmoleError
from .io import write_json
from .routing.dynamic import DynamicRouter

METHODS = ("loramoe", "mola", "topp", "dynmole", "ldmole", "remole")
# 2: fields entropy_eps, balance_pooling, router_dropout, lambda_bias_init; balance_coef,
# balance_mode and router_init_std may be null (= the method's reference default).
# 3: PEFT's fields too (peft_type DYNMOLE, task_type CAUSAL_LM, ...), and the weights under the keys
# PEFT gives them (``base_model.model.<module>.lora_A``): ``peft.PeftModel.from_pretrained`` reads it.
ADAPTER_FORMAT_VERSION = 3
ADAPTER_TYPE = "DYNMOLE"  # our marker in adapter_config.json, and the PEFT type's name
PEFT_FIELDS = frozenset(f.name for f in dataclasses.fields(PeftConfig))


def _add_peft_type(name: str) -> PeftType:
    """PEFT's ``PeftType`` member ``name``, added to the enum when it is not there yet.

    ``peft.register_peft_method`` registers a method only under a name the enum lists, and PEFT
    has no call that adds one; this adds it as the enum itself adds members (Python 3.10-3.13).
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


PEFT_TYPE = _add_peft_type(ADAPTER_TYPE)


def setting_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields of the settings dataclass ``cls`` that a user sets (CLI options, config files,
    results records): all of them but those :class:`MoLEConfig` inherits from ``peft.PeftConfig``."""
    return tuple(f for f in dataclasses.fields(cls) if f.name not in PEFT_FIELDS)


# The plain types a setting may have, what they accept, and how an error names them.
_SCALAR_TYPES: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


def check_field_types(settings: Any) -> None:
    """Raise :class:`DynmoleError` naming the first field of the settings dataclass ``settings`` whose
    value is not of its annotated plain type (``bool``, ``int``, ``float``, ``str``, each optionally
    ``| None``): a ``None`` where a number is needed would otherwise pass and fail far later (a
    comparison in the routing statistics after a whole training run). Fields of other types (lists,
    unions of several kinds) are left to the dataclass's own checks; a bool is not taken as a number."""
    hints = typing.get_type_hints(type(settings))
    for spec in setting_fields(type(settings)):
        hint = hints[spec.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = typing.get_args(hint) if union else (hint,)
        optional = type(None) in options
        kinds = [kind for kind in options if kind in _SCALAR_TYPES]
        if len(kinds) != 1 or len(options) != 1 + optional:
            continue
        accepted, wanted = _SCALAR_TYPES[kinds[0]]
        value = getattr(settings, spec.name)
        if value is None and optional:
            continue
        if not isinstance(value, accepted) or (kinds[0] is not bool and isinstance(value, bool)):
            raise DynmoleError(f"{spec.name} must be {wanted}{' or unset (None)' if optional else ''}, got {value!r}")


# Entropy-loss coefficient when the user leaves it unset: only DynMoLE uses it (eq. 19).
_DEFAULT_ENTROPY_COEF = {"dynmole": 1e-2}

# What each method's reference code does, for the fields left unset (None); the table with the
# sources is in docs/methods.md. DynMoLE's code (a fork of MoE-PEFT) runs dynmole and its
# "Top-p" row (= dynmole without the soft branch); MoE-PEFT's loramoe has no router loss, its
# mola loss exists but is off unless `router_loss` is set; LD-MoLE's run.sh uses balance 1.0.
_DEFAULT_BALANCE_COEF = {"dynmole": 1e-3, "topp": 1e-3, "ldmole": 1.0}
_DEFAULT_BALANCE_MODE = {"mola": "switch", "ldmole": "ldmole"}  # others: soft
_DEFAULT_BALANCE_POOLING = {"ldmole": "module"}  # others: pooled
_DEFAULT_ROUTER_DROPOUT = {"ldmole": True}  # others: the router sees the input without dropout
_DEFAULT_ROUTER_INIT_STD = {"remole": 0.02}  # others: nn.Linear's kaiming-uniform (a = sqrt(5))
BALANCE_MODES = ("soft", "switch", "ldmole")
BALANCE_POOLINGS = ("pooled", "module")

# Fields added after format_version 1: an adapter_config.json of version 1 was trained with
# these values, so it loads with them (the behaviour it was trained with).
_LEGACY_VALUES = {"entropy_eps": 0.0, "balance_pooling": "module", "router_dropout": False, "lambda_bias_init": None}


def is_dynmole_adapter_config(data: Any) -> bool:
    """Whether parsed ``adapter_config.json`` content is a dynmole adapter's: it carries our
    ``adapter_type`` marker (whatever PEFT fields, such as ``peft_type``, it also holds)."""
    return isinstance(data, dict) and data.get("adapter_type") == ADAPTER_TYPE


def field_help(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose ``metadata["help"]`` is ``text``: the help of its command-line option
    (:mod:`dynmole.options`) and of its config-file key."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class MoLEConfig(PeftConfig):
    """Configuration of a Mixture-of-LoRA-Experts adapter, and the ``peft.PeftConfig`` of the PEFT
    method ``DYNMOLE`` (``peft.get_peft_model(model, MoLEConfig(...))`` builds a MoLE model once
    dynmole is imported). ``peft_type`` and ``task_type`` (CAUSAL_LM) are set here."""

    method: str = field_help(
        "Routing method: loramoe (soft), mola (top-k), topp, dynmole (hybrid), ldmole (sparsegen), remole (ReLU).",
        default="dynmole",
    )
    num_experts: int | list[int] | str = field_help(
        "Experts per adapted module: an int, a per-layer list, or MoLA's layer groups such as '2-4-6-8' "
        "(the depth split into equal groups, lowest first).",
        default=6,
    )
    r: int = field_help("LoRA rank of each expert.", default=24)
    alpha: float = field_help("LoRA alpha; the expert output is scaled by alpha / r.", default=48.0)
    dropout: float = field_help("Dropout on the experts' input.", default=0.05)
    target_modules: list[str] = field_help(
        "Names (last component) of the linear modules to adapt.",
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
    )
    top_k: int = field_help("MoLA: experts per token.", default=2)
    top_p: float = field_help("Top-p / DynMoLE: cumulative probability threshold, in (0, 1].", default=0.75)
    top_p_mode: str = field_help(
        "Top-p rule: 'paper' keeps the expert that crosses p (eq. 7); 'reference' drops it (reference code).",
        default="paper",
    )
    q: float = field_help("DynMoLE: Tsallis entropic index (> 0; 1.0 is Shannon).", default=1.1)
    entropy_eps: float = field_help(
        "DynMoLE: eps added to p inside the Tsallis entropy of the soft/sparse decision and of the entropy loss "
        "(1e-5 = reference code; 0 = the paper's formula). Adapters saved without this field load with 0.",
        default=1e-5,
    )
    threshold: float = field_help(
        "DynMoLE: normalised-entropy threshold in [0, 1] above which a token is routed soft (1.0: never soft).",
        default=0.9,
    )
    soft_routing: bool = field_help(
        "DynMoLE: use the soft branch for high-entropy tokens (off = 'DynMoLE (Top-p)').", default=True
    )
    keep_top_k: int = field_help("DynMoLE: minimum number of experts in the sparse branch.", default=2)
    renormalize: bool = field_help(
        "DynMoLE / Top-p: renormalise the kept gate weights to sum 1 (the reference code does not).",
        default=False,
    )
    lambda_hidden: int = field_help("LD-MoLE: hidden size of the lambda MLP.", default=256)
    lambda_bias_init: float | None = field_help(
        "LD-MoLE: initial value of both lambda-MLP biases (-2.5 = reference code: initial lambda about -1.6); "
        "unset = nn.Linear's default init. Adapters saved without this field load with it unset.",
        default=-2.5,
    )
    lambda_shared: bool = field_help(
        "LD-MoLE: one lambda MLP shared across layers (per input width); off = one per module ('local').",
        default=True,
    )
    sparsity_k: int = field_help("LD-MoLE: target number of experts of the sparsity loss.", default=2)
    sparsity_coef: float = field_help("LD-MoLE: sparsity-loss coefficient (our default).", default=1e-2)
    relu_target_k: float = field_help(
        "ReMoLE: target mean number of active experts; the L1 coefficient adapts towards it.", default=2.0
    )
    relu_l1_init: float = field_help("ReMoLE: initial L1 coefficient.", default=1e-8)
    relu_l1_rate: float = field_help("ReMoLE: multiplicative update of the L1 coefficient per step.", default=1.2)
    balance_coef: float | None = field_help(
        "Load-balance loss coefficient alpha (eq. 20); 0 disables it; unset = the method's reference: 1e-3 for "
        "dynmole and topp, 1.0 for ldmole, 0 (no balance loss) for loramoe, mola and remole.",
        default=None,
    )
    balance_mode: str | None = field_help(
        "Load-balance loss N * sum_i f_i P_i: 'soft' = f_i mean gate weight, P_i mean softmax (DynMoLE code); "
        "'switch' = f_i fraction of tokens dispatched to i (Switch; Mixtral's loss on top-k routing); 'ldmole' = "
        "f_i share of i among all hard activations, P_i mean gate weight (LD-MoLE code). Unset = the method's "
        "reference: ldmole for ldmole, switch for mola, soft otherwise.",
        default=None,
    )
    balance_pooling: str | None = field_help(
        "Load-balance statistics over modules: 'pooled' = one f.P over all adapted modules' tokens (DynMoLE and "
        "Mixtral code), 'module' = one loss per module, averaged (LD-MoLE code). Unset = the method's reference "
        "(module for ldmole, pooled otherwise). Adapters saved without this field load with 'module'.",
        default=None,
    )
    entropy_coef: float | None = field_help(
        "Tsallis entropy loss coefficient beta (eq. 19); unset = 1e-2 for dynmole, 0 otherwise.", default=None
    )
    router_init_std: float | None = field_help(
        "Router initialisation: a number = normal with this std; unset = the method's reference: nn.Linear's "
        "kaiming-uniform (a = sqrt(5), bound 1/sqrt(d_in)) for dynmole, topp, loramoe, mola and ldmole, "
        "normal std 0.02 for remole.",
        default=None,
    )
    router_dropout: bool | None = field_help(
        "Feed the dropout-applied input (the experts' input) to the router and LD-MoLE's lambda MLP; unset = the "
        "method's reference (on for ldmole, off otherwise). Adapters saved without this field load with it off.",
        default=None,
    )

    # The markers save_pretrained writes beside the settings. PEFT's own loader (PeftConfig.from_pretrained,
    # PeftModel.from_pretrained) passes the whole adapter_config.json to the constructor without our
    # check_kwargs hook: accepted here, so PEFT does not drop them with an "upgrade PEFT" warning, and checked.
    adapter_type: InitVar[str | None] = None
    format_version: InitVar[int | None] = None
    dynmole_version: InitVar[str | None] = None

    def __post_init__(self, adapter_type: str | None = None, format_version: int | None = None,
                      dynmole_version: str | None = None) -> None:
        if adapter_type not in (None, ADAPTER_TYPE):
            raise DynmoleError(f"not a dynmole adapter config: adapter_type={adapter_type!r}")
        newer = not isinstance(format_version, int) or format_version > ADAPTER_FORMAT_VERSION
        if format_version is not None and newer:
            raise DynmoleError(f"the adapter config has format_version={format_version!r}; this dynmole reads "
                               f"versions up to {ADAPTER_FORMAT_VERSION}: upgrade dynmole")
        if self.peft_type not in (None, PEFT_TYPE):
            raise DynmoleError(f"a MoLEConfig has peft_type {PEFT_TYPE.value}, got {self.peft_type!r}")
        if self.task_type not in (None, TaskType.CAUSAL_LM):
            raise DynmoleError("MoLE adapts causal language models: task_type must be CAUSAL_LM, "
                               f"got {self.task_type!r}")
        self.peft_type, self.task_type = PEFT_TYPE, TaskType.CAUSAL_LM
        super().__post_init__()
        if isinstance(self.target_modules, str):
            self.target_modules = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        self.validate()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def entropy_weight(self) -> float:
        """``entropy_coef``, or the method's default when it is unset (1e-2 for dynmole, else 0)."""
        if self.entropy_coef is not None:
            return self.entropy_coef
        return _DEFAULT_ENTROPY_COEF.get(self.method, 0.0)

    @property
    def balance_weight(self) -> float:
        """``balance_coef``, or the method's reference default when it is unset."""
        if self.balance_coef is not None:
            return self.balance_coef
        return _DEFAULT_BALANCE_COEF.get(self.method, 0.0)

    @property
    def balance_rule(self) -> str:
        """``balance_mode``, or the method's reference default when it is unset."""
        return self.balance_mode or _DEFAULT_BALANCE_MODE.get(self.method, "soft")

    @property
    def balance_pooled(self) -> bool:
        """True when the balance statistics pool all adapted modules' tokens (``balance_pooling``)."""
        return (self.balance_pooling or _DEFAULT_BALANCE_POOLING.get(self.method, "pooled")) == "pooled"

    @property
    def router_sees_dropout(self) -> bool:
        """``router_dropout``, or the method's reference default when it is unset."""
        if self.router_dropout is not None:
            return self.router_dropout
        return _DEFAULT_ROUTER_DROPOUT.get(self.method, False)

    @property
    def router_init(self) -> float | None:
        """The std of a normal router init, or None for nn.Linear's kaiming-uniform init."""
        if self.router_init_std is not None:
            return self.router_init_std
        return _DEFAULT_ROUTER_INIT_STD.get(self.method)

    def validate(self) -> None:
        """Raise :class:`DynmoleError` naming the first bad field."""
        check_field_types(self)
        if self.method not in METHODS:
            raise DynmoleError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.r < 1:
            raise DynmoleError(f"rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise DynmoleError(f"alpha must be > 0 (the expert output is scaled by alpha / r), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise DynmoleError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise DynmoleError("target_modules is empty")
        counts = self.expert_counts_spec()
        if any(n < 1 for n in counts):
            raise DynmoleError(f"every expert count must be >= 1, got {self.num_experts!r}")
        smallest = min(counts)
        try:  # the routing rule's own checks: DynamicRouter is their one source
            DynamicRouter(threshold=self.threshold, q=self.q, top_p=self.top_p, top_p_mode=self.top_p_mode)
        except ValueError as error:
            raise DynmoleError(str(error)) from None
        if self.method == "dynmole" and not 1 <= self.keep_top_k <= smallest:
            raise DynmoleError(f"keep_top_k must be in [1, num_experts={smallest}], got {self.keep_top_k}")
        if self.method == "mola" and not 1 <= self.top_k <= smallest:
            raise DynmoleError(f"top_k must be in [1, num_experts={smallest}], got {self.top_k}")
        if self.method == "ldmole" and self.lambda_hidden < 1:
            raise DynmoleError(f"lambda_hidden must be >= 1, got {self.lambda_hidden}")
        if self.method == "ldmole" and self.sparsity_k < 1:
            raise DynmoleError(f"sparsity_k must be >= 1, got {self.sparsity_k}")
        if self.balance_mode is not None and self.balance_mode not in BALANCE_MODES:
            raise DynmoleError(f"balance_mode must be one of {', '.join(BALANCE_MODES)}, got {self.balance_mode!r}")
        if self.balance_pooling is not None and self.balance_pooling not in BALANCE_POOLINGS:
            raise DynmoleError(
                f"balance_pooling must be one of {', '.join(BALANCE_POOLINGS)}, got {self.balance_pooling!r}"
            )
        if not 0.0 <= self.entropy_eps < 1.0:
            raise DynmoleError(f"entropy_eps must be in [0, 1), got {self.entropy_eps}")
        if self.router_init_std is not None and self.router_init_std < 0:
            raise DynmoleError(f"router_init_std must be >= 0, got {self.router_init_std}")
        for name in ("balance_coef", "entropy_coef", "sparsity_coef"):
            if (getattr(self, name) or 0.0) < 0:
                raise DynmoleError(f"{name} must be >= 0, got {getattr(self, name)}")

    def expert_counts_spec(self) -> list[int]:
        """The expert counts as written: one int, a list, or the groups of 'a-b-c-d'."""
        if isinstance(self.num_experts, int):
            return [self.num_experts]
        if isinstance(self.num_experts, str):
            try:
                return [int(part) for part in self.num_experts.split("-")]
            except ValueError:
                raise DynmoleError(f"num_experts string must look like '2-4-6-8', got {self.num_experts!r}") from None
        return [int(n) for n in self.num_experts]

    def experts_for_layer(self, layer: int | None, num_layers: int) -> int:
        """Number of experts of the modules in decoder layer ``layer`` (of ``num_layers``)."""
        counts = self.expert_counts_spec()
        if isinstance(self.num_experts, int):
            return self.num_experts
        if isinstance(self.num_experts, list):
            if len(counts) != num_layers:
                raise DynmoleError(f"num_experts lists {len(counts)} layers but the model has {num_layers}")
            return counts[layer or 0]
        if len(counts) > num_layers:
            raise DynmoleError(
                f"num_experts {self.num_experts!r} has {len(counts)} layer groups but the model has {num_layers} "
                f"layer(s): give at most {num_layers} groups"
            )
        group = min((layer or 0) * len(counts) // num_layers, len(counts) - 1)
        return counts[group]

    def to_dict(self) -> dict[str, Any]:
        """The adapter's settings (:func:`setting_fields`), as results files record them;
        :meth:`save_pretrained` writes them beside PEFT's fields."""
        return {name: value for name, value in dataclasses.asdict(self).items() if name not in PEFT_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoLEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DynmoleError(f"unknown MoLEConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def save_pretrained(self, save_directory: str | Path, **_: Any) -> None:
        """Write ``adapter_config.json`` into ``save_directory``, atomically (``PeftModel.save_pretrained``
        calls this): our ``adapter_type`` marker, ``format_version`` and version, PEFT's fields, the settings."""
        peft_fields = {name: getattr(self, name) for name in sorted(PEFT_FIELDS)}
        write_json(Path(save_directory) / CONFIG_NAME, {
            "adapter_type": ADAPTER_TYPE, "format_version": ADAPTER_FORMAT_VERSION, "dynmole_version": __version__,
            **peft_fields, **self.to_dict(),
        })

    @classmethod
    def load(cls, path: str | Path) -> "MoLEConfig":
        """Read ``adapter_config.json`` (:meth:`saved_kwargs`), also of format versions 1 and 2,
        which PEFT cannot read (they lack ``peft_type``)."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise DynmoleError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise DynmoleError(f"{path} does not hold a JSON object")
        return cls(**cls.saved_kwargs(data, path))

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """PEFT's hook between reading ``adapter_config.json`` and building the config
        (``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``): :meth:`saved_kwargs`."""
        return cls.saved_kwargs(kwargs, CONFIG_NAME)

    @classmethod
    def saved_kwargs(cls, data: dict[str, Any], source: str | Path) -> dict[str, Any]:
        """The constructor arguments of an ``adapter_config.json``'s content ``data`` (read from
        ``source``), refusing other adapter types, newer format versions, unknown fields and files
        that lack a setting (:meth:`save_pretrained` writes every one).

        A format-version-1 file lacks the fields added in version 2; they take the values that give
        the behaviour the adapter was trained with (``_LEGACY_VALUES``), not today's defaults."""
        if not is_dynmole_adapter_config(data):
            hint = " (a PEFT adapter: load it with peft.PeftModel)" if "peft_type" in data else ""
            raise DynmoleError(f"{source} is not a dynmole adapter config: "
                               f"adapter_type={data.get('adapter_type')!r}{hint}")
        data = {key: value for key, value in data.items() if key not in ("adapter_type", "dynmole_version")}
        version = data.pop("format_version", None)
        if not isinstance(version, int) or version > ADAPTER_FORMAT_VERSION:
            raise DynmoleError(
                f"{source} has format_version={version!r}; this dynmole reads versions up to "
                f"{ADAPTER_FORMAT_VERSION}: upgrade dynmole"
            )
        if version < 2:
            for key, value in _LEGACY_VALUES.items():
                data.setdefault(key, value)
        missing = [f.name for f in setting_fields(cls) if f.name not in data]
        if missing:
            raise DynmoleError(
                f"{source} lacks the adapter field(s) {', '.join(missing)}; dynmole saves every field, so the file "
                "is incomplete or was edited: restore them (or save the adapter again)"
            )
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise DynmoleError(f"{source} holds unknown MoLEConfig fields: {', '.join(unknown)}: upgrade dynmole")
        return data

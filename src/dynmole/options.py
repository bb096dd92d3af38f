"""The options engine of the command line: dataclass fields -> ``argparse`` options and config files.

Every option comes from a dataclass field (its ``metadata["help"]`` is the help text); a YAML or
JSON file given with ``--config`` sets the same fields, and options on the command line override
it. Field annotations are resolved with :func:`typing.get_type_hints` (they are strings under
``from __future__ import annotations``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from .config import setting_fields
from .errors import DynmoleError


def parse_num_experts(text: str) -> int | list[int] | str:
    """``num_experts`` from an option: an integer, comma-separated integers, or a group name (``2-4-6-8``)."""
    if text.isdigit():
        return int(text)
    if "," in text:
        return [int(part) for part in text.split(",")]
    return text


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_annotation(cls: type, f: dataclasses.Field) -> Any:
    """The annotation of field ``f`` of dataclass ``cls``, as a type."""
    return _hints(cls)[f.name]


def _field_type(tp: Any) -> tuple[Any, bool]:
    """(parser for one value, is_list) for a dataclass field's annotation ``tp``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if len(args) == 1:
            return _field_type(args[0])
        return parse_num_experts, False
    if typing.get_origin(tp) is list:
        return str, True
    return tp, False


def add_fields(parser: argparse.ArgumentParser, classes: Sequence[type], defaults: dict[str, Any]) -> None:
    """One option per dataclass field; a name two classes share (``method``) is added once."""
    seen: set[str] = set()
    for cls in classes:
        group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
        _add_class_fields(group, cls, defaults, seen)


def _add_class_fields(group: Any, cls: type, defaults: dict[str, Any], seen: set[str]) -> None:
    for f in [f for f in setting_fields(cls) if f.name not in seen]:
        seen.add(f.name)
        kind, is_list = _field_type(field_annotation(cls, f))
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        elif is_list:
            group.add_argument(flag, dest=f.name, type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
                               default=argparse.SUPPRESS, help=help_text + " [comma-separated]")
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text)


_EXPECTED = {int: "an integer", float: "a number", str: "a string",
             parse_num_experts: "an integer, a list of integers or groups such as 2-4-6-8"}


def _file_value(cls: type, f: dataclasses.Field, value: Any, path: str) -> Any:
    """The value of field ``f`` (of ``cls``) read from config file ``path``, converted and checked by
    the rules of its command-line option: a string goes through the option's parser (a YAML
    ``lr: 1e-3`` is a string), a boolean must be a YAML/JSON boolean (never the string "false",
    which is truthy)."""
    annotation = field_annotation(cls, f)
    kind, is_list = _field_type(annotation)
    expected = ("true or false (a boolean, not a string or number)" if kind is bool else
                "a list of names or a comma-separated string" if is_list else _EXPECTED[kind])
    error = DynmoleError(f"config file {path}: {f.name} must be {expected}, got {value!r}")
    if value is None:
        if type(None) in typing.get_args(annotation):
            return None
        raise error
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise error
    if is_list:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return [item.strip() for item in items if item.strip()]
        raise error
    if kind is parse_num_experts and isinstance(value, list):
        if all(isinstance(n, int) and not isinstance(n, bool) for n in value):
            return value
        raise error
    if isinstance(value, (bool, list, dict)):
        raise error
    try:
        return kind(str(value))
    except ValueError:
        raise error from None


def read_config_file(path: str) -> dict[str, Any]:
    """The option values in ``--config`` file ``path`` (YAML for .yaml/.yml, else JSON)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"not UTF-8 text ({err.reason} at byte {err.start})"
        raise DynmoleError(f"--config {path}: {reason}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise DynmoleError(f"--config {path}: bad YAML{where}: {getattr(err, 'problem', None) or err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            where = f"line {err.lineno}, column {err.colno}"
            raise DynmoleError(f"--config {path}: bad JSON at {where}: {err.msg}") from None
    if not isinstance(data, dict):
        raise DynmoleError(f"config file {path} must hold a mapping of option names to values")
    return data


def option_values(args: argparse.Namespace, classes: Sequence[type], defaults: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``classes`` a command line gives: ``defaults`` < its ``--config`` file < its
    options (field name -> value; the fields left unset are absent)."""
    values = dict(vars(args))
    for key in ("command", "handler", "config"):
        values.pop(key, None)
    if args.config:
        from_file = read_config_file(args.config)
        fields = {f.name: (cls, f) for cls in classes for f in setting_fields(cls)}
        unknown = sorted(set(from_file) - set(fields))
        if unknown:
            raise DynmoleError(f"unknown option(s) in {args.config}: {', '.join(unknown)}")
        values = {**{k: _file_value(*fields[k], v, args.config) for k, v in from_file.items()}, **values}
    return {**defaults, **values}

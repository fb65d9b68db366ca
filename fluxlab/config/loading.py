"""Building a ``Config`` from presets, YAML/JSON files and ``--section.key=value`` overrides, with
type checks that name the offending field."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fluxlab.config.files import read_config_file
from fluxlab.config.presets import PRESETS
from fluxlab.config.schema import Config


def _check_value(path: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        ):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(path, arg, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{path}={value!r}: choose one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        return [_check_value(f"{path}[{i}]", args[0], v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ValueError(f"{path}={value!r}: expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{path}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    return value


def _build(cls: type, data: Any, path: str = "") -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"section '{path}'" if path else "the config"
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ValueError(f"unknown key {key} in {where}; known keys: {sorted(names)}")
    kwargs = {k: _check_value(f"{path}.{k}" if path else k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["--optim.lr=3e-4", "train.seed=1"]`` → nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ValueError(f"override {item!r} must look like --section.key=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        # Scalars stay strings: the field's type decides (YAML would turn "no" into False).
        value = yaml.safe_load(raw) if raw.strip().startswith(("[", "{")) else raw
        if isinstance(value, (dict,)):
            raise ValueError(f"override {item!r}: give one field at a time")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def config_data(
    name_or_path: str, presets: dict[str, dict[str, Any]], overrides: list[str] | None = None
) -> dict[str, Any]:
    """The raw sections of a preset of ``presets`` or of a YAML/JSON file (which may say
    ``base: PRESET``), with ``--a.b=v`` overrides merged in; shared by ``fluxlab train`` and
    ``fluxlab train-ae``."""
    if name_or_path in presets:
        data: dict[str, Any] = presets[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"--config {name_or_path!r} is neither a preset "
                f"({', '.join(sorted(presets))}) nor a file"
            )
        data = read_config_file(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping of sections")
        base = data.pop("base", None)
        if base is not None:
            if base not in presets:
                raise ValueError(
                    f"{path}: base preset {base!r} unknown; choose one of {sorted(presets)}"
                )
            data = deep_merge(presets[base], data)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return data


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """A preset name or a YAML/JSON file (which may say ``base: PRESET``), then overrides;
    validated."""
    data = config_data(name_or_path, PRESETS, overrides)
    cfg = config_from_dict(data)
    cfg.validate()
    return cfg

"""Config values from text and Python: each field's type, and a raw value (a CLI override's string, or what a config
file holds) converted to it or refused in one line naming the key. No config sections, no jax."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the key."""


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce_value(key: str, raw: Any, tp: Any) -> Any:
    """Converts a raw value (string from the CLI, or a Python value from a file) to the field's type."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("["):
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{key}: not a valid JSON list ({e.msg})") from None
            else:
                raw = [p for p in text.split(",") if p] if text else []
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {raw!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (str, int, float):
            return tuple(coerce_value(key, v, args[0]) for v in raw)
        return tuple(tuple(v) if isinstance(v, list) else v for v in raw)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {raw!r}")
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: expected an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(str(raw))
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    if tp is str and key == "model.remat" and (isinstance(raw, bool) or str(raw).lower() in ("true", "false")):
        return "full" if str(raw).lower() == "true" else "none"  # remat was a switch before it took a policy
    if tp is str and key == "model.scan_layers" and isinstance(raw, (bool, str)):
        value = str(raw).lower()
        value = {"1": "true", "yes": "true", "0": "false", "no": "false"}.get(value, value)
        if value not in ("auto", "true", "false"):
            raise ConfigError(f"{key}: expected auto, true or false, got {raw!r}")
        return value
    if tp is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}: expected a string, got {raw!r}")
        return raw
    return raw

"""Settings as frozen dataclasses, read from TOML and ``--set`` overrides.

The generic machinery behind ``agent.config``: build a nested config dataclass from a
dict of values (checking names and types, one-line errors), merge dicts, parse
``section.key=value`` overrides, flatten a config into rows and render it as TOML.
It imports nothing of the project, so anything may use it without pulling in the
parts it configures.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A bad seal.toml or override: the message is one line, fit for the user."""


def resolve_home(home: str | os.PathLike | None) -> Path:
    """``--home``, else ``$SEAL_HOME``, else ``~/.seal``."""
    if home:
        return Path(home).expanduser().resolve()
    if os.environ.get("SEAL_HOME"):
        return Path(os.environ["SEAL_HOME"]).expanduser().resolve()
    return (Path.home() / ".seal").resolve()


def coerce(value: object, typ: object, where: str) -> object:
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
        return tuple(coerce(v, item, where) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {typ}")


def build(cls: type, values: dict, where: str) -> object:
    """``cls`` (a config dataclass, nesting others) from ``values``; ``where`` prefixes
    the names in errors. A class may map old names to new ones in a ``renamed``
    class attribute, so that an old seal.toml is told the new name."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        new = getattr(cls, "renamed", {}).get(unknown[0])
        hint = f": renamed to {where}{new}" if new else ""
        raise ConfigError(f"unknown setting {where}{unknown[0]}{hint} (known: {', '.join(known)})")
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a table of settings")
            kwargs[name] = build(typ, value, f"{where}{name}.")
        else:
            kwargs[name] = coerce(value, typ, f"{where}{name}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a config's own __post_init__ check
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {e}") from None


def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, table by table."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict:
    """``["wake.candidates=5", "model.path=/m"]`` -> nested dict."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form section.key=value")
        key, value = pair.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def config_items(cfg: object, prefix: str = "") -> list[tuple[str, object, str]]:
    """Flatten a config into (dotted key, value, help) rows, for display and logging."""
    rows: list[tuple[str, object, str]] = []
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(config_items(value, f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("help", "")))
    return rows


def to_toml(cfg: object) -> str:
    """Render a config as seal.toml text (every setting, with its help as a comment)."""
    lines: list[str] = []
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        section = getattr(cfg, f.name)
        lines.append(f"[{f.name}]")
        for sub in dataclasses.fields(section):
            v = getattr(section, sub.name)
            if isinstance(v, bool):
                text = "true" if v else "false"
            elif isinstance(v, tuple):
                text = "[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in v) + "]"
            elif isinstance(v, str):
                text = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(v)
            help_ = sub.metadata.get("help", "")
            lines.append(f"{sub.name} = {text}" + (f"  # {help_}" if help_ else ""))
        lines.append("")
    return "\n".join(lines)

"""The root configuration: one frozen dataclass that nests the config of each part.

Each part's config lives beside the code it configures (``agent.runtime.ModelConfig``,
``agent.ingest.IngestConfig``, ``adapters.lora.LoraConfig``, ...); this module only
gathers them. Values come from the defaults, then ``<home>/seal.toml``, then CLI
overrides (``--set section.key=value``), in that order. Every field carries help text
in its metadata, which ``seal config show`` prints.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from adapters.lora import LoraConfig
from policies.config import PolicyConfig
from policies.schedule import ScheduleConfig

from .daemon import DaemonConfig
from .editor import EditorConfig
from .ingest import IngestConfig
from .runtime import ModelConfig
from .sleep import SleepConfig
from .wake import WakeConfig


class ConfigError(ValueError):
    """A bad seal.toml or override: the message is one line, fit for the user."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the language model"})
    ingest: IngestConfig = field(default_factory=IngestConfig, metadata={"help": "reading documents"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA updates"})
    policies: PolicyConfig = field(default_factory=PolicyConfig, metadata={"help": "strategies by name"})
    wake: WakeConfig = field(default_factory=WakeConfig, metadata={"help": "the wake cycle"})
    sleep: SleepConfig = field(default_factory=SleepConfig, metadata={"help": "the sleep phase: consolidation and its gate"})
    editor: EditorConfig = field(default_factory=EditorConfig, metadata={"help": "ReST-EM on the self-edit writer (in sleep)"})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "when the daemon sleeps"})
    daemon: DaemonConfig = field(default_factory=DaemonConfig, metadata={"help": "the background service"})


def resolve_home(home: str | os.PathLike | None) -> Path:
    """``--home``, else ``$SEAL_HOME``, else ``~/.seal``."""
    if home:
        return Path(home).expanduser().resolve()
    if os.environ.get("SEAL_HOME"):
        return Path(os.environ["SEAL_HOME"]).expanduser().resolve()
    return (Path.home() / ".seal").resolve()


def _coerce(value: object, typ: object, where: str) -> object:
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
        return tuple(_coerce(v, item, where) for v in value)
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


def _build(cls: type, values: dict, where: str) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting {where}{unknown[0]} (known: {', '.join(known)})")
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a table of settings")
            kwargs[name] = _build(typ, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, typ, f"{where}{name}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a config's own __post_init__ check
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {e}") from None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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


def load_config(home: Path, overrides: dict | None = None) -> Config:
    """Defaults, then ``<home>/seal.toml`` if present, then ``overrides``."""
    values: dict = {}
    path = home / "seal.toml"
    if path.exists():
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    values = _merge(values, overrides or {})
    return _build(Config, values, "")  # type: ignore[return-value]


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

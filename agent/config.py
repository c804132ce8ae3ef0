"""The root configuration: one frozen dataclass that nests the config of each part.

Each part's config lives beside the code it configures (``agent.runtime.ModelConfig``,
``agent.ingest.IngestConfig``, ``adapters.lora.LoraConfig``, ...); this module only
gathers them. Values come from the defaults, then ``<home>/seal.toml``, then CLI
overrides (``--set section.key=value``), in that order. Every field carries help text
in its metadata, which ``seal config show`` prints. The generic machinery (building,
merging, rendering) is ``agent.settings``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from adapters.lora import LoraConfig
from policies.config import PolicyConfig
from policies.schedule import ScheduleConfig
from policies.transfer import DistillConfig

from .api.config import ApiConfig
from .daemon.config import DaemonConfig
from .editor import EditorConfig
from .engine import EngineConfig
from .ingest import IngestConfig
from .runner import RunnerConfig
from .runtime import ModelConfig
from .settings import ConfigError, build, merge
from .sleep import SleepConfig
from .wake import WakeConfig


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the language model"})
    ingest: IngestConfig = field(default_factory=IngestConfig, metadata={"help": "reading documents"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA updates"})
    policies: PolicyConfig = field(default_factory=PolicyConfig, metadata={"help": "strategies by name"})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"help": "learning by reading: transfer sets and the open-book teacher"})
    wake: WakeConfig = field(default_factory=WakeConfig, metadata={"help": "the wake cycle"})
    runner: RunnerConfig = field(default_factory=RunnerConfig, metadata={"help": "where the wake cycle's trials run"})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "what generates and scores (answers, self-edits, questions)"})
    sleep: SleepConfig = field(default_factory=SleepConfig, metadata={"help": "the sleep phase: consolidation and its gate"})
    editor: EditorConfig = field(default_factory=EditorConfig, metadata={"help": "ReST-EM on the self-edit writer (in sleep)"})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "when the daemon sleeps"})
    daemon: DaemonConfig = field(default_factory=DaemonConfig, metadata={"help": "the background service"})
    api: ApiConfig = field(default_factory=ApiConfig, metadata={"help": "the daemon's HTTP API (OpenAI-compatible chat, documents, views)"})


def load_config(home: Path, overrides: dict | None = None) -> Config:
    """Defaults, then ``<home>/seal.toml`` if present, then ``overrides``."""
    values: dict = {}
    path = home / "seal.toml"
    if path.exists():
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    values = merge(values, overrides or {})
    return build(Config, values, "")  # type: ignore[return-value]

"""LoRA updates with peft: attach, train, snapshot/restore, atomic save and load."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoraConfig:
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})

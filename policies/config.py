"""Which strategy of each kind is active, by registered name (see each module's registry)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PolicyConfig:
    self_edit: str = field(default="implications", metadata={"help": "self-edit policy: see policies/self_edit.py"})

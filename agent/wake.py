"""The wake cycle: learn one passage the SEAL way."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WakeConfig:
    candidates: int = field(default=3, metadata={"help": "self-edits sampled per passage (N of best-of-N)"})
    heartbeat_s: float = field(default=30.0, metadata={"help": "a claimed job's heartbeat interval"})
    stale_after_s: float = field(default=300.0, metadata={"help": "a claim with no heartbeat for this long is requeued"})
    max_attempts: int = field(default=3, metadata={"help": "a passage that fails this often is marked failed"})

"""The daemon's settings (``[daemon]`` in seal.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class DaemonConfig:
    wake_poll_s: float = field(default=2.0, metadata={"help": "how often the queue is checked for pending passages (s)"})
    inbox_poll_s: float = field(default=5.0, metadata={"help": "how often <home>/inbox is scanned for new files (s)"})
    inbox_settle_s: float = field(
        default=1.0, metadata={"help": "a file in the inbox is read only once it has not changed for this long (s)"}
    )
    sleep_poll_s: float = field(default=30.0, metadata={"help": "how often the schedule is asked whether a sleep is due (s)"})
    sleep_retry_s: float = field(
        default=600.0, metadata={"help": "after a sleep that failed or stopped early, wait this long before trying again (s)"}
    )
    fault_backoff_s: float = field(
        default=60.0, metadata={"help": "after a temporary fault (disk full, out of memory, a locked store), wait this long before learning again (s)"}
    )
    status_every_s: float = field(
        default=10.0,
        metadata={"help": "liveness: how often the daemon writes its status (alive-at time, activity, next sleep) "
                          "to the store, for `seal daemon status` and the dashboard (s)"},
    )
    stop_timeout_s: float = field(
        default=120.0, metadata={"help": "warm stop: longest wait for the current step to finish or abandon, then stop cold (s)"}
    )
    keep_versions: int = field(
        default=20,
        metadata={"help": "disk bound: after each learned passage and each sleep, prune wake versions beyond this many "
                          "newest (the active one and sleep checkpoints' parents always stay, as with `seal prune`); "
                          "0 keeps every version"},
    )
    keep_sleeps: int = field(
        default=10,
        metadata={"help": "disk bound: with keep_versions, also prune sleep checkpoints and editor versions beyond "
                          "this many newest (and so their parents); 0 keeps every checkpoint"},
    )
    misfire_grace_s: float = field(
        default=300.0, metadata={"help": "APScheduler: a job run later than this (the model was busy) is skipped (s)"}
    )

    # old name -> new name, for the error an old seal.toml gets (agent.settings.build)
    renamed: ClassVar[dict[str, str]] = {"heartbeat_s": "status_every_s"}

    def __post_init__(self) -> None:
        for name in ("wake_poll_s", "inbox_poll_s", "sleep_poll_s", "sleep_retry_s", "fault_backoff_s", "status_every_s",
                     "stop_timeout_s", "misfire_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.keep_versions < 0:
            raise ValueError(f"keep_versions must be 0 or more, got {self.keep_versions}")
        if self.inbox_settle_s < 0:
            raise ValueError(f"inbox_settle_s must be 0 or more, got {self.inbox_settle_s}")

"""The home folder: seal.toml, store.db, adapters/, inbox/, logs/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "seal.toml"

    @property
    def store_file(self) -> Path:
        return self.root / "store.db"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ensure(self) -> Home:
        for d in (self.root, self.adapters, self.inbox, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        return self

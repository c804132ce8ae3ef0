"""Adapter versions on disk and in the store.

Each committed version is a standard PEFT adapter folder ``<root>/<name>-<NNNN>``
with a row in the store's ``adapters`` table. The order of a commit is what makes a
crash harmless: the folder is written to a temp dir, fsynced and renamed first; only
then does one store transaction insert the row and move the active pointer. A crash
before that transaction leaves a folder with no row (removed by ``recover``) and the
previous version still active.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from store import Store

from . import lora
from .lora import AdapterError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


class AdapterRegistry:
    def __init__(self, root: Path, store: Store):
        self.root = Path(root)
        self.store = store
        self.root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------- writing
    def commit(
        self,
        peft_model,
        adapter: str,
        *,
        name: str,
        kind: str,
        parent_id: str | None,
        passage_id: int | None,
        policy: str | None,
        reward: float | None,
        metrics: dict,
        in_transaction: Callable[[str], object] | None = None,
    ) -> str:
        """Save ``adapter``'s weights as the next version of ``name`` and make it the
        active one. ``in_transaction(new_id)`` runs inside the store transaction that
        inserts the row, so what it writes lands together with the adapter, or not at
        all. Returns the new id."""
        version = self.store.next_version(name)
        adapter_id = f"{name}-{version:04d}"
        dest = self.root / adapter_id
        sha = lora.save(peft_model, adapter, dest)
        row = {
            "id": adapter_id,
            "name": name,
            "version": version,
            "parent_id": parent_id,
            "kind": kind,
            "passage_id": passage_id,
            "path": adapter_id,
            "sha256": sha,
            "policy": policy,
            "reward": reward,
            "metrics": metrics,
        }
        also = (lambda: in_transaction(adapter_id)) if in_transaction is not None else None
        try:
            self.store.add_adapter(row, activate=True, also=also)
        except BaseException:
            # Nothing points at the folder: remove it now rather than at the next start.
            shutil.rmtree(dest, ignore_errors=True)
            raise
        log.info("committed %s (parent %s, sha256 %s)", adapter_id, parent_id, sha[:12])
        return adapter_id

    def activate(self, name: str, adapter_id: str) -> None:
        """Point ``name`` at an existing version (rollback). Its folder must exist."""
        row = self.store.adapter(adapter_id)
        if row is None or row["name"] != name:
            raise AdapterError(f"no {name} adapter {adapter_id!r}")
        if not (self.root / row["path"] / lora.WEIGHTS_NAME).is_file():
            raise AdapterError(f"adapter {adapter_id}: its files are missing from {self.root / row['path']}")
        self.store.set_active(name, adapter_id)
        log.info("activated %s", adapter_id)

    # ---------------------------------------------------------------------- reading
    def active(self, name: str) -> dict | None:
        adapter_id = self.store.active_adapter_id(name)
        return self.store.adapter(adapter_id) if adapter_id else None

    def get(self, adapter_id: str) -> dict | None:
        return self.store.adapter(adapter_id)

    def list(self, name: str | None = None) -> list[dict]:
        return self.store.adapters(name)

    def path(self, adapter_id: str) -> Path:
        row = self.store.adapter(adapter_id)
        if row is None:
            raise AdapterError(f"no adapter {adapter_id!r}")
        return self.root / row["path"]

    def load_into(self, peft_model, adapter: str, adapter_id: str) -> None:
        """Load a committed version into a named adapter, checking its sha256."""
        row = self.store.adapter(adapter_id)
        if row is None:
            raise AdapterError(f"no adapter {adapter_id!r}")
        lora.load(peft_model, adapter, self.root / row["path"], expected_sha256=row["sha256"])

    # --------------------------------------------------------------------- recovery
    def recover(self) -> list[str]:
        """Remove what a crash left behind: temp dirs of unfinished saves, and folders
        with no row in the store (renamed, but the transaction never committed). A
        folder with a row is never touched. Run it at start, before any commit."""
        known = {row["path"] for row in self.store.adapters()}
        removed = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                continue
            if entry.name.startswith(TMP_PREFIX) or entry.name not in known:
                shutil.rmtree(entry)
                removed.append(entry.name)
                log.warning("recover: removed %s (%s)", entry, "unfinished save" if entry.name.startswith(TMP_PREFIX) else "no row in the store")
        return removed

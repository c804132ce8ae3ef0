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
from dataclasses import dataclass, field
from pathlib import Path

from store import Store

from . import files
from .lora import AdapterError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class PrunePlan:
    """What ``prune`` removes and why the other versions stay."""

    remove: list[dict] = field(default_factory=list)  # id, path, version, bytes
    kept: dict[str, str] = field(default_factory=dict)  # version id -> why it stays

    @property
    def bytes(self) -> int:
        return sum(r["bytes"] for r in self.remove)


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
        sha = files.save(peft_model, adapter, dest)
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
            # Nothing points at the folder unless the transaction did commit (a Ctrl-C
            # just after COMMIT): remove it now only when the store has no row for it.
            # When the store cannot say, leave it to recovery, which never removes a
            # folder with a row.
            try:
                committed = self.store.adapter(adapter_id) is not None
            except Exception:
                committed = True
            if not committed:
                shutil.rmtree(dest, ignore_errors=True)
            raise
        log.info("committed %s (parent %s, sha256 %s)", adapter_id, parent_id, sha[:12])
        return adapter_id

    def activate(self, name: str, adapter_id: str) -> None:
        """Point ``name`` at an existing version (rollback). Its folder must exist."""
        row = self.store.adapter(adapter_id)
        if row is None or row["name"] != name:
            raise AdapterError(f"no {name} adapter {adapter_id!r}")
        if not (self.root / row["path"] / files.WEIGHTS_NAME).is_file():
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
        files.load(peft_model, adapter, self.root / row["path"], expected_sha256=row["sha256"])

    # --------------------------------------------------------------------- recovery
    def recover(self) -> list[str]:
        """Remove what a crash left behind: temp dirs of unfinished saves, and folders
        with no row in the store (renamed, but the transaction never committed). A
        folder with a row is never touched. Run it at start, before any commit. It
        reads only the rows of the folders on disk (a few, when pruning runs)."""
        entries = [e for e in sorted(self.root.iterdir()) if e.is_dir() and not e.is_symlink()]
        known = self.store.known_paths(e.name for e in entries if not e.name.startswith(TMP_PREFIX))
        removed = []
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX) or entry.name not in known:
                shutil.rmtree(entry)
                removed.append(entry.name)
                log.warning("recover: removed %s (%s)", entry, "unfinished save" if entry.name.startswith(TMP_PREFIX) else "no row in the store")
        return removed

    # ---------------------------------------------------------------------- pruning
    def _folder(self, row: dict) -> Path:
        """The version's folder, which must be a direct child of the registry root."""
        folder = self.root / row["path"]
        if folder.resolve().parent != self.root.resolve():
            raise AdapterError(f"adapter {row['id']}: path {row['path']!r} is outside {self.root}")
        return folder

    def prune_plan(self, keep: int, keep_sleeps: int = 0) -> PrunePlan:
        """Which versions' files ``prune(keep, keep_sleeps)`` removes. Of each adapter
        name these stay:

        - the ``keep`` newest wake versions not yet pruned (by version number,
          whatever their status);
        - the ``keep_sleeps`` newest checkpoints (sleep and editor versions); all of
          them when ``keep_sleeps`` is 0;
        - the active version;
        - every version *referenced* by a checkpoint that stays: named as its parent
          (a sleep checkpoint's parent is the version the sleep consolidated, the
          rollback point should the sleep turn out bad; an editor version's likewise).

        A wake child does not reference its wake parent: each version's file is a
        complete LoRA state, not a delta, so no kept version needs its parent's files
        (the lineage itself stays in the store). Versions already marked pruned whose
        folder is still there (a prune interrupted between the store and the disk) are
        finished off. Only the rows not yet pruned and those of folders on disk are
        read, so the plan costs the same at 10 versions and at 10,000."""
        if keep < 0 or keep_sleeps < 0:
            raise ValueError("keep and keep_sleeps must be >= 0")
        on_disk = [e.name for e in self.root.iterdir() if e.is_dir() and not e.name.startswith(TMP_PREFIX)]
        rows = self.store.adapters_to_plan(on_disk)
        active = set(self.store.active_adapters().values())
        plan = PrunePlan()
        for name in sorted({r["name"] for r in rows}):
            mine = [r for r in rows if r["name"] == name and r["status"] != "pruned"]
            wake = [r for r in mine if r["kind"] == "wake"]
            checkpoints = [r for r in mine if r["kind"] != "wake"]
            newest = {r["id"] for r in wake[-keep:]} if keep else set()
            kept_checkpoints = {r["id"] for r in (checkpoints[-keep_sleeps:] if keep_sleeps else checkpoints)} | active
            referenced = {r["parent_id"]: r["id"] for r in checkpoints if r["id"] in kept_checkpoints and r["parent_id"]}
            for r in mine:
                if r["kind"] != "wake" and not keep_sleeps:
                    continue  # every checkpoint stays: not a candidate, not listed
                if r["id"] in active:
                    plan.kept[r["id"]] = "active"
                elif r["id"] in newest:
                    plan.kept[r["id"]] = f"one of the {keep} newest"
                elif r["kind"] != "wake" and r["id"] in kept_checkpoints:
                    plan.kept[r["id"]] = f"one of the {keep_sleeps} newest checkpoints"
                elif r["id"] in referenced:
                    plan.kept[r["id"]] = f"parent of {referenced[r['id']]}"
                else:
                    plan.remove.append(self._removal(r, self._folder(r)))
        for r in rows:
            if r["status"] == "pruned":  # its folder is still on disk: finish it off
                plan.remove.append(self._removal(r, self._folder(r)))
        return plan

    @staticmethod
    def _removal(row: dict, folder: Path) -> dict:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0
        return {"id": row["id"], "path": row["path"], "version": row["version"], "bytes": size,
                "status": row["status"]}

    def prune(self, keep: int, keep_sleeps: int = 0) -> PrunePlan:
        """Remove the files of the versions ``prune_plan`` names: first one store
        transaction marks their rows 'pruned' and records a 'prune' event listing
        them (ids, paths, bytes), then their folders go. Rows are never deleted: the
        lineage, rewards and evaluations stay."""
        plan = self.prune_plan(keep, keep_sleeps)
        if not plan.remove:
            return plan
        fresh = [r for r in plan.remove if r["status"] != "pruned"]
        self.store.mark_pruned([{k: r[k] for k in ("id", "path", "bytes")} for r in plan.remove],
                               {"keep": keep, "keep_sleeps": keep_sleeps, "bytes": plan.bytes,
                                "marked": [r["id"] for r in fresh]})
        for r in plan.remove:
            shutil.rmtree(self.root / r["path"], ignore_errors=True)
            log.info("pruned %s (%d bytes)", r["id"], r["bytes"])
        return plan

    def verify(self, adapter_id: str) -> str | None:
        """Why this version's files cannot be used, or None if they are complete and
        their sha256 matches the store's."""
        import hashlib

        row = self.store.adapter(adapter_id)
        if row is None:
            return f"no adapter {adapter_id!r}"
        if row["status"] == "pruned":
            return f"adapter {adapter_id} was pruned: its files are gone"
        folder = self._folder(row)
        try:
            data = (folder / files.WEIGHTS_NAME).read_bytes()
        except OSError:
            return f"adapter {adapter_id}: {folder / files.WEIGHTS_NAME} is missing"
        if not (folder / files.CONFIG_NAME).is_file():
            return f"adapter {adapter_id}: {folder / files.CONFIG_NAME} is missing"
        digest = hashlib.sha256(data).hexdigest()
        if digest != row["sha256"]:
            return f"adapter {adapter_id}: sha256 {digest[:12]}… does not match the store's {row['sha256'][:12]}…"
        return None

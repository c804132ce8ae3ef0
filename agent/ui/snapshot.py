"""The store as the UI sees it: one snapshot, read in one transaction.

The UI only reads. ``take_snapshot`` reads everything a dashboard needs in one read
transaction (the daemon's status, the adapter lineage, recent passages and their
candidates, the forgetting matrix, the reward / retention / memorisation series, the
tail of the daemon's log); the panels (agent/ui/panels) turn a snapshot into
renderables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from store import Store

from ..home import Home

LOG_NAME = "daemon.log"


@dataclass
class Snapshot:
    """Everything a dashboard shows, read at one moment."""

    home: str
    taken_at: float
    has_store: bool = False
    status: dict = field(default_factory=dict)
    lineage: list[dict] = field(default_factory=list)  # every adapter version, oldest first
    active: dict[str, str] = field(default_factory=dict)
    passages: list[dict] = field(default_factory=list)  # recent passages (store.passage_overview)
    candidates: dict[int, list[dict]] = field(default_factory=dict)  # cycle id -> candidates (no text)
    forgetting: dict = field(default_factory=dict)
    rewards: list[dict] = field(default_factory=list)
    memorisation: list[dict] = field(default_factory=list)
    drift: list[dict] = field(default_factory=list)
    sleeps: list[dict] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    retention: list[tuple[str, int, float]] = field(default_factory=list)  # retention_series(forgetting)

    def adapter(self, adapter_id: str | None) -> dict | None:
        return next((a for a in self.lineage if a["id"] == adapter_id), None)


def tail(path: Path, lines: int, chunk: int = 1 << 16) -> list[str]:
    """The last ``lines`` lines of a text file, read from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            end = f.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= lines:
                step = min(chunk, end)
                end -= step
                f.seek(end)
                data = f.read(step) + data
    except OSError:
        return []
    return [ln for ln in data.decode("utf-8", errors="replace").splitlines() if ln.strip()][-lines:]


def take_snapshot(home: Home, store: Store | None, *, passages: int = 40, versions: int = 200, log_lines: int = 200,
                  now: float | None = None) -> Snapshot:
    """Read a snapshot. ``store`` is None when the home has no store yet (nothing is
    created: a viewer changes nothing). It is a window, so that its cost does not grow
    with the store: the ``passages`` most recent passages (and the forgetting matrix of
    the ones learned last), the ``versions`` newest versions of each adapter, and the
    trends of the last ``versions`` cycles, versions and drift measurements."""
    from ..daemon import daemon_status
    from ..tracking import forgetting_summary

    now = time.time() if now is None else now
    snap = Snapshot(home=str(home.root), taken_at=now)
    snap.status = daemon_status(home, now=now, disk=False)
    snap.log_tail = tail(home.logs / LOG_NAME, log_lines)
    if store is None:
        return snap
    snap.has_store = True
    with store.reading():
        snap.lineage = store.lineage(newest=versions)
        snap.active = store.active_adapters()
        snap.passages = store.passage_overview(limit=passages)
        cands = store.cycle_candidates(p["cycle_id"] for p in snap.passages if p["cycle_id"] is not None)
        for c in cands:
            c.pop("text", None)
            c.pop("prompt", None)
            snap.candidates.setdefault(c["cycle_id"], []).append(c)
        snap.forgetting = forgetting_summary(store, overall=False)
        snap.rewards = store.reward_series(last=versions)
        snap.memorisation = store.memorisation_rates(last=versions)
        snap.drift = store.drift(last=versions)
        snap.sleeps = store.sleeps(limit=20)
    snap.retention = retention_series(snap.forgetting)
    return snap


def retention_series(s: dict) -> list[tuple[str, int, float]]:
    """Per knowledge version (in order): mean probe accuracy under it of the passages
    learned up to it, over their mean accuracy at learning — (id, version, retention),
    for the versions that measured any learned passage."""
    if not s or not s.get("passages"):
        return []
    learned_v = {}
    versions = {a["id"]: a["version"] for a in s["adapters"] if a["id"]}
    for j, p in enumerate(s["per_passage"]):
        learned_v[j] = versions.get(p["learned_by"], 0)
    out = []
    for i, a in enumerate(s["adapters"]):
        if a["id"] is None:
            continue
        cur, at = [], []
        for j, p in enumerate(s["per_passage"]):
            c = s["accuracy"][i][j]
            if c is None or p["at_learning"] is None or learned_v[j] > a["version"]:
                continue
            cur.append(c)
            at.append(p["at_learning"])
        if cur and sum(at) > 0:
            out.append((a["id"], a["version"], (sum(cur) / len(cur)) / (sum(at) / len(at))))
    return out

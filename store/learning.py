"""Wake cycles, candidates, evaluations and adapter versions.

Owns the record of each wake cycle (its candidates are the RL data), the evaluations,
the adapter versions with the active pointer of each adapter name, their lineage and
history, and the two acts on history: rollback and prune marks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from .clock import _now


class LearningStore:
    """Store methods for cycles, evaluations and adapters (mixed into Store)."""

    # ------------------------------------------------------- cycles, candidates, evals
    def record_cycle(
        self,
        cycle: dict,
        candidates: list[dict],
        evaluations: list[dict],
        job_id: int | None = None,
        now: float | None = None,
    ) -> int:
        """Record one wake cycle: its outcome, every candidate tried (the RL data), the
        evaluations it made, and its job as done. Runs inside the caller's transaction
        when there is one (the adapter commit), so all of it lands with the adapter."""
        at = _now(now)
        with self.db.atomic():
            cycle_id = self.db["cycles"].insert({**cycle, "finished_at": at}).last_pk
            self.db["candidates"].insert_all(
                {**c, "cycle_id": cycle_id, "passage_id": cycle["passage_id"], "created_at": at} for c in candidates
            )
            self.db["evaluations"].insert_all({**e, "at": at} for e in evaluations)
            if job_id is not None:
                self.db.execute(
                    "UPDATE jobs SET state = 'done', error = NULL, updated_at = ? WHERE id = ?", [at, job_id]
                )
        return cycle_id

    def cycles(self, passage_id: int | None = None, limit: int = 1000) -> list[dict]:
        if passage_id is None:
            return self._rows("SELECT * FROM cycles ORDER BY id DESC LIMIT ?", [limit])
        return self._rows("SELECT * FROM cycles WHERE passage_id = ? ORDER BY id DESC LIMIT ?", [passage_id, limit])

    def candidates(self, passage_id: int) -> list[dict]:
        return self._rows("SELECT * FROM candidates WHERE passage_id = ? ORDER BY cycle_id, idx", [passage_id])

    def learned_passages(self) -> list[int]:
        """Passages that some committed cycle learned, oldest first."""
        sql = "SELECT DISTINCT passage_id FROM cycles WHERE outcome = 'committed' ORDER BY passage_id"
        return [pid for (pid,) in self.db.execute(sql).fetchall()]

    def learned_sample(self, current: int, k: int, turn: int) -> list[int]:
        """Up to ``k`` learned passages other than ``current``, a different window each
        ``turn``: the window starts at id ``turn * k`` modulo the largest learned id and
        wraps around, so that over the turns every learned passage is re-measured. Two
        index range scans: its cost does not grow with the passages learned."""
        if k <= 0:
            return []
        row = self._one("SELECT MAX(passage_id) AS m FROM cycles WHERE outcome = 'committed'")
        if not row or row["m"] is None:
            return []
        start = (turn * k) % (row["m"] + 1)
        sql = ("SELECT DISTINCT passage_id FROM cycles WHERE outcome = 'committed' AND passage_id >= ? "
               "AND passage_id < ? AND passage_id != ? ORDER BY passage_id LIMIT ?")
        got = [p for (p,) in self.db.execute(sql, [start, row["m"] + 1, current, k]).fetchall()]
        if len(got) < k:  # wrap around to the start
            got += [p for (p,) in self.db.execute(sql, [0, start, current, k - len(got)]).fetchall()]
        return got

    def last_wake_versions(self, name: str) -> dict[int, int]:
        """Passage -> the version number of its latest wake version of ``name``."""
        sql = ("SELECT passage_id, MAX(version) FROM adapters WHERE name = ? AND kind = 'wake' "
               "AND passage_id IS NOT NULL GROUP BY passage_id")
        return dict(self.db.execute(sql, [name]).fetchall())

    def evaluations(self, adapter_id: str | None = None, passage_id: int | None = None) -> list[dict]:
        sql, args = "SELECT * FROM evaluations WHERE 1 = 1", []
        if adapter_id is not None:
            sql, args = sql + " AND adapter_id = ?", [*args, adapter_id]
        if passage_id is not None:
            sql, args = sql + " AND passage_id = ?", [*args, passage_id]
        return self._rows(sql + " ORDER BY id", args)

    def add_evaluations(self, rows: list[dict], now: float | None = None) -> None:
        """Evaluation rows measured outside a wake cycle (a sleep re-measures every
        learned passage). Runs inside the caller's transaction when there is one."""
        at = _now(now)
        with self.db.atomic():
            self.db["evaluations"].insert_all({"at": at, **r} for r in rows)

    # ----------------------------------------------------------------------- adapters
    # Adapter versions and the active pointer of each adapter name (state key
    # ``active.<name>``). The files are written before any of this runs; a row exists
    # only for a completely written adapter folder.
    @staticmethod
    def _adapter_row(row: dict | None) -> dict | None:
        if row is not None and isinstance(row.get("metrics"), str):
            row["metrics"] = json.loads(row["metrics"])
        return row

    def add_adapter(
        self,
        row: dict,
        activate: bool,
        also: Callable[[], object] | None = None,
        now: float | None = None,
    ) -> None:
        """Insert an adapter version and, if ``activate``, point ``active.<name>`` at
        it: in one transaction, together with whatever ``also`` writes (it runs inside
        that transaction; if it raises, none of it is kept)."""
        at = _now(now)
        row = {"status": "committed", "created_at": at, **row}
        if not isinstance(row.get("metrics"), str | None):
            row["metrics"] = json.dumps(row["metrics"])
        with self.db.atomic():
            self.db["adapters"].insert(row)
            if activate:
                previous = self.get_state(f"active.{row['name']}")
                self.db["state"].upsert({"key": f"active.{row['name']}", "value": row["id"]}, pk="key")
                self._event("commit", {"id": row["id"], "name": row["name"], "previous": previous}, at)
            if also is not None:
                also()

    def adapter(self, adapter_id: str) -> dict | None:
        return self._adapter_row(self._one("SELECT * FROM adapters WHERE id = ?", [adapter_id]))

    def adapters(self, name: str | None = None, newest: int | None = None) -> list[dict]:
        """Versions by name and version; with ``name``, ``newest`` keeps the last N."""
        if name is None:
            rows = self._rows("SELECT * FROM adapters ORDER BY name, version")
        elif newest is None:
            rows = self._rows("SELECT * FROM adapters WHERE name = ? ORDER BY version", [name])
        else:
            rows = self._rows("SELECT * FROM adapters WHERE name = ? ORDER BY version DESC LIMIT ?", [name, newest])[::-1]
        return [self._adapter_row(r) for r in rows]

    def count_adapters(self, name: str) -> int:
        return self._one("SELECT COUNT(*) AS n FROM adapters WHERE name = ?", [name])["n"]

    def first_learned(self, name: str, last: int | None = None) -> tuple[list[dict], int]:
        """Each learned passage with the first wake version of ``name`` that learned it
        (rolled-back ones aside), in learning order; ``last``: only the N learned last
        (read newest first, so that it stops after N; ``+b.name`` keeps SQLite on the
        passage index for the earlier-version check). Rows: passage_id, adapter_id,
        version. Also returns how many there are in all (a counter that triggers keep,
        migration 0009)."""
        wake = "name = ? AND kind = 'wake' AND passage_id IS NOT NULL AND status != 'rolled_back'"
        total = (self._one("SELECT n FROM learned_counts WHERE name = ?", [name]) or {"n": 0})["n"]  # kept by triggers
        rows = self._rows(
            f"""SELECT a.passage_id, a.id AS adapter_id, a.version FROM adapters a
                WHERE a.{wake.replace(" AND ", " AND a.")}
                  AND NOT EXISTS (SELECT 1 FROM adapters b WHERE b.passage_id = a.passage_id AND +b.name = a.name
                                  AND b.kind = 'wake' AND b.status != 'rolled_back' AND b.version < a.version)
                ORDER BY a.version DESC LIMIT ?""", [name, -1 if last is None else last])
        return rows[::-1], total

    def adapters_to_plan(self, paths: Iterable[str] = ()) -> list[dict]:
        """What a prune plans over: every version not yet pruned, and the pruned ones
        whose folder name is in ``paths`` (the folders still on disk). With automatic
        pruning this stays a few dozen rows however long the history."""
        paths = list(paths)
        marks = ",".join("?" * len(paths))
        # two index lookups (the live versions; the folders on disk), not a scan of every version
        rows = self._rows("SELECT * FROM adapters WHERE status != 'pruned'")
        if paths:
            seen = {r["id"] for r in rows}
            rows += [r for r in self._rows(f"SELECT * FROM adapters WHERE path IN ({marks})", paths) if r["id"] not in seen]
        rows.sort(key=lambda r: (r["name"], r["version"]))
        return [self._adapter_row(r) for r in rows]

    def known_paths(self, paths: Iterable[str]) -> set[str]:
        """Which of these folder names have a row (recovery never touches those)."""
        paths = list(paths)
        if not paths:
            return set()
        rows = self._rows(f"SELECT path FROM adapters WHERE path IN ({','.join('?' * len(paths))})", paths)
        return {r["path"] for r in rows}

    def committed_versions(self, name: str, up_to: int | None, limit: int) -> list[str]:
        """The ids of the ``limit`` newest committed versions of ``name`` at or below
        version ``up_to`` (None: any), oldest first: what a merging sleep combines."""
        rows = self._rows("SELECT id FROM adapters WHERE name = ? AND status = 'committed' AND (? IS NULL OR version <= ?) "
                          "ORDER BY version DESC LIMIT ?", [name, up_to, up_to, limit])
        return [r["id"] for r in reversed(rows)]

    def active_adapter_id(self, name: str) -> str | None:
        return self.get_state(f"active.{name}")

    def set_active(self, name: str, adapter_id: str, now: float | None = None) -> None:
        """Point ``active.<name>`` at an existing version (rollback, or forward again).
        Versions newer than it that were committed are marked rolled_back; it is marked
        committed. Records an 'activate' event."""
        at = _now(now)
        with self.db.atomic():
            row = self._one("SELECT name, version FROM adapters WHERE id = ?", [adapter_id])
            if row is None or row["name"] != name:
                raise KeyError(f"no {name} adapter {adapter_id!r}")
            previous = self.get_state(f"active.{name}")
            self.db.execute(
                "UPDATE adapters SET status = 'rolled_back' WHERE name = ? AND version > ? AND status = 'committed'",
                [name, row["version"]],
            )
            self.db.execute("UPDATE adapters SET status = 'committed' WHERE id = ?", [adapter_id])
            self.db["state"].upsert({"key": f"active.{name}", "value": adapter_id}, pk="key")
            self._event("activate", {"id": adapter_id, "name": name, "previous": previous}, at)

    def next_version(self, name: str) -> int:
        row = self._one("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM adapters WHERE name = ?", [name])
        return int(row["v"]) if row else 1

    # "knowledge" is adapters.names.KNOWLEDGE (the store imports nothing of the project)
    def adapter_history(self, name: str = "knowledge", limit: int = -1, offset: int = 0) -> list[dict]:
        """Adapter versions newest first (``limit`` of them from ``offset``; < 0: all),
        with their passage title, probe accuracy at commit time and whether each is the
        active one (for `seal history`)."""
        active = self.get_state(f"active.{name}")
        rows = self._rows(
            """SELECT a.id, a.parent_id, a.kind, a.passage_id, a.policy, a.reward, a.status,
                      a.created_at, a.sha256, p.title,
                      (SELECT e.accuracy FROM evaluations e WHERE e.adapter_id = a.id
                         AND e.passage_id = a.passage_id AND e.kind = 'probe' ORDER BY e.id LIMIT 1) AS probe_acc
               FROM adapters a LEFT JOIN passages p ON p.id = a.passage_id
               WHERE a.name = ? ORDER BY a.version DESC LIMIT ? OFFSET ?""",
            [name, limit, offset],
        )
        for r in rows:
            r["active"] = r["id"] == active
        return rows

    def lineage(self, name: str | None = None, newest: int | None = None) -> list[dict]:
        """Adapter versions oldest first (all names, or one), each with its passage's
        title and the probe accuracy measured on that passage at commit time;
        ``newest``: only the last N versions of each name."""
        names = [name] if name is not None else self.adapter_names()
        out = []
        for n in sorted(names):
            rows = self._rows(
                """SELECT a.*, p.title,
                          (SELECT e.accuracy FROM evaluations e WHERE e.adapter_id = a.id
                             AND e.passage_id = a.passage_id AND e.kind = 'probe' ORDER BY e.id LIMIT 1) AS probe_acc
                   FROM adapters a LEFT JOIN passages p ON p.id = a.passage_id
                   WHERE a.name = ? ORDER BY a.version DESC LIMIT ?""",
                [n, -1 if newest is None else newest],
            )
            out += [self._adapter_row(r) for r in reversed(rows)]
        return out

    def adapter_names(self) -> list[str]:
        """The adapter names in use, in order: one index seek per name (a DISTINCT
        reads every version's index entry)."""
        return [r["name"] for r in self._rows(
            """WITH RECURSIVE n(name) AS (SELECT MIN(name) FROM adapters
                   UNION ALL SELECT (SELECT MIN(name) FROM adapters WHERE name > n.name) FROM n WHERE n.name IS NOT NULL)
               SELECT name FROM n WHERE name IS NOT NULL""")]

    def active_adapters(self) -> dict[str, str]:
        """Adapter name -> its active version id."""
        rows = self._rows("SELECT key, value FROM state WHERE key LIKE 'active.%'")
        return {r["key"].split(".", 1)[1]: r["value"] for r in rows}

    # ------------------------------------------------------------ acts on history
    # Rollback and prune each record an event in the same transaction as their change.
    def rollback(self, name: str, adapter_id: str, now: float | None = None) -> dict:
        """Make an existing version of ``name`` the active one (``set_active``: newer
        committed versions are marked rolled_back) and record a 'rollback' event that
        says what was active and what was rolled back: one transaction. Nothing is
        deleted. Returns the event's detail."""
        at = _now(now)
        with self.db.atomic():
            row = self._one("SELECT name, version, status FROM adapters WHERE id = ?", [adapter_id])
            if row is None or row["name"] != name:
                raise KeyError(f"no {name} adapter {adapter_id!r}")
            if row["status"] == "pruned":
                raise ValueError(f"adapter {adapter_id} was pruned: its files are gone")
            newer = [r["id"] for r in self._rows(
                "SELECT id FROM adapters WHERE name = ? AND version > ? AND status = 'committed' ORDER BY version",
                [name, row["version"]])]
            detail = {"id": adapter_id, "name": name, "previous": self.get_state(f"active.{name}"),
                      "rolled_back": newer}
            self.set_active(name, adapter_id, now=at)
            self._event("rollback", detail, at)
        return detail

    def mark_pruned(self, removed: list[dict], detail: dict, now: float | None = None) -> None:
        """Mark versions pruned (their files are about to be removed) and record a
        'prune' event listing them: one transaction, before any file goes, so a crash
        in between leaves only files the store no longer counts on. ``removed``: rows
        with at least id, path; an active version is refused and nothing changes."""
        at = _now(now)
        ids = [r["id"] for r in removed]
        with self.db.atomic():
            active = set(self.active_adapters().values())
            if active & set(ids):
                raise ValueError(f"refusing to prune the active version {sorted(active & set(ids))[0]}")
            for aid in ids:
                self.db.execute("UPDATE adapters SET status = 'pruned' WHERE id = ?", [aid])
            self._event("prune", {**detail, "removed": removed}, at)

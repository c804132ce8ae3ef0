"""Sleeps, editor rounds and the tracking measurements.

Owns the sleep reports (the source of truth for the schedule), the ReST-EM editor
rounds with the pairs and held-out passages they train and measure on, drift,
verbatim memorisation and the probe matrix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from .clock import _now


class SleepStore:
    """Store methods for sleeps, editor rounds and tracking (mixed into Store)."""

    # ------------------------------------------------------------------ sleep, tracking
    # The source of truth for the schedule: the last sleep and the commits since it are
    # read from here, never from the scheduler's memory.
    def record_sleep(self, row: dict, now: float | None = None) -> int:
        """Record one sleep report. Runs inside the caller's transaction when there is
        one (the consolidated adapter's commit), so the report lands with the adapter."""
        at = _now(now)
        row = {"finished_at": at, **row}
        for key in ("before", "after", "timings"):
            if not isinstance(row.get(key), str | None):
                row[key] = json.dumps(row[key])
        with self.db.atomic():
            sleep_id = self.db["sleeps"].insert(row).last_pk
            self._event("sleep", {"id": sleep_id, "outcome": row["outcome"], "adapter_id": row.get("adapter_id")}, at)
        return sleep_id

    def sleeps(self, limit: int = 100) -> list[dict]:
        rows = self._rows("SELECT * FROM sleeps ORDER BY id DESC LIMIT ?", [limit])
        for r in rows:
            for key in ("before", "after", "timings"):
                r[key] = json.loads(r[key]) if r[key] else None
        return rows

    def sleep_count(self) -> int:
        return self._one("SELECT COUNT(*) AS n FROM sleeps")["n"]

    def last_sleep_at(self) -> float | None:
        """When the last sleep (of any outcome but 'failed') started; None if never."""
        row = self._one("SELECT started_at AS t FROM sleeps WHERE outcome != 'failed' ORDER BY started_at DESC LIMIT 1")
        return row["t"] if row else None

    # "knowledge" is adapters.names.KNOWLEDGE (the store imports nothing of the project)
    def commits_since(self, at: float | None, name: str = "knowledge") -> int:
        """Wake commits of ``name`` after time ``at`` (all of them if None)."""
        row = self._one(
            "SELECT count(*) AS n FROM adapters WHERE name = ? AND kind = 'wake' AND created_at > ?",
            [name, -1.0 if at is None else at],
        )
        return int(row["n"]) if row else 0

    # "knowledge" is adapters.names.KNOWLEDGE (the store imports nothing of the project)
    def first_commit_since(self, at: float | None, name: str = "knowledge") -> float | None:
        """When the first wake commit of ``name`` after time ``at`` was made (None: none)."""
        row = self._one(
            "SELECT MIN(created_at) AS t FROM adapters WHERE name = ? AND kind = 'wake' AND created_at > ?",
            [name, -1.0 if at is None else at],
        )
        return row["t"] if row else None

    def last_activity_at(self) -> float | None:
        """The latest ingest or finished cycle: what 'idle for T' is measured from."""
        row = self._one(
            "SELECT MAX(t) AS t FROM (SELECT MAX(ingested_at) AS t FROM documents"
            " UNION ALL SELECT MAX(finished_at) FROM cycles)"
        )
        return row["t"] if row else None

    def record_editor_round(self, row: dict, now: float | None = None) -> int:
        at = _now(now)
        row = {"finished_at": at, **row}
        if not isinstance(row.get("detail"), str | None):
            row["detail"] = json.dumps(row["detail"])
        with self.db.atomic():
            return self.db["editor_rounds"].insert(row).last_pk

    def editor_rounds(self, limit: int = 100) -> list[dict]:
        rows = self._rows("SELECT * FROM editor_rounds ORDER BY id DESC LIMIT ?", [limit])
        for r in rows:
            r["detail"] = json.loads(r["detail"]) if r["detail"] else None
        return rows

    def restem_pairs(self, margin: float, limit: int, per_passage: int, window: int = 0) -> list[dict]:
        """(passage -> self-edit) pairs for ReST-EM: candidates whose selecting reward
        (``reward``; ``reward_logprob`` for rows written before it was recorded) beats
        the passage-only trial of the same cycle by more than ``margin`` (the no-update
        baseline, i.e. 0, when the cycle has no scored passage-only trial). Identical
        texts count once; at most ``per_passage`` per passage; best advantage first.
        Only the candidates of the last ``window`` cycles are read (0: every cycle), so
        that a sleep's E-step costs the same at 10,000 learned passages as at 1,000.
        Each row: candidate_id, cycle_id, passage_id, title, passage_text, policy,
        text, reward, passage_reward (NULL: none), advantage."""
        return self._rows(
            """WITH scored AS (
                   SELECT c.id AS candidate_id, c.cycle_id, c.passage_id, c.policy, c.text,
                          COALESCE(c.reward, c.reward_logprob) AS reward,
                          (SELECT COALESCE(po.reward, po.reward_logprob) FROM candidates po
                             WHERE po.cycle_id = c.cycle_id AND po.policy = 'passage'
                               AND COALESCE(po.reward, po.reward_logprob) IS NOT NULL
                             ORDER BY po.idx LIMIT 1) AS passage_reward
                   FROM candidates c
                   WHERE c.cycle_id > (SELECT COALESCE(MAX(id), 0) FROM cycles) - ?
                     AND c.policy != 'passage' AND COALESCE(c.reward, c.reward_logprob) IS NOT NULL
                     AND TRIM(COALESCE(c.text, '')) != ''),
               kept AS (
                   SELECT s.*, s.reward - COALESCE(s.passage_reward, 0.0) AS advantage,
                          ROW_NUMBER() OVER (PARTITION BY s.passage_id, s.policy, s.text
                                             ORDER BY s.reward DESC, s.candidate_id) AS copy
                   FROM scored s
                   WHERE s.reward - COALESCE(s.passage_reward, 0.0) > ?),
               ranked AS (
                   SELECT k.*, ROW_NUMBER() OVER (PARTITION BY k.passage_id
                                                  ORDER BY k.advantage DESC, k.candidate_id) AS rank
                   FROM kept k WHERE k.copy = 1)
               SELECT r.candidate_id, r.cycle_id, r.passage_id, p.title, p.text AS passage_text,
                      r.policy, r.text, r.reward, r.passage_reward, r.advantage
               FROM ranked r JOIN passages p ON p.id = r.passage_id
               WHERE r.rank <= ?
               ORDER BY r.advantage DESC, r.candidate_id LIMIT ?""",
            [window if window > 0 else 1 << 62, margin, per_passage, limit],
        )

    def restem_heldout(self, exclude: Iterable[int], limit: int) -> list[dict]:
        """Passages to measure an editor on, none of ``exclude``: queued (pending)
        passages that have questions first, oldest first; then learned passages that
        have reward questions, newest first. Each row: id, title, text, source
        (pending | learned)."""
        skip = sorted(set(exclude))
        marks = ",".join("?" * len(skip))
        return self._rows(
            f"""SELECT * FROM (
                    SELECT p.id, p.title, p.text, 'pending' AS source, 0 AS tier, p.id AS turn
                    FROM passages p
                    WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.passage_id = p.id AND j.state = 'pending')
                      AND EXISTS (SELECT 1 FROM questions q WHERE q.passage_id = p.id)
                    UNION ALL
                    SELECT p.id, p.title, p.text, 'learned', 1, -p.id
                    FROM passages p
                    WHERE EXISTS (SELECT 1 FROM cycles c WHERE c.passage_id = p.id AND c.outcome = 'committed')
                      AND EXISTS (SELECT 1 FROM questions q WHERE q.passage_id = p.id AND q.role = 'reward'))
                WHERE id NOT IN ({marks or "SELECT NULL WHERE 0"})
                ORDER BY tier, turn LIMIT ?""",
            [*skip, limit],
        )

    def add_drift(self, row: dict, now: float | None = None) -> None:
        with self.db.atomic():
            self.db["drift"].insert({"at": _now(now), **row})

    def drift(self, adapter_id: str | None = None, last: int | None = None) -> list[dict]:
        """Drift rows oldest first: all, the ``last`` N, or those of one adapter."""
        if adapter_id is None:
            if last is not None:
                return self._rows("SELECT * FROM drift ORDER BY id DESC LIMIT ?", [last])[::-1]
            return self._rows("SELECT * FROM drift ORDER BY id")
        return self._rows("SELECT * FROM drift WHERE adapter_id = ? ORDER BY id", [adapter_id])

    def add_memorisation(self, rows: list[dict], now: float | None = None) -> None:
        at = _now(now)
        with self.db.atomic():
            self.db["memorisation"].insert_all({"at": at, **r} for r in rows)

    def memorisation(self, adapter_id: str | None = None) -> list[dict]:
        if adapter_id is None:
            return self._rows("SELECT * FROM memorisation ORDER BY id")
        return self._rows("SELECT * FROM memorisation WHERE adapter_id = ? ORDER BY id", [adapter_id])

    def probe_matrix(self, passages: Iterable[int] | None = None) -> list[dict]:
        """Every probe evaluation (of these ``passages``; None: all) with its adapter's
        version (NULL adapter = base), oldest first: the rows of the forgetting matrix."""
        ids = None if passages is None else sorted(set(passages))
        where = "" if ids is None else f" AND e.passage_id IN ({','.join('?' * len(ids))})"
        return self._rows(
            f"""SELECT e.adapter_id, a.name AS adapter_name, a.version, a.kind AS adapter_kind, e.passage_id, e.accuracy,
                      e.f1, e.logprob, e.n, e.at
               FROM evaluations e LEFT JOIN adapters a ON a.id = e.adapter_id
               WHERE e.kind = 'probe'{where} ORDER BY e.id""", ids or [])

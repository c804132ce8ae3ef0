"""Read-only queries behind `seal tui` and the static views.

Owns the queries only the UI runs: the passage overview, candidates by cycle, the
reward series, memorisation rates, and what is known about one adapter version (its
children, the cycle, sleep or editor round that made it, the events that name it).
Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable


class ViewStore:
    """Read-only Store methods for the UI (mixed into Store)."""

    def passage_overview(self, limit: int = 50, order: str = "recent", state: str | None = None) -> list[dict]:
        """Passages with their job's state and their latest wake cycle: outcome,
        adapter, candidates tried, best and chosen reward (answer log-likelihood gain),
        chosen policy. ``order``: 'recent' (claimed first, then by the latest cycle's
        end, newest first, then queued ones oldest first) or 'id'. ``state`` filters on
        the job state (pending | claimed | done | failed). ``limit`` < 0: all.

        The dashboard's read ('recent', a limit, no state) looks only at the passages
        that can make its first ``limit`` rows: those being learned, those of the
        newest cycles, and the oldest queued or failed; so it costs the same at 10,000
        passages as at 100."""
        if order not in ("recent", "id"):
            raise ValueError(f"unknown order {order!r}")
        by = ("CASE WHEN j.state = 'claimed' THEN 0 WHEN c.finished_at IS NOT NULL THEN 1 ELSE 2 END, "
              "-COALESCE(c.finished_at, 0), p.id") if order == "recent" else "p.id"
        if order == "recent" and limit >= 0 and state is None:
            picked = """SELECT passage_id AS id FROM jobs WHERE state = 'claimed'
                        UNION SELECT passage_id FROM (SELECT passage_id FROM cycles ORDER BY id DESC LIMIT ?)
                        UNION SELECT passage_id FROM (SELECT passage_id FROM jobs WHERE state IN ('pending', 'failed')
                                                      ORDER BY id LIMIT ?)"""
            args = [4 * limit + 8, limit]
        else:
            picked, args = "SELECT id FROM passages", []
        return self._rows(
            f"""WITH picked AS ({picked}),
                    last AS (SELECT passage_id, MAX(id) AS cycle_id FROM cycles
                             WHERE passage_id IN (SELECT id FROM picked) GROUP BY passage_id),
                    job AS (SELECT passage_id, state, attempts, error, MAX(id) AS job_id FROM jobs
                            WHERE passage_id IN (SELECT id FROM picked) GROUP BY passage_id),
                    cand AS (SELECT cycle_id, COUNT(*) AS n, MAX(reward_logprob) AS best,
                                    MAX(CASE WHEN chosen = 1 THEN policy END) AS chosen_policy,
                                    MAX(CASE WHEN chosen = 1 THEN reward_logprob END) AS chosen_reward
                             FROM candidates WHERE cycle_id IN (SELECT cycle_id FROM last) GROUP BY cycle_id),
                    qs AS (SELECT passage_id, COUNT(*) AS n FROM questions
                           WHERE passage_id IN (SELECT id FROM picked) GROUP BY passage_id)
                SELECT p.id, p.title, p.n_tokens, p.created_at, d.source, j.state, j.attempts, j.error,
                       COALESCE(qs.n, 0) AS n_questions,
                       c.id AS cycle_id, c.outcome, c.reason, c.adapter_id, c.finished_at,
                       c.baseline_acc, c.baseline_logprob,
                       (SELECT COUNT(*) FROM cycles cc WHERE cc.passage_id = p.id) AS n_cycles,
                       COALESCE(cand.n, 0) AS n_candidates, cand.best AS best_reward,
                       cand.chosen_policy, cand.chosen_reward
                FROM passages p JOIN documents d ON d.id = p.document_id
                LEFT JOIN job j ON j.passage_id = p.id
                LEFT JOIN last ON last.passage_id = p.id
                LEFT JOIN cycles c ON c.id = last.cycle_id
                LEFT JOIN cand ON cand.cycle_id = c.id
                LEFT JOIN qs ON qs.passage_id = p.id
                WHERE p.id IN (SELECT id FROM picked) AND (? IS NULL OR j.state = ?)
                ORDER BY {by} LIMIT ?""",
            [*args, state, state, limit],
        )

    def cycle_candidates(self, cycle_ids: Iterable[int]) -> list[dict]:
        """Every candidate of the given cycles (texts included), by cycle and index."""
        ids = sorted(set(cycle_ids))
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        return self._rows(f"SELECT * FROM candidates WHERE cycle_id IN ({marks}) ORDER BY cycle_id, idx", ids)

    def reward_series(self, last: int | None = None) -> list[dict]:
        """One row per wake cycle (the ``last`` N; None: all), oldest first: when it
        finished, its outcome and the best, mean and chosen reward (answer
        log-likelihood gain) of its candidates."""
        return self._rows(
            """SELECT c.id, c.passage_id, c.finished_at, c.outcome, c.adapter_id,
                      MAX(k.reward_logprob) AS best, AVG(k.reward_logprob) AS mean,
                      MAX(CASE WHEN k.chosen = 1 THEN k.reward_logprob END) AS chosen,
                      MAX(CASE WHEN k.chosen = 1 THEN k.policy END) AS chosen_policy,
                      COUNT(k.id) AS n
               FROM cycles c LEFT JOIN candidates k ON k.cycle_id = c.id
               WHERE c.id > (SELECT COALESCE(MAX(id), 0) FROM cycles) - ?
               GROUP BY c.id ORDER BY c.id""", [1 << 62 if last is None else last]
        )

    def memorisation_rates(self, last: int | None = None) -> list[dict]:
        """Verbatim memorisation per measured version (the latest measurement of each
        passage under it), in the order the versions were measured: adapter_id,
        version, exact_rate, token_match, n. ``last``: only the versions among the N
        created last (and the base)."""
        scope = ("" if last is None else
                 "WHERE adapter_id IS NULL OR adapter_id IN (SELECT id FROM adapters ORDER BY rowid DESC LIMIT ?)")
        return self._rows(
            f"""WITH latest AS (SELECT MAX(id) AS id FROM memorisation {scope} GROUP BY adapter_id, passage_id)
               SELECT m.adapter_id, a.version, AVG(m.exact) AS exact_rate, AVG(m.token_match) AS token_match,
                      COUNT(*) AS n, MAX(m.id) AS last_id
               FROM memorisation m JOIN latest l ON l.id = m.id LEFT JOIN adapters a ON a.id = m.adapter_id
               GROUP BY m.adapter_id ORDER BY last_id""", [] if last is None else [last]
        )

    def adapter_children(self, adapter_id: str) -> list[str]:
        return [r["id"] for r in self._rows("SELECT id FROM adapters WHERE parent_id = ? ORDER BY id", [adapter_id])]

    def cycle_of_adapter(self, adapter_id: str) -> dict | None:
        """The wake cycle that committed this version (None for sleep or editor versions)."""
        row = self._one("SELECT * FROM cycles WHERE adapter_id = ? ORDER BY id DESC LIMIT 1", [adapter_id])
        if row is not None:
            for key in ("timings", "tokens"):
                row[key] = json.loads(row[key]) if row[key] else None
        return row

    def sleep_of_adapter(self, adapter_id: str) -> dict | None:
        """The sleep report that produced this version (None if no sleep did)."""
        row = self._one("SELECT * FROM sleeps WHERE adapter_id = ? ORDER BY id DESC LIMIT 1", [adapter_id])
        if row is not None:
            for key in ("before", "after", "timings"):
                row[key] = json.loads(row[key]) if row[key] else None
        return row

    def editor_round_of_adapter(self, adapter_id: str) -> dict | None:
        """The ReST-EM round that produced this editor version (None if none did)."""
        row = self._one("SELECT * FROM editor_rounds WHERE adapter_id = ? ORDER BY id DESC LIMIT 1", [adapter_id])
        if row is not None:
            row["detail"] = json.loads(row["detail"]) if row["detail"] else None
        return row

    def adapter_events(self, adapter_id: str, limit: int = 50) -> list[dict]:
        """Events that name this version (commit, activate, rollback, sleep, prune), newest first."""
        return self._rows(
            "SELECT * FROM events WHERE instr(detail, ?) > 0 ORDER BY id DESC LIMIT ?", [json.dumps(adapter_id), limit]
        )

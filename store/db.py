"""The SQLite store: the only place in seal that writes SQL.

One file, WAL mode (readers never block the writer), a busy timeout (writers wait for
each other instead of failing), foreign keys on. Every multi-row change runs inside
``db.atomic()``, so a crash leaves either all of it or none of it. Times are Unix
seconds (float); callers may pass ``now`` so that tests can use an injected clock.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from .migrations import migrations

BUSY_TIMEOUT_S = 30.0
JOB_STATES = ("pending", "claimed", "done", "failed")


@dataclass(frozen=True)
class NewQuestion:
    question: str
    answer: str
    origin: str = "user"


@dataclass(frozen=True)
class NewPassage:
    title: str
    text: str
    sha256: str
    n_tokens: int
    questions: tuple[NewQuestion, ...] = ()


@dataclass(frozen=True)
class NewDocument:
    source: str
    title: str
    kind: str
    sha256: str
    bytes: int
    passages: tuple[NewPassage, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class IngestOutcome:
    source: str
    status: str  # new | duplicate
    document_id: int | None
    passages_added: int
    passages_duplicate: int
    questions_added: int
    duplicate_of: str | None = None  # source of the document it duplicates


@dataclass(frozen=True)
class Job:
    id: int
    passage_id: int
    kind: str
    state: str
    attempts: int
    claimed_by: str | None
    heartbeat_at: float | None


def _now(now: float | None) -> float:
    return time.time() if now is None else now


class _Database(Database):
    """sqlite-utils' Database whose outermost ``atomic()`` starts with BEGIN IMMEDIATE.

    With a plain (deferred) BEGIN, a transaction that reads before it writes fails at
    once with "database is locked" (SQLITE_BUSY_SNAPSHOT in WAL mode; the busy timeout
    does not apply) if another connection committed in between: the daemon's heartbeat
    thread, or `seal ingest` while the daemon learns. IMMEDIATE takes the write lock
    first, waiting up to the busy timeout; readers are never blocked in WAL mode."""

    @contextlib.contextmanager
    def atomic(self):
        if self.conn.in_transaction:  # nested: sqlite-utils' savepoints
            with super().atomic():
                yield self
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                self.rollback()
                raise


class Store:
    """The seal store at ``path`` (created and migrated on open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S)
        self.db = _Database(conn)
        self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.enable_wal()
        migrations.apply(self.db)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading helpers
    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict]:
        cur = self.db.execute(sql, list(params))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def _one(self, sql: str, params: Iterable[Any] = ()) -> dict | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def counts(self) -> dict[str, int]:
        """Row counts of every table: cheap, and what tests compare before and after."""
        return {t: self.db[t].count for t in self.db.table_names() if not t.startswith("_")}

    # ------------------------------------------------------------------------- ingest
    def ingest(self, documents: list[NewDocument], now: float | None = None) -> list[IngestOutcome]:
        """Store documents, their passages and questions, and queue one learn job per
        new passage: all in one transaction. Documents (or passages) whose content was
        ingested before are reported as duplicates and queue nothing."""
        at = _now(now)
        outcomes: list[IngestOutcome] = []
        with self.db.atomic():
            for doc in documents:
                prior = self._one("SELECT id, source FROM documents WHERE sha256 = ?", [doc.sha256])
                if prior:
                    outcomes.append(
                        IngestOutcome(doc.source, "duplicate", prior["id"], 0, len(doc.passages), 0, prior["source"])
                    )
                    continue
                fresh = [p for p in doc.passages if not self._one("SELECT id FROM passages WHERE sha256 = ?", [p.sha256])]
                if not fresh:  # every passage was learned from another document already
                    outcomes.append(IngestOutcome(doc.source, "duplicate", None, 0, len(doc.passages), 0, None))
                    continue
                doc_id = self.db["documents"].insert(
                    {
                        "sha256": doc.sha256,
                        "source": doc.source,
                        "title": doc.title,
                        "kind": doc.kind,
                        "bytes": doc.bytes,
                        "n_passages": 0,
                        "ingested_at": at,
                    }
                ).last_pk
                added = dup = n_q = 0
                for seq, p in enumerate(doc.passages):
                    if self._one("SELECT id FROM passages WHERE sha256 = ?", [p.sha256]):
                        dup += 1
                        continue
                    pid = self.db["passages"].insert(
                        {
                            "document_id": doc_id,
                            "seq": seq,
                            "title": p.title,
                            "text": p.text,
                            "sha256": p.sha256,
                            "n_tokens": p.n_tokens,
                            "created_at": at,
                        }
                    ).last_pk
                    self.db["questions"].insert_all(
                        {
                            "passage_id": pid,
                            "question": q.question,
                            "answer": q.answer,
                            "origin": q.origin,
                            "role": None,
                            "created_at": at,
                        }
                        for q in p.questions
                    )
                    n_q += len(p.questions)
                    self.db["jobs"].insert(
                        {
                            "passage_id": pid,
                            "kind": "learn",
                            "state": "pending",
                            "attempts": 0,
                            "created_at": at,
                            "updated_at": at,
                        }
                    )
                    added += 1
                self.db["documents"].update(doc_id, {"n_passages": added})
                outcomes.append(IngestOutcome(doc.source, "new", doc_id, added, dup, n_q))
            new = [o for o in outcomes if o.status == "new"]
            if new:
                self._event(
                    "ingest",
                    {"documents": len(new), "passages": sum(o.passages_added for o in new)},
                    at,
                )
        return outcomes

    # ---------------------------------------------------------------------- passages
    def passage(self, passage_id: int) -> dict | None:
        return self._one("SELECT * FROM passages WHERE id = ?", [passage_id])

    def passages(self, limit: int | None = None) -> list[dict]:
        sql = "SELECT * FROM passages ORDER BY id"
        return self._rows(sql + (f" LIMIT {int(limit)}" if limit else ""))

    def documents(self) -> list[dict]:
        return self._rows("SELECT * FROM documents ORDER BY id")

    def questions(self, passage_id: int, role: str | None = None) -> list[dict]:
        if role is None:
            return self._rows("SELECT * FROM questions WHERE passage_id = ? ORDER BY id", [passage_id])
        return self._rows(
            "SELECT * FROM questions WHERE passage_id = ? AND role = ? ORDER BY id", [passage_id, role]
        )

    def add_questions(self, passage_id: int, questions: list[NewQuestion], now: float | None = None) -> None:
        at = _now(now)
        with self.db.atomic():
            self.db["questions"].insert_all(
                {
                    "passage_id": passage_id,
                    "question": q.question,
                    "answer": q.answer,
                    "origin": q.origin,
                    "role": None,
                    "created_at": at,
                }
                for q in questions
            )

    def set_question_roles(self, roles: dict[int, str]) -> None:
        with self.db.atomic():
            for qid, role in roles.items():
                self.db.execute("UPDATE questions SET role = ? WHERE id = ?", [role, qid])

    # --------------------------------------------------------------------------- jobs
    def claim_next(self, worker: str, now: float | None = None) -> Job | None:
        """Claim the oldest pending job atomically (one UPDATE ... RETURNING)."""
        at = _now(now)
        with self.db.atomic():
            row = self._one(
                """UPDATE jobs SET state = 'claimed', claimed_by = ?, heartbeat_at = ?,
                       attempts = attempts + 1, updated_at = ?
                   WHERE id = (SELECT id FROM jobs WHERE state = 'pending' ORDER BY id LIMIT 1)
                   RETURNING id, passage_id, kind, state, attempts, claimed_by, heartbeat_at""",
                [worker, at, at],
            )
        return Job(**row) if row else None

    def heartbeat(self, job_id: int, now: float | None = None) -> None:
        at = _now(now)
        with self.db.atomic():
            self.db.execute(
                "UPDATE jobs SET heartbeat_at = ?, updated_at = ? WHERE id = ? AND state = 'claimed'",
                [at, at, job_id],
            )

    def finish_job(self, job_id: int, now: float | None = None) -> None:
        at = _now(now)
        with self.db.atomic():
            self.db.execute(
                "UPDATE jobs SET state = 'done', error = NULL, updated_at = ? WHERE id = ?", [at, job_id]
            )

    def fail_job(self, job_id: int, error: str, max_attempts: int, now: float | None = None) -> str:
        """Record a failure; the job goes back to pending until it has used up its
        attempts. Returns the new state."""
        at = _now(now)
        with self.db.atomic():
            job = self._one("SELECT attempts FROM jobs WHERE id = ?", [job_id])
            state = "failed" if job and job["attempts"] >= max_attempts else "pending"
            self.db.execute(
                "UPDATE jobs SET state = ?, error = ?, claimed_by = NULL, updated_at = ? WHERE id = ?",
                [state, error, at, job_id],
            )
        return state

    def requeue_stale(self, older_than_s: float, now: float | None = None) -> int:
        """Claimed jobs whose heartbeat is older than ``older_than_s`` go back to
        pending: their worker died (crash, kill -9). Returns how many."""
        at = _now(now)
        with self.db.atomic():
            cur = self.db.execute(
                """UPDATE jobs SET state = 'pending', claimed_by = NULL, updated_at = ?
                   WHERE state = 'claimed' AND (heartbeat_at IS NULL OR heartbeat_at < ?)""",
                [at, at - older_than_s],
            )
            n = cur.rowcount
            if n:
                self._event("requeue", {"jobs": n}, at)
        return n

    def requeue_claimed_by(self, worker: str, now: float | None = None) -> int:
        """Give back the jobs one worker holds (a warm stop)."""
        at = _now(now)
        with self.db.atomic():
            cur = self.db.execute(
                "UPDATE jobs SET state = 'pending', claimed_by = NULL, updated_at = ? "
                "WHERE state = 'claimed' AND claimed_by = ?",
                [at, worker],
            )
        return cur.rowcount

    def release_claim(self, worker: str, job_id: int | None = None, now: float | None = None) -> int:
        """Give back a claim (or every claim of ``worker``) WITHOUT counting the
        attempt: the work was abandoned by a stop request, not failed. Returns how many."""
        at = _now(now)
        sql = ("UPDATE jobs SET state = 'pending', claimed_by = NULL, attempts = MAX(attempts - 1, 0), "
               "updated_at = ? WHERE state = 'claimed' AND claimed_by = ?")
        args: list[Any] = [at, worker]
        if job_id is not None:
            sql, args = sql + " AND id = ?", [*args, job_id]
        with self.db.atomic():
            n = self.db.execute(sql, args).rowcount
            if n:
                self._event("release", {"jobs": n, "worker": worker}, at)
        return n

    def jobs(self, states: Iterable[str] = JOB_STATES, limit: int = 200) -> list[dict]:
        states = list(states)
        marks = ",".join("?" * len(states))
        return self._rows(
            f"""SELECT j.id, j.passage_id, j.kind, j.state, j.attempts, j.claimed_by,
                       j.heartbeat_at, j.error, j.created_at, j.updated_at,
                       p.title, p.n_tokens, d.source
                FROM jobs j JOIN passages p ON p.id = j.passage_id
                JOIN documents d ON d.id = p.document_id
                WHERE j.state IN ({marks}) ORDER BY j.id LIMIT ?""",
            [*states, limit],
        )

    def queue_summary(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATES, 0)
        for r in self._rows("SELECT state, count(*) AS n FROM jobs GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts

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
        rows = self._rows(
            "SELECT DISTINCT passage_id FROM cycles WHERE outcome = 'committed' ORDER BY passage_id"
        )
        return [r["passage_id"] for r in rows]

    def evaluations(self, adapter_id: str | None = None, passage_id: int | None = None) -> list[dict]:
        sql, args = "SELECT * FROM evaluations WHERE 1 = 1", []
        if adapter_id is not None:
            sql, args = sql + " AND adapter_id = ?", [*args, adapter_id]
        if passage_id is not None:
            sql, args = sql + " AND passage_id = ?", [*args, passage_id]
        return self._rows(sql + " ORDER BY id", args)

    def holds_claim(self, job_id: int, worker: str) -> bool:
        row = self._one("SELECT state, claimed_by FROM jobs WHERE id = ?", [job_id])
        return bool(row) and row["state"] == "claimed" and row["claimed_by"] == worker

    def claimed_jobs(self) -> list[dict]:
        return self._rows("SELECT id, claimed_by, heartbeat_at FROM jobs WHERE state = 'claimed'")

    # ----------------------------------------------------------------- events, state
    def _event(self, kind: str, detail: dict, at: float) -> None:
        self.db["events"].insert({"at": at, "kind": kind, "detail": json.dumps(detail)})

    def log_event(self, kind: str, detail: dict, now: float | None = None) -> None:
        with self.db.atomic():
            self._event(kind, detail, _now(now))

    def events(self, limit: int = 50, kind: str | None = None) -> list[dict]:
        if kind:
            return self._rows("SELECT * FROM events WHERE kind = ? ORDER BY id DESC LIMIT ?", [kind, limit])
        return self._rows("SELECT * FROM events ORDER BY id DESC LIMIT ?", [limit])

    def get_state(self, key: str, default: str | None = None) -> str | None:
        row = self._one("SELECT value FROM state WHERE key = ?", [key])
        return row["value"] if row else default

    def set_state(self, key: str, value: str) -> None:
        with self.db.atomic():
            self.db["state"].upsert({"key": key, "value": value}, pk="key")

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

    def adapters(self, name: str | None = None) -> list[dict]:
        if name is None:
            rows = self._rows("SELECT * FROM adapters ORDER BY name, version")
        else:
            rows = self._rows("SELECT * FROM adapters WHERE name = ? ORDER BY version", [name])
        return [self._adapter_row(r) for r in rows]

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

    def adapter_history(self, name: str = "knowledge") -> list[dict]:
        """Adapter versions newest first, with their passage title, probe accuracy at
        commit time and whether each is the active one (for `seal history`)."""
        active = self.get_state(f"active.{name}")
        rows = self._rows(
            """SELECT a.id, a.parent_id, a.kind, a.passage_id, a.policy, a.reward, a.status,
                      a.created_at, a.sha256, p.title,
                      (SELECT e.accuracy FROM evaluations e WHERE e.adapter_id = a.id
                         AND e.passage_id = a.passage_id AND e.kind = 'probe' ORDER BY e.id LIMIT 1) AS probe_acc
               FROM adapters a LEFT JOIN passages p ON p.id = a.passage_id
               WHERE a.name = ? ORDER BY a.version DESC""",
            [name],
        )
        for r in rows:
            r["active"] = r["id"] == active
        return rows

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

    def last_sleep_at(self) -> float | None:
        """When the last sleep (of any outcome but 'failed') started; None if never."""
        row = self._one("SELECT MAX(started_at) AS t FROM sleeps WHERE outcome != 'failed'")
        return row["t"] if row else None

    def commits_since(self, at: float | None, name: str = "knowledge") -> int:
        """Wake commits of ``name`` after time ``at`` (all of them if None)."""
        row = self._one(
            "SELECT count(*) AS n FROM adapters WHERE name = ? AND kind = 'wake' AND created_at > ?",
            [name, -1.0 if at is None else at],
        )
        return int(row["n"]) if row else 0

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

    def restem_pairs(self, margin: float, limit: int, per_passage: int) -> list[dict]:
        """(passage -> self-edit) pairs for ReST-EM: candidates whose reward_logprob beats
        the passage-only trial of the same cycle by more than ``margin`` (the no-update
        baseline, i.e. 0, when the cycle has no scored passage-only trial). Identical
        texts count once; at most ``per_passage`` per passage; best advantage first.
        Each row: candidate_id, cycle_id, passage_id, title, passage_text, policy,
        text, reward, passage_reward (NULL: none), advantage."""
        return self._rows(
            """WITH scored AS (
                   SELECT c.id AS candidate_id, c.cycle_id, c.passage_id, c.policy, c.text,
                          c.reward_logprob AS reward,
                          (SELECT po.reward_logprob FROM candidates po
                             WHERE po.cycle_id = c.cycle_id AND po.policy = 'passage'
                               AND po.reward_logprob IS NOT NULL
                             ORDER BY po.idx LIMIT 1) AS passage_reward
                   FROM candidates c
                   WHERE c.policy != 'passage' AND c.reward_logprob IS NOT NULL
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
            [margin, per_passage, limit],
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

    def drift(self, adapter_id: str | None = None) -> list[dict]:
        if adapter_id is None:
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

    def add_evaluations(self, rows: list[dict], now: float | None = None) -> None:
        """Evaluation rows measured outside a wake cycle (a sleep re-measures every
        learned passage). Runs inside the caller's transaction when there is one."""
        at = _now(now)
        with self.db.atomic():
            self.db["evaluations"].insert_all({"at": at, **r} for r in rows)

    def probe_matrix(self) -> list[dict]:
        """Every probe evaluation with its adapter's version (NULL adapter = base),
        oldest first: the rows of the forgetting matrix."""
        return self._rows(
            """SELECT e.adapter_id, a.version, a.kind AS adapter_kind, e.passage_id, e.accuracy,
                      e.f1, e.logprob, e.n, e.at
               FROM evaluations e LEFT JOIN adapters a ON a.id = e.adapter_id
               WHERE e.kind = 'probe' ORDER BY e.id"""
        )

    # ------------------------------------------------------------- inspection (the UI)
    # Read queries behind `seal tui` and the static views (history, show, passages,
    # candidates), and the two acts on history: rollback and prune. The UI only reads;
    # the acts record an event in the same transaction as their change.
    @contextlib.contextmanager
    def reading(self):
        """One consistent view across several queries: a read transaction (in WAL mode
        it never blocks the writer, and the writer never blocks it)."""
        if self.db.conn.in_transaction:
            yield self
            return
        self.db.execute("BEGIN")
        try:
            yield self
        finally:
            self.db.execute("COMMIT")

    def lineage(self, name: str | None = None) -> list[dict]:
        """Adapter versions oldest first (all names, or one), each with its passage's
        title and the probe accuracy measured on that passage at commit time."""
        rows = self._rows(
            """SELECT a.*, p.title,
                      (SELECT e.accuracy FROM evaluations e WHERE e.adapter_id = a.id
                         AND e.passage_id = a.passage_id AND e.kind = 'probe' ORDER BY e.id LIMIT 1) AS probe_acc
               FROM adapters a LEFT JOIN passages p ON p.id = a.passage_id
               WHERE ? IS NULL OR a.name = ? ORDER BY a.name, a.version""",
            [name, name],
        )
        return [self._adapter_row(r) for r in rows]

    def active_adapters(self) -> dict[str, str]:
        """Adapter name -> its active version id."""
        rows = self._rows("SELECT key, value FROM state WHERE key LIKE 'active.%'")
        return {r["key"].split(".", 1)[1]: r["value"] for r in rows}

    def passage_overview(self, limit: int = 50, order: str = "recent", state: str | None = None) -> list[dict]:
        """Passages with their job's state and their latest wake cycle: outcome,
        adapter, candidates tried, best and chosen reward (answer log-likelihood gain),
        chosen policy. ``order``: 'recent' (claimed first, then by the latest cycle's
        end, newest first, then queued ones oldest first) or 'id'. ``state`` filters on
        the job state (pending | claimed | done | failed). ``limit`` < 0: all."""
        if order not in ("recent", "id"):
            raise ValueError(f"unknown order {order!r}")
        by = ("CASE WHEN j.state = 'claimed' THEN 0 WHEN c.finished_at IS NOT NULL THEN 1 ELSE 2 END, "
              "-COALESCE(c.finished_at, 0), p.id") if order == "recent" else "p.id"
        return self._rows(
            f"""WITH last AS (SELECT passage_id, MAX(id) AS cycle_id FROM cycles GROUP BY passage_id),
                    job AS (SELECT passage_id, state, attempts, error, MAX(id) AS job_id FROM jobs GROUP BY passage_id),
                    cand AS (SELECT cycle_id, COUNT(*) AS n, MAX(reward_logprob) AS best,
                                    MAX(CASE WHEN chosen = 1 THEN policy END) AS chosen_policy,
                                    MAX(CASE WHEN chosen = 1 THEN reward_logprob END) AS chosen_reward
                             FROM candidates GROUP BY cycle_id),
                    qs AS (SELECT passage_id, COUNT(*) AS n FROM questions GROUP BY passage_id)
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
                WHERE ? IS NULL OR j.state = ?
                ORDER BY {by} LIMIT ?""",
            [state, state, limit],
        )

    def cycle_candidates(self, cycle_ids: Iterable[int]) -> list[dict]:
        """Every candidate of the given cycles (texts included), by cycle and index."""
        ids = sorted(set(cycle_ids))
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        return self._rows(f"SELECT * FROM candidates WHERE cycle_id IN ({marks}) ORDER BY cycle_id, idx", ids)

    def reward_series(self) -> list[dict]:
        """One row per wake cycle, oldest first: when it finished, its outcome and the
        best, mean and chosen reward (answer log-likelihood gain) of its candidates."""
        return self._rows(
            """SELECT c.id, c.passage_id, c.finished_at, c.outcome, c.adapter_id,
                      MAX(k.reward_logprob) AS best, AVG(k.reward_logprob) AS mean,
                      MAX(CASE WHEN k.chosen = 1 THEN k.reward_logprob END) AS chosen,
                      MAX(CASE WHEN k.chosen = 1 THEN k.policy END) AS chosen_policy,
                      COUNT(k.id) AS n
               FROM cycles c LEFT JOIN candidates k ON k.cycle_id = c.id
               GROUP BY c.id ORDER BY c.id"""
        )

    def memorisation_rates(self) -> list[dict]:
        """Verbatim memorisation per measured version (the latest measurement of each
        passage under it), in the order the versions were measured: adapter_id,
        version, exact_rate, token_match, n."""
        return self._rows(
            """WITH latest AS (SELECT MAX(id) AS id FROM memorisation GROUP BY adapter_id, passage_id)
               SELECT m.adapter_id, a.version, AVG(m.exact) AS exact_rate, AVG(m.token_match) AS token_match,
                      COUNT(*) AS n, MAX(m.id) AS last_id
               FROM memorisation m JOIN latest l ON l.id = m.id LEFT JOIN adapters a ON a.id = m.adapter_id
               GROUP BY m.adapter_id ORDER BY last_id"""
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

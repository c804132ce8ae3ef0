"""Documents, passages, questions and the job queue.

Owns ingest (a document, its passages and questions, and one learn job per new
passage, in one transaction), the question roles, and the queue of learn jobs:
claim, heartbeat, finish, fail, requeue and release, and what the queue holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .clock import _now

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
    questions_dropped: int = 0  # questions of passages learned before (from another document): not added


@dataclass(frozen=True)
class Job:
    id: int
    passage_id: int
    kind: str
    state: str
    attempts: int
    claimed_by: str | None
    heartbeat_at: float | None


class QueueStore:
    """Store methods for documents, passages, questions and jobs (mixed into Store)."""

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
                added = dup = n_q = dropped = 0
                here: dict[str, tuple[int, set]] = {}  # passages of this document: sha256 -> (id, its questions)
                for seq, p in enumerate(doc.passages):
                    if p.sha256 in here:  # the same passage again in this document: its new questions join it
                        pid, known = here[p.sha256]
                        more = [q for q in p.questions if (q.question, q.answer) not in known]
                        known.update((q.question, q.answer) for q in more)
                        self._insert_questions(pid, more, at)
                        n_q += len(more)
                        dup += 1
                        continue
                    if self._one("SELECT id FROM passages WHERE sha256 = ?", [p.sha256]):
                        dup += 1
                        dropped += len(p.questions)
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
                    self._insert_questions(pid, p.questions, at)
                    n_q += len(p.questions)
                    here[p.sha256] = (pid, {(q.question, q.answer) for q in p.questions})
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
                outcomes.append(IngestOutcome(doc.source, "new", doc_id, added, dup, n_q, questions_dropped=dropped))
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

    def passage_titles(self, passage_ids: list[int]) -> dict[int, str]:
        """id -> title of the given passages, in batches (one query per 500 ids)."""
        out: dict[int, str] = {}
        ids = list(dict.fromkeys(passage_ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            out.update((r["id"], r["title"]) for r in self._rows(f"SELECT id, title FROM passages WHERE id IN ({marks})", chunk))
        return out

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
            self._insert_questions(passage_id, questions, at)

    def _insert_questions(self, passage_id: int, questions: list[NewQuestion], at: float) -> None:
        self.db["questions"].insert_all(
            {"passage_id": passage_id, "question": q.question, "answer": q.answer, "origin": q.origin,
             "role": None, "created_at": at}
            for q in questions
        )

    def set_question_roles(self, roles: dict[int, str]) -> None:
        with self.db.atomic():
            for qid, role in roles.items():
                self.db.execute("UPDATE questions SET role = ? WHERE id = ?", [role, qid])

    # --------------------------------------------------------------------------- jobs
    def claim_next(self, worker: str, now: float | None = None, max_attempts: int | None = None) -> Job | None:
        """Claim the oldest pending job atomically (one UPDATE ... RETURNING); a job
        that was deferred waits behind those that never were (the fewest deferrals
        first). With
        ``max_attempts``, a pending job that has used up its attempts (its worker died
        on it each time: a poison passage) is marked failed first, with the reason, so
        that it cannot block the queue."""
        at = _now(now)
        with self.db.atomic():
            if max_attempts is not None:
                cur = self.db.execute(
                    """UPDATE jobs SET state = 'failed', claimed_by = NULL, updated_at = ?,
                           error = 'gave up after ' || attempts || ' attempts: '
                                   || COALESCE(error, 'the worker died while learning it')
                       WHERE state = 'pending' AND attempts >= ?""",
                    [at, max_attempts],
                )
                if cur.rowcount:
                    self._event("poison", {"jobs": cur.rowcount}, at)
            row = self._one(
                """UPDATE jobs SET state = 'claimed', claimed_by = ?, heartbeat_at = ?,
                       attempts = attempts + 1, updated_at = ?
                   WHERE id = (SELECT id FROM jobs WHERE state = 'pending' ORDER BY deferrals, id LIMIT 1)
                   RETURNING id, passage_id, kind, state, attempts, claimed_by, heartbeat_at""",
                [worker, at, at],
            )
        return Job(**row) if row else None

    def defer_job(self, job_id: int, error: str, now: float | None = None, max_deferrals: int | None = None) -> str:
        """A temporary fault (disk full, out of memory, a locked database) interrupted
        the job: it goes back to pending WITHOUT counting the attempt (the passage is
        not to blame), behind the jobs never deferred; the error is kept for ``seal
        queue``. Deferred ``max_deferrals`` times, it is marked failed instead (a fault
        that never goes away is the passage's: `seal queue --retry` brings it back).
        Returns the job's state."""
        at = _now(now)
        with self.db.atomic():
            row = self._one(
                """UPDATE jobs SET state = 'pending', claimed_by = NULL, attempts = MAX(attempts - 1, 0),
                       deferrals = deferrals + 1, error = ?, updated_at = ? WHERE id = ? AND state = 'claimed'
                   RETURNING deferrals""",
                [f"deferred (temporary): {error}", at, job_id],
            )
            state = "pending"
            if row and max_deferrals is not None and max_deferrals > 0 and row["deferrals"] >= max_deferrals:
                self.db.execute("UPDATE jobs SET state = 'failed', error = ? WHERE id = ?",
                                [f"gave up after {row['deferrals']} deferrals: {error}", job_id])
                state = "failed"
            self._event("defer", {"job": job_id, "error": error, "state": state}, at)
        return state

    def retry_jobs(self, job_ids: Iterable[int] | None = None, now: float | None = None) -> int:
        """Failed jobs (all, or those of ``job_ids``) back to pending with fresh
        attempts. Returns how many."""
        at = _now(now)
        sql = "UPDATE jobs SET state = 'pending', attempts = 0, deferrals = 0, error = NULL, claimed_by = NULL, " \
              "updated_at = ? " \
              "WHERE state = 'failed'"
        args: list[Any] = [at]
        if job_ids is not None:
            ids = list(job_ids)
            sql += f" AND id IN ({','.join('?' * len(ids)) or 'NULL'})"
            args += ids
        with self.db.atomic():
            n = self.db.execute(sql, args).rowcount
            if n:
                self._event("retry", {"jobs": n}, at)
        return n

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
                """UPDATE jobs SET state = 'pending', claimed_by = NULL, updated_at = ?,
                       error = 'its worker stopped answering (heartbeat stale) while learning it'
                   WHERE state = 'claimed' AND (heartbeat_at IS NULL OR heartbeat_at < ?)""",
                [at, at - older_than_s],
            )
            n = cur.rowcount
            if n:
                self._event("requeue", {"jobs": n}, at)
        return n

    def requeue_claimed_by(self, worker: str, now: float | None = None, reason: str | None = None) -> int:
        """Give back the jobs one worker holds (a Ctrl-C, or recovery after the worker
        died: then ``reason`` is kept as the job's error, for a poison passage's record)."""
        at = _now(now)
        with self.db.atomic():
            cur = self.db.execute(
                "UPDATE jobs SET state = 'pending', claimed_by = NULL, updated_at = ?, error = COALESCE(?, error) "
                "WHERE state = 'claimed' AND claimed_by = ?",
                [at, reason, worker],
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
            f"""SELECT j.id, j.passage_id, j.kind, j.state, j.attempts, j.deferrals, j.claimed_by,
                       j.heartbeat_at, j.error, j.created_at, j.updated_at,
                       p.title, p.n_tokens, d.source
                FROM jobs j JOIN passages p ON p.id = j.passage_id
                JOIN documents d ON d.id = p.document_id
                WHERE j.state IN ({marks}) ORDER BY j.id LIMIT ?""",
            [*states, limit],
        )

    def queue_summary(self) -> dict[str, int]:
        """Jobs by state, from the counters the triggers keep (migration 0009)."""
        counts = dict.fromkeys(JOB_STATES, 0)
        for r in self._rows("SELECT state, n FROM job_counts"):
            counts[r["state"]] = r["n"]
        return counts

    def holds_claim(self, job_id: int, worker: str) -> bool:
        row = self._one("SELECT state, claimed_by FROM jobs WHERE id = ?", [job_id])
        return bool(row) and row["state"] == "claimed" and row["claimed_by"] == worker

    def claimed_jobs(self) -> list[dict]:
        return self._rows("SELECT id, claimed_by, heartbeat_at FROM jobs WHERE state = 'claimed'")

"""The SQLite store: the only place in seal that writes SQL.

This module owns the connection and what every concern shares: ``_Database`` with its
``atomic()`` transactions, opening (WAL mode, so readers never block the writer; a
busy timeout, so writers wait for each other instead of failing; foreign keys on; the
migrations), the row helpers, read transactions, events and key/value state. ``Store``
combines it with the concerns, each a class of methods only: ``queue`` (documents,
passages, questions, jobs), ``learning`` (cycles, evaluations, adapters), ``sleep``
(sleeps, editor rounds, tracking) and ``views`` (the UI's read-only queries).

Every multi-row change runs inside ``db.atomic()``, so a crash leaves either all of it
or none of it; a nested ``atomic()`` joins the outer transaction. ``Store(":memory:")``
is a private in-memory store (no file, no WAL), migrated like a file store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from .clock import _now
from .learning import LearningStore
from .migrations import migrations
from .queue import JOB_STATES, IngestOutcome, Job, NewDocument, NewPassage, NewQuestion, QueueStore
from .sleep import SleepStore
from .views import ViewStore

__all__ = [
    "BUSY_TIMEOUT_S",
    "JOB_STATES",
    "IngestOutcome",
    "Job",
    "NewDocument",
    "NewPassage",
    "NewQuestion",
    "Store",
]

BUSY_TIMEOUT_S = 30.0
MEMORY = ":memory:"


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


@contextlib.contextmanager
def _first_open_lock(path: Path):
    """Several processes opening a brand-new store at once would each create its
    tables ("table already exists") or switch it to WAL ("database is locked"): the
    setup and the migrations run one process at a time, under an exclusive ``flock`` on
    ``<store>.lock`` (held for the instant an open takes; the kernel drops it with its
    process)."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Store(QueueStore, LearningStore, SleepStore, ViewStore):
    """The seal store at ``path`` (created and migrated on open); ``":memory:"`` for
    one that lives only as long as this object."""

    def __init__(self, path: str | Path):
        self.path = None if str(path) == MEMORY else Path(path)  # None: in memory
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path or MEMORY), timeout=BUSY_TIMEOUT_S)
        self.db = _Database(conn)
        self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.db.execute("PRAGMA foreign_keys = ON")
        if self.path is None:
            migrations.apply(self.db)
            return
        with _first_open_lock(self.path):  # WAL needs a file; memory has its own journal
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

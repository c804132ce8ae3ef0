"""The store itself: an in-memory store works like a file store, multi-row writes are
one transaction (nested ones join the outer), and a file store is WAL, waits on a
busy timeout, and keeps its data and its migrations across reopening."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from store import IngestOutcome, Job, NewDocument, NewPassage, NewQuestion, Store
from store.db import BUSY_TIMEOUT_S, JOB_STATES
from store.migrations import migrations


def _document(name: str, n_passages: int = 2) -> NewDocument:
    passages = tuple(
        NewPassage(
            title=f"{name} {i}",
            text=f"{name} fact number {i}.",
            sha256=f"{name}-p{i}",
            n_tokens=5,
            questions=(NewQuestion(f"What is {name} fact {i}?", f"number {i}"),),
        )
        for i in range(n_passages)
    )
    return NewDocument(source=f"{name}.md", title=name, kind="md", sha256=f"{name}-doc", bytes=100,
                       passages=passages)


def _adapter(version: int, passage_id: int | None = None) -> dict:
    return {"id": f"knowledge-{version:04d}", "name": "knowledge", "version": version, "kind": "wake",
            "passage_id": passage_id, "path": f"knowledge-{version:04d}", "sha256": "ab" * 32,
            "policy": "implications", "reward": 0.5, "metrics": {"probe_acc": 0.75}}


def _applied(store: Store) -> list[tuple[str, str]]:
    return [(m.name, m.applied_at) for m in migrations.applied(store.db)]


@pytest.fixture
def mem():
    with Store(":memory:") as store:
        yield store


def test_a_memory_store_is_migrated_and_leaves_no_file(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Store(":memory:") as store:
        assert store.path is None
        assert [name for name, _ in _applied(store)] == ["0001_ingest", "0002_learning", "0003_sleep",
                                                       "0004_transfer_sets", "0005_scale_indexes",
                                                       "0006_window_indexes", "0007_job_deferrals",
                                                       "0008_heartbeat_indexes", "0009_counters"]
        assert migrations.pending(store.db) == []
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "memory"
        assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert set(store.counts()) >= {"documents", "passages", "jobs", "cycles", "adapters", "sleeps"}
        store.set_state("k", "v")
    assert list(tmp_path.iterdir()) == []
    with Store(":memory:") as other:  # each memory store is its own database
        assert other.get_state("k") is None


def test_a_memory_store_round_trips_ingest_claim_cycle_and_adapter(mem: Store):
    outcomes = mem.ingest([_document("alpha")], now=10.0)
    assert outcomes == [IngestOutcome("alpha.md", "new", 1, 2, 0, 2)]
    assert mem.ingest([_document("alpha")], now=11.0)[0].status == "duplicate"
    assert [p["title"] for p in mem.passages()] == ["alpha 0", "alpha 1"]
    assert mem.questions(1)[0]["answer"] == "number 0"
    assert mem.queue_summary() == dict.fromkeys(JOB_STATES, 0) | {"pending": 2}

    job = mem.claim_next("w1", now=12.0)
    assert job == Job(id=1, passage_id=1, kind="learn", state="claimed", attempts=1, claimed_by="w1",
                      heartbeat_at=12.0)
    assert mem.holds_claim(job.id, "w1") and not mem.holds_claim(job.id, "w2")

    def commit() -> None:
        mem.record_cycle(
            {"passage_id": 1, "job_id": job.id, "started_at": 12.0, "outcome": "committed",
             "adapter_id": "knowledge-0001"},
            [{"policy": "implications", "idx": 0, "text": "alpha implies beta", "reward_logprob": 0.5, "chosen": 1}],
            [{"adapter_id": "knowledge-0001", "passage_id": 1, "kind": "probe", "accuracy": 0.75, "n": 4}],
            job_id=job.id,
            now=13.0,
        )

    mem.add_adapter(_adapter(1, passage_id=1), activate=True, also=commit, now=13.0)

    assert mem.queue_summary()["done"] == 1 and mem.queue_summary()["pending"] == 1
    (cycle,) = mem.cycles(passage_id=1)
    assert cycle["outcome"] == "committed" and cycle["finished_at"] == 13.0
    assert [c["text"] for c in mem.candidates(1)] == ["alpha implies beta"]
    assert mem.learned_passages() == [1]
    assert mem.adapter("knowledge-0001")["metrics"] == {"probe_acc": 0.75}
    assert mem.active_adapter_id("knowledge") == "knowledge-0001"
    assert mem.next_version("knowledge") == 2
    (line,) = mem.lineage("knowledge")
    assert line["title"] == "alpha 0" and line["probe_acc"] == 0.75
    assert [e["kind"] for e in mem.events()] == ["commit", "ingest"]


def test_a_failing_multi_row_write_leaves_nothing(mem: Store):
    before = mem.counts()
    broken = NewDocument(source="bad.md", title="bad", kind="md", sha256="bad-doc", bytes=1,
                         passages=(NewPassage("bad", None, "bad-p0", 1),))  # text is NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        mem.ingest([_document("alpha"), broken])  # alpha's rows were already inserted
    assert mem.counts() == before

    def fail() -> None:
        mem.log_event("inside", {})
        raise RuntimeError("the files did not check out")

    with pytest.raises(RuntimeError):
        mem.add_adapter(_adapter(1), activate=True, also=fail)
    assert mem.counts() == before
    assert mem.active_adapter_id("knowledge") is None


def test_nested_atomic_joins_the_outer_transaction(tmp_path: Path):
    with Store(tmp_path / "store.db") as store:
        with pytest.raises(RuntimeError):
            with store.db.atomic():
                store.set_state("a", "1")
                store.ingest([_document("alpha")])  # its own atomic(): nested, so no commit
                assert store.get_state("a") == "1" and len(store.passages()) == 2
                raise RuntimeError("abandon")
        assert store.get_state("a") is None and store.passages() == [] and store.events() == []

        other = sqlite3.connect(tmp_path / "store.db")
        try:
            with store.db.atomic():
                store.log_event("nested", {})
                assert store.db.conn.in_transaction  # the inner exit did not commit
                assert other.execute("SELECT count(*) FROM events").fetchone()[0] == 0
            assert other.execute("SELECT count(*) FROM events").fetchone()[0] == 1
        finally:
            other.close()


def test_a_file_store_is_wal_with_a_busy_timeout(tmp_path: Path):
    path = tmp_path / "deeper" / "store.db"  # the folder is made on open
    with Store(path) as store:
        assert store.path == path and path.exists()
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] == int(BUSY_TIMEOUT_S * 1000)
        assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_reopening_a_file_store_keeps_its_data_and_runs_no_migration_again(tmp_path: Path):
    path = tmp_path / "store.db"
    with Store(path) as store:
        store.ingest([_document("alpha")], now=1.0)
        store.add_adapter(_adapter(1, passage_id=1), activate=True, now=2.0)
        applied, counts = _applied(store), store.counts()
    with Store(path) as store:
        assert _applied(store) == applied  # same names, same times: nothing re-ran
        assert store.counts() == counts
        assert store.active_adapter_id("knowledge") == "knowledge-0001"
        assert [p["title"] for p in store.passages()] == ["alpha 0", "alpha 1"]


@pytest.mark.process
def test_four_processes_opening_a_new_store_at_once_all_succeed(tmp_path: Path):
    """Concurrent first opens used to fail ("table ... already exists", "database is
    locked"): each of 4 processes, started together on a store that does not exist yet,
    opens it, and the schema is migrated once."""
    import subprocess
    import sys
    import time

    from tests.helpers import REPO

    code = ("import sys, time; from store import Store\n"
            "t = float(sys.argv[2])\n"
            "while time.time() < t: pass\n"  # start together
            "s = Store(sys.argv[1]); s.counts(); s.close()")
    for round_ in range(3):
        path = tmp_path / f"new-{round_}" / "store.db"
        start = time.time() + 1.5
        procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(start)], cwd=REPO,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, errors
        with Store(path) as store:
            assert list(migrations.pending(store.db)) == []
            assert len({m.name for m in migrations.applied(store.db)}) == len(list(migrations.applied(store.db)))


def test_the_forgetting_sample_rotates_over_every_learned_passage_in_bounded_windows(tmp_path):
    """A wake cycle re-measures k earlier passages: a window by id that moves with the
    turn and wraps around, so that over the turns each learned passage comes up."""
    with Store(tmp_path / "s.db") as store:
        assert store.learned_sample(1, 4, 0) == []
        learned = list(range(1, 40, 3))  # ids 1, 4, ..., 37: not every id is a learned passage
        with store.db.atomic():
            for pid in learned:
                store.db["cycles"].insert({"passage_id": pid, "outcome": "committed", "started_at": 1.0})
            store.db["cycles"].insert({"passage_id": 2, "outcome": "failed", "started_at": 1.0})
        seen: set[int] = set()
        for turn in range(20):
            got = store.learned_sample(37, 4, turn)
            assert len(got) == 4 == len(set(got)) and 37 not in got and set(got) <= set(learned)
            seen |= set(got)
        assert seen == set(learned) - {37}
        assert sorted(store.learned_sample(1, 50, 3)) == learned[1:]  # fewer than k: all of them
        assert store.learned_sample(1, 0, 3) == []


def _counted(store: Store) -> tuple[dict, int]:
    """Jobs by state and learned passages, counted the slow way (what the counters
    must always equal)."""
    by_state = dict.fromkeys(JOB_STATES, 0)
    for state, n in store.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
        by_state[state] = n
    learned = store.db.execute(
        "SELECT COUNT(DISTINCT passage_id) FROM adapters WHERE name = 'knowledge' AND kind = 'wake' "
        "AND passage_id IS NOT NULL AND status != 'rolled_back'").fetchone()[0]
    return by_state, learned


def test_the_counters_follow_every_change_of_jobs_and_versions(mem: Store):
    """Jobs by state and learned passages are counters kept by triggers (0009): after
    claims, failures, retries, commits, a second version of a passage, rollbacks and
    prunes they equal a full count, and an aborted transaction moves neither."""
    mem.ingest([_document("alpha", 3), _document("beta", 3)], now=1.0)

    def same() -> None:
        by_state, learned = _counted(mem)
        assert mem.queue_summary() == by_state
        assert mem.first_learned("knowledge")[1] == learned

    same()
    for v, pid in enumerate([1, 2, 1, 3], start=1):  # passage 1 learned twice
        job = mem.claim_next("w", now=2.0)
        same()
        mem.add_adapter(_adapter(v, pid), activate=True)
        mem.finish_job(job.id, now=3.0)
        same()
    assert mem.first_learned("knowledge")[1] == 3
    job = mem.claim_next("w", now=4.0)
    mem.fail_job(job.id, "boom", max_attempts=1, now=5.0)
    same()
    mem.retry_jobs(None, now=6.0)
    same()
    mem.set_active("knowledge", "knowledge-0002")  # versions 3 and 4 rolled back: passage 3 unlearned, 1 stays
    same()
    assert mem.first_learned("knowledge")[1] == 2
    mem.mark_pruned([{"id": "knowledge-0001", "path": "knowledge-0001"}], {}, now=5.5)  # pruned still learned
    same()
    assert mem.first_learned("knowledge")[1] == 2
    mem.set_active("knowledge", "knowledge-0004")  # back again
    same()
    assert mem.first_learned("knowledge")[1] == 3
    with pytest.raises(RuntimeError), mem.db.atomic():
        mem.db.execute("UPDATE jobs SET state = 'failed'")
        raise RuntimeError("abort")
    same()
    mem.db.execute("DELETE FROM jobs WHERE state = 'pending'")
    same()


def test_the_counters_migration_counts_what_a_store_already_holds(tmp_path: Path):
    """A store made before 0009 gets counters equal to what it already holds."""
    path = tmp_path / "old.db"
    with Store(path) as store:
        store.ingest([_document("alpha", 3)], now=1.0)
        job = store.claim_next("w", now=2.0)
        store.add_adapter(_adapter(1, job.passage_id), activate=True)
        store.finish_job(job.id, now=3.0)
        expected = _counted(store)
        # back to before 0009, as a store of an older seal would be
        triggers = [r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
        assert len(triggers) == 6
        for sql in (*(f"DROP TRIGGER {t}" for t in triggers), "DROP TABLE job_counts", "DROP TABLE learned_counts",
                    "DELETE FROM _sqlite_migrations WHERE name = '0009_counters'"):
            store.db.execute(sql)
    with Store(path) as store:
        assert (store.queue_summary(), store.first_learned("knowledge")[1]) == expected == (
            {"pending": 2, "claimed": 0, "done": 1, "failed": 0}, 1)

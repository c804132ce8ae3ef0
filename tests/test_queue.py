"""`seal queue`: counts by state, the job table (80 columns, plain when piped), JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from store import Store


@pytest.fixture(autouse=True)
def _session_tokenizer(monkeypatch, tokenizer):
    monkeypatch.setattr("agent.ingest.load_tokenizer", lambda model_cfg: tokenizer)


LONG_TITLE = "The Remarkably Long and Winding History of the Floating Library of Velmoor on Lake Quillon"


@pytest.fixture
def queued(seal, home: Path, tmp_path: Path) -> Path:
    """Four passages: one done, one failed, one claimed, one pending."""
    for i, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        title = LONG_TITLE if name == "delta" else name.title()
        (tmp_path / f"{name}.md").write_text(f"# {title}\n\nFact number {i} about {name}.\n", encoding="utf-8")
    r = seal("ingest", tmp_path)
    assert r.exit_code == 0, r.output
    with Store(home / "store.db") as s:
        a = s.claim_next("w1", now=1.0)
        s.finish_job(a.id, now=2.0)
        b = s.claim_next("w1", now=3.0)
        s.fail_job(b.id, "CUDA out of memory while training the trial adapter\nsecond line", max_attempts=1, now=4.0)
        s.claim_next("worker-7", now=5.0)
    return home


def test_queue_lists_open_jobs_with_counts(seal, queued):
    r = seal("queue")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "queue: 1 pending, 1 claimed, 1 done, 1 failed"
    assert all(len(line) <= 80 for line in lines), r.stdout
    assert all(line == line.rstrip() for line in lines)
    assert "\x1b[" not in r.stdout  # no colour codes when not a terminal
    body = "\n".join(lines[1:])
    assert "Alpha" not in body  # done: only with --all
    assert "Beta" in body and "failed" in body and "CUDA out of memory" in body
    assert "Delta" not in body and "The Remarkably Long" in body and "…" in body  # truncated title
    assert "by worker-7" in body


def test_queue_all_includes_done(seal, queued):
    r = seal("queue", "--all")
    assert r.exit_code == 0
    assert "Alpha" in r.stdout and "done" in r.stdout.split("\n", 1)[1]


def test_queue_json(seal, queued):
    data = json.loads(seal("queue", "--json").stdout)
    assert data["counts"] == {"pending": 1, "claimed": 1, "done": 1, "failed": 1}
    assert [j["state"] for j in data["jobs"]] == ["failed", "claimed", "pending"]
    assert data["jobs"][0]["error"].startswith("CUDA out of memory")
    assert {"id", "attempts", "title", "n_tokens", "source"} <= set(data["jobs"][0])
    assert data["truncated"] is False
    assert len(json.loads(seal("queue", "--json", "--all").stdout)["jobs"]) == 4


def test_queue_limit(seal, queued):
    r = seal("queue", "--all", "--limit", "2")
    assert r.exit_code == 0
    assert r.stdout.rstrip().endswith("... 2 more (--limit 0 lists all)")


def test_queue_on_empty_home_creates_nothing(seal, home):
    r = seal("queue")
    assert r.exit_code == 0
    assert r.stdout.strip() == "queue: 0 pending, 0 claimed, 0 done, 0 failed"
    assert not (home / "store.db").exists()


# ---------------------------------------------------------------- poison passages, retries
def test_retry_puts_failed_jobs_back_with_fresh_attempts(seal, queued):
    with Store(queued / "store.db") as s:
        (failed,) = s.jobs(("failed",))
    r = seal("queue", "--retry", str(failed["id"] + 100))
    assert r.exit_code != 0 and r.output.strip().splitlines()[-1].endswith(f"job {failed['id'] + 100} is not a failed job (see `seal queue`)")
    assert json.loads(seal("queue", "--json").stdout)["counts"]["failed"] == 1  # nothing changed
    r = seal("queue", "--retry", str(failed["id"]))
    assert r.exit_code == 0 and "retried 1 job(s)" in r.stdout
    with Store(queued / "store.db") as s:
        (job,) = [j for j in s.jobs(limit=10) if j["id"] == failed["id"]]
        assert (job["state"], job["attempts"], job["error"]) == ("pending", 0, None)
        assert s.queue_summary()["failed"] == 0
    assert seal("queue", "--retry-failed").stdout.startswith("retried 0 job(s)")


def test_a_poison_passage_that_kills_its_worker_is_failed_not_retried_forever(tmp_path):
    """kill -9 on every try: each recovery gives the job back with the reason; once it
    has used up its attempts the next claim marks it failed and takes the next one."""
    with Store(tmp_path / "store.db") as s:
        from tests.helpers import PASSAGES, document

        s.ingest([document(*PASSAGES[0]), document(*PASSAGES[1])])
        poison, other = (j["id"] for j in s.jobs())
        for attempt in range(1, 4):
            job = s.claim_next(f"host:{attempt}", now=float(attempt), max_attempts=3)
            assert job.id == poison and job.attempts == attempt
            s.requeue_claimed_by(f"host:{attempt}", reason=f"its worker host:{attempt} died while learning it")
        job = s.claim_next("host:9", now=9.0, max_attempts=3)
        assert job.id == other
        (failed,) = s.jobs(("failed",))
        assert failed["id"] == poison
        assert failed["error"] == "gave up after 3 attempts: its worker host:3 died while learning it"
        assert s.events(kind="poison")


def test_a_fault_that_never_goes_away_does_not_loop_for_ever(tmp_path):
    """A passage deferred again and again (its 'temporary' fault is its own) waits
    behind the others, and after max_deferrals it is failed, with the reason, until
    `seal queue --retry`."""
    with Store(tmp_path / "store.db") as s:
        from tests.helpers import PASSAGES, document

        s.ingest([document(*PASSAGES[0]), document(*PASSAGES[1])])
        first, second = (j["id"] for j in s.jobs())
        job = s.claim_next("w", max_attempts=3)
        assert job.id == first
        assert s.defer_job(job.id, "MemoryError: ", max_deferrals=3) == "pending"
        job = s.claim_next("w", max_attempts=3)
        assert job.id == second  # the deferred one waits behind the fresh one
        s.finish_job(job.id)
        states = []
        for _ in range(2):
            job = s.claim_next("w", max_attempts=3)
            assert job.id == first
            states.append(s.defer_job(job.id, "MemoryError: ", max_deferrals=3))
        assert states == ["pending", "failed"]
        failed = {j["id"]: j for j in s.jobs(("failed",))}
        assert failed[first]["error"] == "gave up after 3 deferrals: MemoryError: "
        assert s.retry_jobs([first]) == 1
        (again,) = [j for j in s.jobs(("pending",)) if j["id"] == first]
        assert again["deferrals"] == 0 and again["attempts"] == 0


def test_a_temporary_fault_gives_the_job_back_without_counting_it(tmp_path):
    with Store(tmp_path / "store.db") as s:
        from tests.helpers import PASSAGES, document

        s.ingest([document(*PASSAGES[0])])
        for _ in range(5):
            job = s.claim_next("w", max_attempts=3)
            assert job.attempts == 1
            s.defer_job(job.id, "OSError: [Errno 28] No space left on device")
        (job,) = s.jobs()
        assert (job["state"], job["attempts"]) == ("pending", 0)
        assert job["error"] == "deferred (temporary): OSError: [Errno 28] No space left on device"

"""The wake cycle on a tiny random Llama: what it records, the policies it calls, the
guards, the configuration, and the crash guarantees (kill -9 mid-cycle, leftovers of
an interrupted commit).

In-process tests build a fresh tiny model per test (a ``Learner`` wraps the model
with peft in place, so the session ``tiny_runtime`` is never handed to one). The CLI
tests run ``seal --model DIR`` on a tiny model saved once per session (``tiny_dir``).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

import click
import pytest
import torch

from adapters import files, lora
from adapters.lora import TrainResult
from adapters.names import KNOWLEDGE, TRIAL
from agent.wake import WakeConfig, learn
from policies import reward, selection
from policies.config import PolicyConfig
from policies.questions import answer_prompt, split_roles
from policies.self_edit import PassageOnly, QAChat, parse_qa, split_lines
from store import Store
from tests.helpers import (
    ALWAYS,
    BRISK,
    FAST_WAKE,
    VARN,
    check_intact,
    document,
    file_sha,
    kill_9_when,
    make_learner,
    record,
    run_cli,
    seal_argv,
    start_cli,
)

NEVER = PolicyConfig(self_edit="qa_chat", selection="best_of_n", min_gain=1e9)  # nothing clears the bar: the rejection path

pytestmark = pytest.mark.usefixtures("one_thread")


def job_of(store: Store, passage_id: int) -> dict:
    (job,) = [j for j in store.jobs(limit=100) if j["passage_id"] == passage_id]
    return job


def folders(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "adapters").iterdir())


# ------------------------------------------------------------------ the wake cycle
def test_a_cycle_records_everything_and_commits_atomically(tokenizer, home):
    learner = make_learner(tokenizer, home)
    store = learner.store
    (outcome,) = store.ingest([document(*VARN)])
    pid = store.passages()[0]["id"]
    assert outcome.questions_added == 4

    calls: list[tuple[str, list[int]]] = []  # which questions are scored, under which adapter
    score = learner.score

    def spy(adapter, title, qs, context=None):
        calls.append((adapter, [q["id"] for q in qs]))
        return score(adapter, title, qs, context)

    learner.score = spy
    (report,) = learn(learner)

    # the question split: seeded by the passage, stored once
    qs = store.questions(pid)
    assert split_roles([q["id"] for q in qs], ALWAYS.reward_fraction, seed=pid) == {q["id"]: q["role"] for q in qs}
    reward_ids = [q["id"] for q in qs if q["role"] == "reward"]
    probe_ids = [q["id"] for q in qs if q["role"] == "probe"]
    assert len(reward_ids) == 2 and len(probe_ids) == 2

    (cycle,) = store.cycles()
    assert cycle["outcome"] == report.outcome == "committed"
    assert cycle["reason"] and cycle["reason"] == report.reason
    assert (cycle["n_reward"], cycle["n_probe"]) == (2, 2)
    assert cycle["parent_adapter"] is None and cycle["adapter_id"] == report.adapter_id == "knowledge-0001"
    assert math.isfinite(cycle["baseline_logprob"]) and 0 <= cycle["baseline_acc"] <= 1
    assert {"questions", "baseline", "generate", "train", "score", "evaluate"} <= set(json.loads(cycle["timings"]))
    assert json.loads(cycle["tokens"])["train"] > 0

    # every candidate: passage-only, then N self-edits, each with both rewards
    cands = store.candidates(pid)
    assert [c["policy"] for c in cands] == ["passage"] + ["qa_chat"] * FAST_WAKE.candidates
    assert [c["idx"] for c in cands] == list(range(1 + FAST_WAKE.candidates))
    assert all(c["cycle_id"] == cycle["id"] for c in cands)
    # a self-edit with nothing usable beyond the passage (the tiny model writes no
    # grounded pair) is recorded but not trained: it would repeat passage-only
    trained = [c for c in cands if c["note"] is None]
    assert cands[0] in trained
    for c in cands:
        if c not in trained:
            assert "same as passage-only" in c["note"] and c["reward_logprob"] is None and not c["chosen"]
    for c in trained:
        assert c["reward_logprob"] is not None and math.isfinite(c["reward_logprob"])
        assert c["reward_acc"] is not None and c["reward_f1"] is not None
        assert c["train_loss"] is not None and math.isfinite(c["train_loss"])
        assert c["n_examples"] >= 1
    assert cands[0]["text"] == "" and cands[0]["n_examples"] == 1
    assert sum(c["chosen"] for c in cands) == 1
    chosen = next(c for c in cands if c["chosen"])

    # selection saw only the reward questions: the baseline and every trial were scored
    # on them; the probes were scored once each, before and after, and never under a trial
    assert calls[0] == (KNOWLEDGE, reward_ids)
    trial_calls = [ids for adapter, ids in calls if adapter == TRIAL]
    assert trial_calls == [reward_ids] * len(trained)
    probe_calls = [(adapter, ids) for adapter, ids in calls if set(ids) & set(probe_ids)]
    assert probe_calls == [(KNOWLEDGE, probe_ids), (KNOWLEDGE, probe_ids)]
    last_trial = max(i for i, (adapter, _) in enumerate(calls) if adapter == TRIAL)
    assert all(i > last_trial for i, (_, ids) in enumerate(calls) if set(ids) & set(probe_ids))

    # the adapter: a row, the active pointer, the file, its hash, the weights in memory
    row = store.adapter("knowledge-0001")
    assert row["parent_id"] is None and row["passage_id"] == pid and row["kind"] == "wake"
    assert row["status"] == "committed" and row["policy"] == chosen["policy"]
    assert row["reward"] == pytest.approx(chosen["reward_logprob"])
    assert store.active_adapter_id("knowledge") == "knowledge-0001"
    assert row["sha256"] == file_sha(home / "adapters" / row["path"])
    assert folders(home) == ["knowledge-0001"]
    from safetensors.torch import load_file

    saved = load_file(home / "adapters" / row["path"] / files.WEIGHTS_NAME)
    live = lora.snapshot(learner.model, KNOWLEDGE)
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)

    # the probe before (the base: adapter NULL) and after (the new adapter)
    evals = store.evaluations(passage_id=pid)
    assert [(e["adapter_id"], e["kind"], e["n"]) for e in evals] == [(None, "probe", 2), ("knowledge-0001", "probe", 2)]
    assert evals[0]["logprob"] == pytest.approx(report.probe_before.logprob)
    assert evals[1]["logprob"] == pytest.approx(report.probe_after.logprob)

    job = job_of(store, pid)
    assert (job["state"], job["attempts"], job["error"]) == ("done", 1, None)


def test_the_stored_timings_include_the_commit(tokenizer, home):
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN)])
    (report,) = learn(learner)
    assert "commit" in report.timings
    (cycle,) = learner.store.cycles()
    assert json.loads(cycle["timings"]) == pytest.approx(report.timings)


def test_a_rejected_cycle_keeps_the_adapter_and_says_why(tokenizer, home):
    learner = make_learner(tokenizer, home, policies=NEVER)
    store = learner.store
    store.ingest([document(*VARN)])
    (report,) = learn(learner)
    (cycle,) = store.cycles()
    assert report.outcome == cycle["outcome"] == "rejected"
    assert "min_gain" in cycle["reason"] and cycle["adapter_id"] is None
    assert len(store.candidates(1)) == 1 + FAST_WAKE.candidates
    assert not any(c["chosen"] for c in store.candidates(1))
    assert store.adapters() == [] and store.active_adapter_id("knowledge") is None
    assert folders(home) == []
    assert [(e["adapter_id"], e["kind"]) for e in store.evaluations(passage_id=1)] == [(None, "probe")]
    assert job_of(store, 1)["state"] == "done"


def test_a_second_commit_chains_to_the_first_and_remeasures_it(tokenizer, home):
    learner = make_learner(tokenizer, home)
    store = learner.store
    store.ingest([document(*VARN), document(*BRISK)])
    reports = learn(learner)
    assert [r.outcome for r in reports] == ["committed", "committed"]
    first, second = store.adapters("knowledge")
    assert (first["id"], second["id"]) == ("knowledge-0001", "knowledge-0002")
    assert second["parent_id"] == "knowledge-0001"
    assert store.active_adapter_id("knowledge") == "knowledge-0002"
    # passage 2's "before" is measured under its parent; passage 1 is re-measured
    # under the new adapter (the forgetting matrix)
    assert [(e["adapter_id"], e["passage_id"]) for e in store.evaluations(passage_id=2)] == [
        ("knowledge-0001", 2), ("knowledge-0002", 2)]
    assert ("knowledge-0002", 1) in [(e["adapter_id"], e["passage_id"]) for e in store.evaluations(passage_id=1)]
    # a restarted learner loads the active adapter, byte for byte
    again = make_learner(tokenizer, home)
    live, saved = lora.snapshot(again.model, KNOWLEDGE), lora.snapshot(learner.model, KNOWLEDGE)
    assert all(torch.equal(live[k], saved[k]) for k in live)


def _two_versions(tokenizer, home: Path) -> None:
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN), document(*BRISK)])
    assert [r.outcome for r in learn(learner)] == ["committed", "committed"]


def test_seal_history_lists_versions_newest_first(tokenizer, home, seal):
    r = seal("history")
    assert (r.exit_code, r.stdout.strip()) == (0, "no adapters yet")
    assert not (home / "store.db").exists()  # a read-only command creates nothing
    _two_versions(tokenizer, home)
    rows = json.loads(seal("history", "--json").stdout)
    assert [(r["id"], r["parent_id"], r["passage_id"], r["active"]) for r in rows] == [
        ("knowledge-0002", "knowledge-0001", 2, True), ("knowledge-0001", None, 1, False)]
    assert all(r["title"] and r["policy"] and r["probe_acc"] is not None for r in rows)


@pytest.mark.slow
def test_seal_history_table_fits_80_columns_with_whole_ids(tokenizer, home, seal):
    _two_versions(tokenizer, home)
    r = seal("history")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), r.stdout
    assert lines[1].startswith("knowledge-0002 *") and "knowledge-0001" in lines[1], r.stdout
    assert lines[2].startswith("knowledge-0001 ") and " base " in lines[2], r.stdout


def test_nan_in_every_trial_rejects_and_keeps_the_previous_adapter(tokenizer, home, monkeypatch):
    learner = make_learner(tokenizer, home)
    store = learner.store
    store.ingest([document(*VARN), document(*BRISK)])
    learn(learner, max_passages=1)
    assert store.active_adapter_id("knowledge") == "knowledge-0001"
    before = lora.snapshot(learner.model, KNOWLEDGE)

    def nan_train(model, tok, examples, cfg, adapter=KNOWLEDGE, progress=None):
        return TrainResult(steps=1, tokens=10, seconds=0.0, losses=(math.nan,), final_loss=math.nan, nan=True)

    monkeypatch.setattr(lora, "train", nan_train)
    (report,) = learn(learner)
    assert report.outcome == "rejected" and report.reason == "every trial failed a guard"
    (cycle,) = store.cycles(passage_id=2)
    assert (cycle["outcome"], cycle["reason"]) == ("rejected", "every trial failed a guard")
    assert cycle["parent_adapter"] == "knowledge-0001" and cycle["adapter_id"] is None
    cands = store.candidates(2)
    assert len(cands) == 1 + FAST_WAKE.candidates
    for c in cands:
        # trained ones hit the NaN guard; a self-edit with nothing usable is not trained at all
        assert ("non-finite" in (c["note"] or "") or "not trained" in (c["note"] or "")) and not c["chosen"]
        assert c["reward_logprob"] is None and c["reward_acc"] is None
    assert store.active_adapter_id("knowledge") == "knowledge-0001"
    assert [a["id"] for a in store.adapters()] == ["knowledge-0001"] and folders(home) == ["knowledge-0001"]
    after = lora.snapshot(learner.model, KNOWLEDGE)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert job_of(store, 2)["state"] == "done"


@pytest.mark.slow
def test_a_failure_inside_the_commit_transaction_leaves_nothing_behind(tokenizer, home, monkeypatch):
    """The adapter row, the active pointer and the cycle land together or not at all:
    a failure while recording the cycle removes the new folder, keeps the parent
    active and gives the job back for another attempt."""
    learner = make_learner(tokenizer, home)
    store = learner.store
    store.ingest([document(*VARN), document(*BRISK)])
    learn(learner, max_passages=1)
    counts = store.counts()

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as m:
        m.setattr(store, "record_cycle", broken)
        (report,) = learn(learner, max_passages=1)
    # a disk error is the machine's fault, not the passage's: deferred, the attempt not counted
    assert report.outcome == "deferred" and "disk I/O error" in report.reason
    assert store.active_adapter_id("knowledge") == "knowledge-0001"
    assert [a["id"] for a in store.adapters()] == ["knowledge-0001"]
    assert folders(home) == ["knowledge-0001"]
    after = store.counts()
    assert {k: after[k] for k in ("adapters", "cycles", "candidates", "evaluations")} == {
        k: counts[k] for k in ("adapters", "cycles", "candidates", "evaluations")}
    job = job_of(store, 2)
    assert (job["state"], job["attempts"]) == ("pending", 0) and "disk I/O error" in job["error"]
    # the retry commits version 2 (the number was not burnt)
    (report,) = learn(learner)
    assert report.adapter_id == "knowledge-0002" and job_of(store, 2)["attempts"] == 1


@pytest.mark.slow
def test_after_a_failed_commit_the_live_adapter_is_the_active_one(tokenizer, home, monkeypatch):
    learner = make_learner(tokenizer, home)
    store = learner.store
    store.ingest([document(*VARN), document(*BRISK)])
    learn(learner, max_passages=1)

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as m:
        m.setattr(store, "record_cycle", broken)
        (report,) = learn(learner, max_passages=1)
    assert report.outcome == "deferred" and store.active_adapter_id("knowledge") == "knowledge-0001"
    from safetensors.torch import load_file

    saved = load_file(home / "adapters" / "knowledge-0001" / files.WEIGHTS_NAME)
    live = lora.snapshot(learner.model, KNOWLEDGE)
    assert all(torch.equal(saved[k], live[k]) for k in saved)


def test_the_claim_is_heartbeaten_while_a_long_trial_trains(tokenizer, home, monkeypatch):
    wake = WakeConfig(candidates=1, self_edit_tokens=16, answer_tokens=8, claim_heartbeat_s=0.05)
    learner = make_learner(tokenizer, home, wake=wake)
    learner.store.ingest([document(*VARN)])
    batch_loss, train = lora._batch_loss, lora.train
    gaps = []

    def slow_batch_loss(scorer, batch):  # 3 epochs x 0.2 s: a trial of ~0.6 s
        time.sleep(0.2)
        return batch_loss(scorer, batch)

    def watched_train(*args, **kwargs):
        with Store(home / "store.db") as other:
            before = job_of(other, 1)["heartbeat_at"]
            result = train(*args, **kwargs)
            gaps.append(job_of(other, 1)["heartbeat_at"] - before)
        return result

    monkeypatch.setattr(lora, "_batch_loss", slow_batch_loss)
    monkeypatch.setattr(lora, "train", watched_train)
    learn(learner)
    # one trained trial per candidate with usable examples (the tiny model's self-edits
    # have none beyond the passage, so only passage-only trains here)
    assert len(gaps) >= 1 and all(g > 0 for g in gaps), gaps


def test_ctrl_c_gives_the_claim_back(tokenizer, home, monkeypatch):
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN)])

    def interrupted(examples, seed, progress=None, epochs=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(learner, "trial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        learn(learner)
    job = job_of(learner.store, 1)
    assert job["state"] == "pending" and job["claimed_by"] is None
    assert learner.store.cycles() == [] and learner.store.adapters() == []


@pytest.mark.slow
def test_leftovers_of_an_interrupted_commit_are_removed_before_learning(tokenizer, home):
    """The recovery primitive of 'kill -9 during the commit': a temp dir of an
    unfinished save, and a folder renamed into place whose transaction never
    committed (here with the very name the next commit needs)."""
    learner = make_learner(tokenizer, home)
    store = learner.store
    store.ingest([document(*VARN), document(*BRISK)])
    learn(learner, max_passages=1)
    adapters = home / "adapters"
    committed_sha = file_sha(adapters / "knowledge-0001")
    (adapters / ".tmp-x").mkdir()
    (adapters / ".tmp-x" / files.WEIGHTS_NAME).write_bytes(b"half")
    orphan = adapters / "knowledge-0002"  # renamed, but no row: the crash came before the transaction
    orphan.mkdir()
    (orphan / files.WEIGHTS_NAME).write_bytes(b"stale")
    (adapters / "knowledge-0077").mkdir()

    (report,) = learn(learner)
    assert report.outcome == "committed" and report.adapter_id == "knowledge-0002"
    assert folders(home) == ["knowledge-0001", "knowledge-0002"]
    assert file_sha(adapters / "knowledge-0001") == committed_sha == store.adapter("knowledge-0001")["sha256"]
    assert file_sha(adapters / "knowledge-0002") == store.adapter("knowledge-0002")["sha256"]


# ------------------------------------------------------------------------ selection
def T(idx, policy, r, other=0.0, ok=True):
    return selection.Trial(idx, policy, r, other, ok)


def test_selection_requires_min_gain():
    choice = selection.best_of_n([T(0, "passage", 0.01), T(1, "qa_chat", 0.02)], min_gain=0.05, edit_margin=0.0)
    assert choice.idx is None and "min_gain" in choice.reason
    assert selection.best_of_n([T(0, "passage", 0.0)], min_gain=0.0, edit_margin=0.0).idx is None  # not "more than"


def test_a_self_edit_within_the_margin_keeps_passage_only():
    trials = [T(0, "passage", 0.10), T(1, "qa_chat", 0.12), T(2, "qa_chat", 0.08)]
    choice = selection.best_of_n(trials, min_gain=0.0, edit_margin=0.05)
    assert choice.idx == 0 and "passage-only kept" in choice.reason


def test_a_self_edit_beyond_the_margin_wins():
    trials = [T(0, "passage", 0.10), T(1, "qa_chat", 0.30), T(2, "qa_chat", 0.20)]
    assert selection.best_of_n(trials, min_gain=0.0, edit_margin=0.05).idx == 1
    # without a passage-only trial, the best self-edit that clears min_gain wins
    assert selection.best_of_n(trials[1:], min_gain=0.0, edit_margin=0.05).idx == 1


def test_a_self_edit_within_the_margin_of_a_weak_passage_only_is_rejected():
    trials = [T(0, "passage", -0.01), T(1, "qa_chat", 0.02)]
    assert selection.best_of_n(trials, min_gain=0.0, edit_margin=0.05).idx is None


def test_ties_go_to_the_other_reward():
    trials = [T(0, "passage", 0.1, other=0.0), T(1, "qa_chat", 0.5, other=0.1), T(2, "qa_chat", 0.5, other=0.3)]
    assert selection.best_of_n(trials, min_gain=0.0, edit_margin=0.05).idx == 2


def test_failed_trials_are_never_chosen():
    trials = [T(0, "passage", 0.1), T(1, "qa_chat", math.inf, ok=False), T(2, "qa_chat", math.nan, ok=False)]
    assert selection.best_of_n(trials, min_gain=0.0, edit_margin=0.05).idx == 0
    trials = [T(0, "passage", 5.0, ok=False), T(1, "qa_chat", 0.3), T(2, "qa_chat", math.nan, ok=False)]
    assert selection.best_of_n(trials, min_gain=0.0, edit_margin=0.05).idx == 1
    none = selection.best_of_n([T(0, "passage", math.nan, ok=False)], min_gain=-1e9, edit_margin=0.0)
    assert none.idx is None and none.reason == "every trial failed a guard"


def test_unknown_selection_policy():
    with pytest.raises(ValueError, match="unknown selection policy"):
        selection.get("worst_of_n")


# ------------------------------------------------------------------------- grading
@pytest.mark.parametrize(
    "text, normal",
    [
        ("The Denver Broncos", "denver broncos"),
        ("  Santa Clara,  California! ", "santa clara california"),
        ("an apple a day", "apple day"),
        ("\u201cThe\u201d \u2014 Theatre", "theatre"),  # curly quotes, dash; 'the' is an article, 'theatre' is not
        ("", ""),
    ],
)
def test_normalize_as_squad(text, normal):
    assert reward.normalize(text) == normal


@pytest.mark.parametrize(
    "prediction, gold, f1",
    [
        ("Denver Broncos", "Denver Broncos", 1.0),
        ("the Denver Broncos", "Denver Broncos", 1.0),
        ("Broncos", "Denver Broncos", 2 / 3),  # P 1, R 1/2
        ("Santa Clara, California", "Santa Clara", 0.8),  # P 2/3, R 1
        ("Carolina Panthers", "Denver Broncos", 0.0),
        ("", "Denver Broncos", 0.0),
    ],
)
def test_token_f1_as_squad(prediction, gold, f1):
    assert reward.token_f1(prediction, gold) == pytest.approx(f1)


def test_punctuation_inside_words_is_removed_as_squad_does():
    assert reward.normalize("Levi's Stadium") == "levis stadium"
    # official evaluate-v1.1.py: P 2/7, R 1
    assert reward.token_f1("Levi's Stadium in the San Francisco Bay Area", "Levi's Stadium") == pytest.approx(4 / 9)
    assert reward.is_correct("About 4300 people live there.", "4,300")


def test_containment_is_on_whole_normalised_words():
    assert reward.is_correct("It was the Denver Broncos, in 2016.", "Denver Broncos")
    assert reward.is_correct("DENVER BRONCOS!", "the Denver Broncos")
    assert not reward.is_correct("Broncos", "Denver Broncos")
    assert not reward.is_correct("in 19021", "1902")  # not a substring match
    assert not reward.is_correct("anything", "the")  # an empty gold answer is never matched
    assert not reward.is_correct("", "Kelmora")


def test_rewards_are_gains_over_the_baseline():
    base = reward.Scores(accuracy=0.25, f1=0.5, logprob=-3.0, n=4)
    trial = reward.Scores(accuracy=0.75, f1=0.7, logprob=-1.5, n=4)
    assert reward.answer_logprob(trial, base) == pytest.approx(1.5)
    assert reward.qa_accuracy(trial, base) == pytest.approx(0.5 + 1e-3 * 0.2)
    assert set(reward.REWARDS) == {"answer_logprob", "qa_accuracy", "teacher_agreement"}
    # label-free: relative to the teacher (reading), minus the drift from the base
    teacher = reward.Scores(accuracy=1.0, f1=1.0, logprob=-1.0, n=4)
    drifted = reward.Scores(accuracy=0.75, f1=0.7, logprob=-1.5, n=4, kl=0.25)
    assert reward.teacher_agreement(drifted, teacher) == pytest.approx(-0.5 + 0.75 - 0.25)
    assert reward.relative_to("teacher_agreement") == "teacher" and reward.relative_to("answer_logprob") == "baseline"


# ---------------------------------------------------------------------- self-edits
def test_split_lines_strips_bullets_and_numbering():
    edit = (
        "Implications:\n"
        "1. The island is small and lies in the sea.\n"
        "2) Its capital is the town of Kelmora.\n"
        "- Hedda Lune founded it in 1702.\n"
        "* **About 4,300 people live there.**\n"
        "\u2022 Most islanders keep sheep.\n"
        "(3) Sheep outnumber the people.\n"
        "Too short\n"
        "\n"
    )
    assert split_lines(edit) == [
        "The island is small and lies in the sea.",
        "Its capital is the town of Kelmora.",
        "Hedda Lune founded it in 1702.",
        "About 4,300 people live there.",
        "Most islanders keep sheep.",
        "Sheep outnumber the people.",
    ]


def test_parse_qa_reads_question_answer_blocks():
    edit = (
        "Here are some questions:\n"
        "Q: What is the capital of the Isle of Varn?\n"
        "A: Kelmora\n\n"
        "Question 2: Who founded the island?\n"
        "Answer 2: Hedda Lune\n"
        "**Q:** In which year?\n"
        "**A:** 1702\n"
        "Q: A question without an answer\n"
    )
    assert parse_qa(edit) == [
        ("What is the capital of the Isle of Varn?", "Kelmora"),
        ("Who founded the island?", "Hedda Lune"),
        ("In which year?", "1702"),
    ]


def test_qa_chat_keeps_grounded_pairs_as_chat_turns():
    title, text, _ = VARN
    edit = (
        "Q: What is the capital of the Isle of Varn?\nA: Kelmora\n"
        "Q: Who rules the island?\nA: Queen Mab\n"  # not in the passage: dropped
        "Q: What is the capital of the Isle of Varn?\nA: Kelmora\n"  # a repeat: dropped
        "Q: When was it founded?\nA: in 1702.\n"  # grounded after normalisation
    )

    def chat(user: str) -> str:
        return f"<user>{user}</user><assistant>"

    examples = QAChat().examples(title, text, edit, chat)
    assert examples[0] == lora.Example(prompt="", completion=f"{title}\n{text}")
    assert examples[1:] == [
        lora.Example(prompt=chat(answer_prompt("What is the capital of the Isle of Varn?", title=title)),
                     completion="Kelmora", eos=True),
        lora.Example(prompt=chat(answer_prompt("When was it founded?", title=title)), completion="in 1702.", eos=True),
    ]
    # nothing grounded: the passage alone
    assert QAChat().examples(title, text, "Q: Who?\nA: Nobody\n", chat) == examples[:1]
    assert PassageOnly().prompt(title, text) is None
    assert PassageOnly().examples(title, text, "", chat) == examples[:1]


# --------------------------------------------------------------------- configuration
def _one_line_error(r) -> str:
    assert r.exit_code != 0
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


def _perturbed(key: str, value: object) -> str | None:
    """A valid non-default value for a setting, as a --set string (None: keep it)."""
    if key == "model.system_prompt":
        return 'Be "brief" \\ and kind, # not a comment'
    if key == "lora.targets":
        return "v_proj,q_proj"
    if key == "distill.goldfish":  # 0 (off) or >= 2
        return str(value + 2)
    if key == "editor.batch_size":  # editor.processes (+1 = 2) must divide it
        return str(value * 2)
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int):
        return str(value + 1)
    if isinstance(value, float):
        return repr(value / 2 if value else 0.125)
    return None


def test_every_setting_round_trips_through_seal_toml(seal, home):
    from agent.config import Config, load_config
    from agent.settings import config_items

    flags = []
    for key, value, _ in config_items(Config()):
        v = _perturbed(key, value)
        if v is not None:
            flags += ["--set", f"{key}={v}"]
    shown = seal(*flags, "config", "show")
    assert shown.exit_code == 0, shown.output
    assert seal(*flags, "config", "init").exit_code == 0
    again = seal("config", "show")
    assert again.exit_code == 0, again.output
    assert again.stdout == shown.stdout
    keys = [k for k, _, _ in config_items(Config())]
    assert [line.split(" = ")[0].strip() for line in again.stdout.splitlines()[1:]] == keys
    assert all(isinstance(v, (str, int, float, bool, tuple)) for _, v, _ in config_items(load_config(home)))
    assert _one_line_error(seal("config", "init")).endswith("exists (use --force to overwrite)")


def test_every_config_field_has_help():
    from agent.config import Config
    from agent.settings import config_items

    assert [k for k, _, h in config_items(Config()) if not h] == []


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[wake]\ncandidatez = 3\n", "wake.candidatez"),
        ("[nosuch]\nx = 1\n", "nosuch"),
        ("[wake]\ncandidates = 'many'\n", "wake.candidates"),
        ("[policies]\nself_edit = 'poetry'\n", "poetry"),
        ("[wake\n", "not valid TOML"),
    ],
)
def test_a_bad_seal_toml_is_a_one_line_error(seal, home, toml, needle):
    (home / "seal.toml").write_text(toml, encoding="utf-8")
    assert needle in _one_line_error(seal("config", "show"))


@pytest.mark.parametrize(
    "override, needle",
    [
        ("wake.nope=1", "wake.nope"),
        ("nosuch.key=1", "nosuch"),
        ("wake.candidates=abc", "wake.candidates"),
        ("policies.self_edit=poetry", "poetry"),
        ("policies.selection=worst_of_n", "worst_of_n"),
        ("policies.reward=vibes", "vibes"),
        ("policies.questions=oracle", "oracle"),
        ("lora.rank=0", "rank"),
        ("candidates", "section.key=value"),
    ],
)
def test_a_bad_override_is_a_one_line_error(seal, override, needle):
    assert needle in _one_line_error(seal("--set", override, "config", "show"))


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # some commands are imported only when asked for
        cmd = group.get_command(ctx, name)
        yield (*path, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


def test_every_command_has_help(seal):
    from agent.cli import main

    paths = [(), *_commands(main)]
    assert ("learn",) in paths and ("config", "show") in paths
    for path in paths:
        r = seal(*path, "--help")
        assert r.exit_code == 0, (path, r.output)
        assert "Usage:" in r.stdout
        cmd = main
        for name in path:
            cmd = cmd.get_command(click.Context(cmd), name)
        assert (cmd.help or "").strip(), f"seal {' '.join(path)} has no help text"


# ------------------------------------------------------------ kill -9 in mid-cycle
@pytest.mark.process
def test_kill_9_in_mid_cycle_loses_nothing_and_resumes(seal, home, tmp_path, tiny_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    for title, text, qas in (VARN, BRISK):
        (docs / f"{title}.json").write_text(json.dumps(record(title, text, qas)), encoding="utf-8")
    r = seal("--model", str(tiny_dir), "ingest", docs)
    assert r.exit_code == 0, r.output

    run_cli(seal_argv(home, tiny_dir, "learn", "--max-passages", "1"))
    with Store(home / "store.db") as store:
        check_intact(store, home, "knowledge-0001")
        done = [j for j in store.jobs(limit=10) if j["state"] == "done"]
        assert len(done) == 1
        second = next(j for j in store.jobs(limit=10) if j["state"] == "pending")["passage_id"]

    # Slow trials (many epochs), then kill -9 as soon as the first trial starts (the
    # passage-only trial, which always trains: later trials of the tiny model may be
    # skipped as adding nothing, and the cycle could commit before a later kill).
    proc = start_cli(seal_argv(home, tiny_dir, "--set", "lora.epochs=300", "learn"))
    kill_9_when(proc, "trial 1: passage")

    with Store(home / "store.db") as store:
        check_intact(store, home, "knowledge-0001")
        job = job_of(store, second)
        assert job["state"] == "claimed" and job["attempts"] == 1
        assert job["claimed_by"].endswith(f":{proc.pid}")
        assert store.cycles(passage_id=second) == []  # nothing half-recorded
        assert store.candidates(second) == []

    out = run_cli(seal_argv(home, tiny_dir, "learn", "--max-passages", "1"))
    with Store(home / "store.db") as store:
        job = job_of(store, second)
        assert (job["state"], job["attempts"]) == ("done", 2)
        (cycle,) = store.cycles(passage_id=second)
        assert cycle["outcome"] in ("committed", "rejected"), out.stdout
        if cycle["outcome"] == "committed":
            assert cycle["adapter_id"] == "knowledge-0002" and cycle["parent_adapter"] == "knowledge-0001"
            check_intact(store, home, "knowledge-0002")
        else:
            check_intact(store, home, "knowledge-0001")
        assert store.queue_summary() == {"pending": 0, "claimed": 0, "done": 2, "failed": 0}
    assert not [p for p in (home / "adapters").iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------ one writer per home
@pytest.mark.process
def test_a_learning_process_holds_the_home_and_kill_9_gives_it_back(seal, home, tiny_dir):
    """While `seal learn` trains, `seal sleep`, `seal prune` and `seal daemon run` on
    the same home refuse with one line naming it; killed with -9, it holds nothing."""
    assert seal("ingest", "-", input=f"# {VARN[0]}\n\n{VARN[1]}\n").exit_code == 0
    proc = start_cli(seal_argv(home, tiny_dir, "--set", "lora.epochs=300", "learn"))
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            if "trial 1: passage" in line or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "the learn process ended before its first trial"
        for args in (("sleep",), ("prune", "--keep", "1"), ("daemon", "run", "--burst")):
            r = run_cli(seal_argv(home, tiny_dir, *args, verbose=False), ok=False)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert f"`seal learn` (pid {proc.pid}, since " in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        proc.kill()
        proc.wait()
    with Store(home / "store.db") as store:
        assert store.adapters() == [] and store.queue_summary()["claimed"] == 1
    from agent.home import Home, WriterLock

    with WriterLock(Home(home), "the next learn"):  # the kernel dropped the dead process's lock
        pass

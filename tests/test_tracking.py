"""Tracking: the forgetting matrix and its summary (on a hand-built store), general
drift (KL from the base, open-book reading), verbatim memorisation, `seal forgetting`,
and the rows a wake commit records."""

from __future__ import annotations

import dataclasses
import json

import pytest

from adapters import lora
from adapters.names import KNOWLEDGE
from agent import tracking
from agent.tracking import forgetting_summary
from agent.wake import learn
from policies.self_edit import PassageOnly, passage_text
from store import Store
from tests.helpers import BRISK, FAST_WAKE, VARN, document, make_learner

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapter(store: Store, version: int, kind: str, passage_id: int | None) -> str:
    aid = f"knowledge-{version:04d}"
    store.add_adapter({"id": aid, "name": "knowledge", "version": version, "kind": kind, "passage_id": passage_id,
                       "path": aid, "sha256": "0" * 64, "metrics": {}}, activate=True)
    return aid


def _probe(store: Store, adapter: str | None, passage: int, acc: float, lp: float | None = None) -> None:
    store.add_evaluations([{"adapter_id": adapter, "passage_id": passage, "kind": "probe", "accuracy": acc,
                            "f1": acc, "logprob": -1.0 + acc if lp is None else lp, "n": 2}])


def _docs(n: int) -> list:
    return [document(f"Passage {i}", f"Passage number {i} says that the answer is {i * 7}.",
                     [(f"What is answer {i}?", str(i * 7))]) for i in range(1, n + 1)]


def _learned_in_turn(store: Store, n: int) -> None:
    """n passages, version v learning passage v; each version measures every passage
    learned so far: 1.0 on its own, 0.5 on the older ones."""
    store.ingest(_docs(n))
    for v in range(1, n + 1):
        aid = _adapter(store, v, "wake", v)
        for p in range(1, v + 1):
            _probe(store, aid, p, 1.0 if p == v else 0.5)


@pytest.fixture
def built(home) -> Store:
    """Three passages learned by v1-v3, a sleep (v4, active), and a rolled-back v5."""
    store = Store(home / "store.db")
    store.ingest(_docs(3))
    _probe(store, None, 1, 0.0)  # the base, before p1 was learned
    v1 = _adapter(store, 1, "wake", 1)
    _probe(store, v1, 1, 1.0)
    _probe(store, v1, 2, 0.0)  # p2 before it was learned
    v2 = _adapter(store, 2, "wake", 2)
    for p, a in ((1, 0.5), (2, 1.0), (3, 0.5)):
        _probe(store, v2, p, a)
    v3 = _adapter(store, 3, "wake", 3)
    for p, a in ((1, 0.0), (2, 0.5), (3, 1.0)):
        _probe(store, v3, p, a)
    v4 = _adapter(store, 4, "sleep", None)
    _probe(store, v4, 1, 0.0)
    for p, a in ((1, 1.0), (2, 0.5), (3, 0.5)):  # the later measurement of (v4, p1) wins
        _probe(store, v4, p, a)
    v5 = _adapter(store, 5, "wake", None)
    for p in (1, 2, 3):
        _probe(store, v5, p, 0.0)
    store.set_active("knowledge", v4)  # v5 is rolled back
    yield store
    store.close()


def test_forgetting_summary_by_hand(built):
    s = forgetting_summary(built)
    assert [a["id"] for a in s["adapters"]] == [None, *(f"knowledge-{v:04d}" for v in range(1, 6))]
    assert [a["active"] for a in s["adapters"]] == [False, False, False, False, True, False]
    assert s["adapters"][-1]["status"] == "rolled_back"
    assert [p["id"] for p in s["passages"]] == [1, 2, 3]
    assert s["accuracy"] == [
        [0.0, None, None],
        [1.0, 0.0, None],
        [0.5, 1.0, 0.5],
        [0.0, 0.5, 1.0],
        [1.0, 0.5, 0.5],
        [0.0, 0.0, 0.0],
    ]
    per = {p["passage_id"]: p for p in s["per_passage"]}
    assert [(p["at_learning"], p["best"], p["current"], p["forgetting"]) for p in per.values()] == [
        (1.0, 1.0, 1.0, 0.0),  # forgotten under v3, brought back by the sleep
        (1.0, 1.0, 0.5, 0.5),
        (1.0, 1.0, 0.5, 0.5),
    ]
    assert per[1]["learned_by"] == "knowledge-0001" and per[3]["title"] == "Passage 3"
    assert per[2]["logprob_at_learning"] == pytest.approx(0.0) and per[2]["logprob_current"] == pytest.approx(-0.5)
    assert s["average_accuracy"] == pytest.approx(2 / 3)
    assert s["mean_at_learning"] == pytest.approx(1.0)
    assert s["retention"] == pytest.approx(2 / 3)
    assert s["backward_transfer"] == pytest.approx(-0.25)  # all but the last learned: (0 - 0.5) / 2
    assert s["active"] == "knowledge-0004"


def test_forgetting_summary_of_an_empty_store(tmp_path):
    with Store(tmp_path / "store.db") as store:
        s = forgetting_summary(store)
    assert (s["passages"], s["per_passage"], s["average_accuracy"], s["retention"], s["backward_transfer"]) == (
        [], [], None, None, None)


def test_seal_forgetting_fits_80_columns_and_prints_json(built, seal, home):
    built.add_drift({"adapter_id": "knowledge-0004", "kl": 0.125, "reading_acc": 0.5, "n_prompts": 16, "n_reading": 18})
    built.add_memorisation([{"adapter_id": "knowledge-0004", "passage_id": 1, "exact": 1, "token_match": 1.0,
                             "prefix_tokens": 32, "n_tokens": 32}])
    r = seal("forgetting")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    row = next(line for line in lines if line.startswith("v4 s *"))
    assert row.split()[3:] == ["1.00", "0.50", "0.50"]
    assert next(line for line in lines if line.startswith("base")).split()[1:] == ["0.00", ".", "."]
    assert any(line.startswith("v5 w x") for line in lines)
    assert any(line.startswith("#2 Passage 2") and line.split()[-4:] == ["1.00", "1.00", "0.50", "+0.50"]
               for line in lines)
    text = r.stdout
    assert "average accuracy 0.67 (at learning 1.00), retention 0.67" in text
    assert "backward transfer -0.25" in text
    assert "drift KL 0.1250" in text and "memorised verbatim: 1.00 exact" in text

    r = seal("forgetting", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data == json.loads(json.dumps(forgetting_summary(built)))
    assert data["drift"]["kl"] == 0.125 and data["memorisation"]["n"] == 1


def test_seal_forgetting_splits_many_passages_into_blocks_of_columns(seal, home):
    with Store(home / "store.db") as store:
        _learned_in_turn(store, 20)
    r = seal("forgetting")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    headers = [line for line in lines if line.startswith("version")]
    assert len(headers) == 2
    assert [c for h in headers for c in h.split()[1:]] == [f"#{i}" for i in range(1, 21)]


def test_the_forgetting_matrix_is_a_window_and_the_overall_figures_cover_all(seal, home):
    # at 10,000 versions x 10,000 passages the whole matrix would be 10^8 cells
    # (`seal forgetting --json` was killed at 21.5 GB): it shows a window
    with Store(home / "store.db") as store:
        _learned_in_turn(store, 12)
        whole = forgetting_summary(store, versions=None, passages=None)
        s = forgetting_summary(store, versions=4, passages=3)
    assert [a["version"] for a in s["adapters"]] == [9, 10, 11, 12]
    assert [p["id"] for p in s["passages"]] == [10, 11, 12] == [p["passage_id"] for p in s["per_passage"]]
    assert len(s["accuracy"]) == 4 and all(len(row) == 3 for row in s["accuracy"])
    assert s["accuracy"][-1] == [0.5, 0.5, 1.0] and s["accuracy"][0] == [None, None, None]
    assert s["per_passage"] == whole["per_passage"][-3:]
    assert s["window"] == {"versions": 4, "of_versions": 12, "passages": 3, "of_passages": 12, "overall": True}
    for k in ("average_accuracy", "mean_at_learning", "backward_transfer", "retention"):
        assert s[k] == whole[k]
    assert whole["average_accuracy"] == pytest.approx((11 * 0.5 + 1.0) / 12)
    # the dashboard's read: only the window's measurements, the same window, figures over it
    with Store(home / "store.db") as store:
        w = forgetting_summary(store, versions=4, passages=3, overall=False)
    assert {k: w[k] for k in ("adapters", "passages", "accuracy", "logprob", "per_passage")} == \
        {k: s[k] for k in ("adapters", "passages", "accuracy", "logprob", "per_passage")}
    assert w["window"] == {**s["window"], "overall": False}
    assert w["average_accuracy"] == pytest.approx((2 * 0.5 + 1.0) / 3) != whole["average_accuracy"]
    r = seal("forgetting", "--json", "--versions", "2", "--passages", "5")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert len(data["adapters"]) == 2 and len(data["passages"]) == 5 and data["window"]["of_passages"] == 12


def test_seal_forgetting_without_a_store(seal, home):
    r = seal("forgetting")
    assert (r.exit_code, r.stdout.strip()) == (0, "nothing learned yet")
    assert not (home / "store.db").exists()


# ------------------------------------------------------------------------ drift
def test_kl_is_zero_with_a_zero_adapter_and_positive_after_training(tokenizer, home):
    learner = make_learner(tokenizer, home)
    d = tracking.drift(learner, KNOWLEDGE)
    assert d["kl"] == 0.0
    assert (d["n_prompts"], d["n_reading"]) == (len(tracking.generic_texts()), len(tracking.reading_set()))
    assert d["n_prompts"] >= 16 and 0.0 <= d["reading_acc"] <= 1.0
    cfg = dataclasses.replace(learner.lora_cfg, lr=5e-2, epochs=5)
    lora.train(learner.model, tokenizer, [lora.Example("", t) for t in tracking.generic_texts()[:4]], cfg,
               adapter=KNOWLEDGE)
    kl, _ = tracking.kl_from_base(learner, KNOWLEDGE)
    assert kl > 0
    # the cached top-k estimate never exceeds the full-vocabulary KL
    base = tracking.base_distributions(learner)
    with learner.model.disable_adapter():
        lb = tracking._log_probs(learner.model, base.batches)
    learner.model.set_adapter(KNOWLEDGE)
    lc = tracking._log_probs(learner.model, base.batches)
    full = float((lb.exp() * (lb - lc)).sum(-1).mean())
    assert 0 < kl <= full + 1e-9
    assert tracking.base_distributions(learner) is base, "the base distributions are cached on the learner"


def test_the_fixed_sets_are_well_formed():
    texts = tracking.generic_texts()
    assert len(texts) >= 16 and len(set(texts)) == len(texts)
    rows = tracking.reading_set()
    assert len({r["title"] for r in rows}) >= 10 and len(rows) >= 15
    for r in rows:  # every answer can be read off the passage
        assert r["answer"].lower() in r["context"].lower(), r


def test_retention_grades_like_the_wake_cycle(tokenizer, home):
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN), document(*BRISK)])
    learner.question_set(learner.store.passage(1))
    learner.question_set(learner.store.passage(2))
    got = tracking.retention(learner, KNOWLEDGE, [1, 2])
    for pid in (1, 2):
        p = learner.store.passage(pid)
        qs = learner.store.questions(pid, role="probe")
        want = learner.score(KNOWLEDGE, p["title"], qs)
        assert (got[pid].accuracy, got[pid].n, got[pid].answers) == (want.accuracy, want.n, want.answers)
        assert got[pid].logprob == pytest.approx(want.logprob, abs=1e-4)


# ----------------------------------------------------------------- memorisation
def test_memorisation_compares_the_trained_prefix_with_the_true_continuation(tokenizer, home, monkeypatch):
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN), document(*BRISK), document("Tiny", "Two words.", [])])
    seen = []

    def greedy(model, tok, prefixes, n, batch_size):
        seen.append((prefixes, n))
        outs = []
        for prefix in prefixes:  # the truth for the first passage, half of it for the second
            ids = tok(_text(learner, 1), add_special_tokens=False)["input_ids"]
            true = ids[len(prefix): len(prefix) + n] if prefix == ids[: len(prefix)] else None
            if true is None:
                ids = tok(_text(learner, 2), add_special_tokens=False)["input_ids"]
                true = ids[len(prefix): len(prefix) + n]
                true = true[: len(true) // 2] + [0] * (n - len(true) // 2)
            outs.append(true + [0] * (n - len(true)))
        return outs

    monkeypatch.setattr(tracking, "_greedy", greedy)
    rows = tracking.memorisation(learner, KNOWLEDGE, [1, 2, 3], prefix_tokens=8, n_tokens=6)
    short = len(tokenizer(passage_text("Tiny", "Two words."), add_special_tokens=False)["input_ids"])
    assert short < 16  # split in half
    assert [(r["passage_id"], r["exact"], r["prefix_tokens"], r["n_tokens"]) for r in rows] == [
        (1, 1, 8, 6), (2, 0, 8, 6), (3, 0, short // 2, min(6, short - short // 2))]
    assert rows[0]["token_match"] == 1.0 and rows[1]["token_match"] == pytest.approx(3 / 6)
    # the prefix is the passage exactly as PassageOnly trains it (title, newline, text; no BOS)
    ((prefixes, n),) = seen
    trained = PassageOnly().examples(VARN[0], VARN[1], "", None)[0]
    assert trained.prompt == "" and prefixes[0] == tokenizer(trained.completion, add_special_tokens=False)["input_ids"][:8]
    assert n == 6


def _text(learner, pid: int) -> str:
    p = learner.store.passage(pid)
    return passage_text(p["title"], p["text"])


def test_memorisation_of_the_untrained_tiny_model_is_none(tokenizer, home):
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN)])
    (row,) = tracking.memorisation(learner, KNOWLEDGE, [1], prefix_tokens=8, n_tokens=8)
    assert (row["exact"], row["prefix_tokens"], row["n_tokens"]) == (0, 8, 8)
    assert 0.0 <= row["token_match"] < 1.0


# ------------------------------------------------------------ wake commits track
@pytest.mark.slow
def test_a_wake_commit_records_drift_and_memorisation_of_the_new_version(tokenizer, home):
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN), document(*BRISK)])
    reports = learn(learner)
    assert [r.outcome for r in reports] == ["committed", "committed"]
    store = learner.store
    for r in reports:
        (d,) = store.drift(r.adapter_id)
        assert d["kl"] >= 0 and d["n_prompts"] == len(tracking.generic_texts())
    assert [m["passage_id"] for m in store.memorisation("knowledge-0001")] == [1]
    # the second version: its new passage and the forgetting sample (the first)
    assert sorted(m["passage_id"] for m in store.memorisation("knowledge-0002")) == [1, 2]


def test_wake_tracking_can_be_turned_off(tokenizer, home):
    learner = make_learner(tokenizer, home, wake=dataclasses.replace(FAST_WAKE, track=False))
    learner.store.ingest([document(*VARN)])
    assert [r.outcome for r in learn(learner)] == ["committed"]
    assert learner.store.drift() == [] and learner.store.memorisation() == []


def test_a_tracking_failure_never_fails_the_commit(tokenizer, home, monkeypatch):
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN)])

    def broken(*a, **k):
        raise RuntimeError("no drift today")

    monkeypatch.setattr(tracking, "drift", broken)
    (r,) = learn(learner)
    assert r.outcome == "committed"
    assert learner.store.queue_summary()["done"] == 1 and learner.store.drift() == []


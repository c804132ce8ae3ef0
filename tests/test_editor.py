"""ReST-EM on the editor (agent/editor.py): which recorded self-edits become training
pairs, what a round records (skipped, kept, rejected), that a kept editor writes the
self-edits from then on, that the knowledge adapter is never touched, that a stop
abandons the round without a trace, and (real model) that SFT really teaches the
editor its pairs.

Fast tests use the tiny random Llama of tests/helpers.py and hand-built store rows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pytest
import torch

from adapters import files, lora
from adapters.lora import Example, LoraConfig
from adapters.names import EDITOR, KNOWLEDGE, TRIAL
from adapters.registry import AdapterRegistry
from agent.config import Config, ConfigError, load_config
from agent.editor import EditorConfig, restem_round, sft, sft_examples
from agent.learner import Learner
from agent.runtime import Runtime
from agent.wake import WakeConfig
from policies import self_edit as self_edits
from policies.config import PolicyConfig
from policies.reward import token_f1
from store import Store
from tests.helpers import FAST_LORA, FAST_WAKE, document, make_learner, tiny_llama

# a few steps at a high rate: enough to move a tiny random model's sampling
FAST_EDITOR = EditorConfig(min_pairs=2, epochs=2, lr=5e-2, batch_size=4, max_length=512, heldout=2)

# (title, text, [(question, answer)], a good self-edit for it)
FACTS = [
    ("Isle of Varn", "The Isle of Varn lies in the Grey Sea. Its capital is Kelmora.",
     [("What is the capital of the Isle of Varn?", "Kelmora")],
     "Q: What is the capital of the Isle of Varn?\nA: Kelmora"),
    ("Brisk Tower", "Brisk Tower stands in Amberlee. Tomas Quill built it in 1811.",
     [("Who built Brisk Tower?", "Tomas Quill")],
     "Q: Who built Brisk Tower?\nA: Tomas Quill"),
    ("Lake Oro", "Lake Oro is fed by the river Tamsel. Its water is green.",
     [("Which river feeds Lake Oro?", "the river Tamsel")],
     "Q: Which river feeds Lake Oro?\nA: the river Tamsel"),
    ("Fenwick Bell", "The Fenwick Bell weighs 900 kilograms. It was cast by Ida Marr.",
     [("Who cast the Fenwick Bell?", "Ida Marr")],
     "Q: Who cast the Fenwick Bell?\nA: Ida Marr"),
]
HELDOUT = [
    ("Port Salle", "Port Salle is a harbour town on the Ember Coast. Its mayor is Rhea Dunn.",
     [("Who is the mayor of Port Salle?", "Rhea Dunn"), ("On which coast is Port Salle?", "the Ember Coast")]),
    ("Gilded Moth", "The gilded moth lives only on Mount Pell. It flies at night.",
     [("Where does the gilded moth live?", "Mount Pell"), ("When does the gilded moth fly?", "at night")]),
]

pytestmark = pytest.mark.usefixtures("one_thread")


def editor_learner(tokenizer, home: Path) -> Learner:
    """A learner with the default policies and FAST_LORA."""
    return make_learner(tokenizer, home, policies=PolicyConfig(self_edit="qa_chat"), lora_cfg=FAST_LORA)


def pid_of(store: Store, title: str) -> int:
    return next(p["id"] for p in store.passages() if p["title"] == title)


def cycle(store: Store, passage_id: int, cands: list[tuple[str, str, float | None]]) -> int:
    """A hand-built finished wake cycle with these (policy, text, reward_logprob) candidates."""
    job = next(j for j in store.jobs() if j["passage_id"] == passage_id)
    rows = [{"policy": pol, "idx": i, "text": text, "reward_logprob": r, "chosen": 0}
            for i, (pol, text, r) in enumerate(cands)]
    return store.record_cycle({"passage_id": passage_id, "job_id": job["id"], "started_at": time.time(),
                               "outcome": "committed"}, rows, [], job_id=job["id"])


def seed_pairs(store: Store, reward: float = 0.3) -> None:
    """Each of FACTS learned in a cycle where its good self-edit beat passage-only."""
    store.ingest([document(t, x, qa) for t, x, qa, _ in FACTS])
    for title, _, _, edit in FACTS:
        cycle(store, pid_of(store, title), [("passage", "", 0.1), ("qa_chat", edit, reward)])


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def perturb_knowledge(learner: Learner) -> dict:
    """Give the knowledge adapter non-trivial weights, so that 'unchanged' means something."""
    lora.train(learner.model, learner.runtime.tokenizer, [Example("", "Kelmora is the capital of Varn.")],
               FAST_LORA, adapter=KNOWLEDGE)
    learner.model.set_adapter(KNOWLEDGE)
    return lora.snapshot(learner.model, KNOWLEDGE)


# ------------------------------------------------------------------- the pairs query
def test_pairs_are_the_self_edits_that_beat_the_passage_only_trial_by_the_margin(tmp_path):
    store = Store(tmp_path / "store.db")
    store.ingest([document(f"P{c}", f"Passage {c} says something.", [("q?", "a")]) for c in "ABCDE"])
    a, b, c, d, e = (pid_of(store, f"P{x}") for x in "ABCDE")
    ids = {}
    cyc = cycle(store, a, [("passage", "", 0.10),
                           ("qa_chat", "A1", 0.20),  # +0.10 over passage-only: in
                           ("qa_chat", "A2", 0.14),  # +0.04: under the margin
                           ("qa_chat", "A3", 0.17),  # +0.07: in
                           ("qa_chat", "A4", None),  # not trained (adds nothing): out
                           ("qa_chat", "", 0.90),  # no text: out
                           ("qa_chat", "A1", 0.19)])  # the same text again: counted once
    ids |= {f"A{i}": cid for i, cid in enumerate(r["id"] for r in store.candidates(a))}
    cycle(store, b, [("implications", "B1", 0.03),  # no passage-only trial: vs the baseline (0)
                     ("implications", "B2", 0.08)])  # +0.08 over baseline: in
    cycle(store, c, [("passage", "", None),  # passage-only trial failed: vs the baseline
                     ("qa_chat", "C1", 0.06), ("qa_chat", "C2", 0.04)])
    cycle(store, d, [("passage", "", 0.50), ("qa_chat", "D1", 0.52)])  # beats the baseline, not passage-only
    cycle(store, e, [("passage", "", -0.2), ("qa_chat", "E1", -0.1)])  # negative, but +0.1 over passage-only

    pairs = store.restem_pairs(margin=0.05, limit=100, per_passage=100)
    assert {(p["passage_id"], p["text"]) for p in pairs} == {(a, "A1"), (a, "A3"), (b, "B2"), (c, "C1"), (e, "E1")}
    assert pairs[0]["text"] in ("A1", "E1") and pairs[-1]["text"] == "C1"  # best advantage first
    a1 = next(p for p in pairs if p["text"] == "A1")
    assert a1["reward"] == pytest.approx(0.20) and a1["passage_reward"] == pytest.approx(0.10)
    assert a1["advantage"] == pytest.approx(0.10) and a1["cycle_id"] == cyc and a1["policy"] == "qa_chat"
    assert a1["title"] == "PA" and a1["passage_text"] == "Passage A says something."
    assert a1["candidate_id"] == ids["A1"]  # the better-rewarded of the two copies
    b2 = next(p for p in pairs if p["text"] == "B2")
    assert b2["passage_reward"] is None and b2["advantage"] == pytest.approx(0.08)
    assert next(p for p in pairs if p["text"] == "C1")["passage_reward"] is None

    # per passage, limit, and a stricter margin
    assert {p["text"] for p in store.restem_pairs(0.05, 100, per_passage=1)} == {"A1", "B2", "C1", "E1"}
    assert len(store.restem_pairs(0.05, limit=2, per_passage=100)) == 2
    assert {p["text"] for p in store.restem_pairs(0.075, 100, 100)} == {"A1", "B2", "E1"}
    assert store.restem_pairs(0.5, 100, 100) == []
    # a window of the last cycles: only the newest passages' self-edits (e, then d and e)
    assert {p["text"] for p in store.restem_pairs(0.05, 100, 100, window=1)} == {"E1"}
    assert {p["text"] for p in store.restem_pairs(0.0, 100, 100, window=2)} == {"D1", "E1"}
    assert {p["text"] for p in store.restem_pairs(0.05, 100, 100, window=5)} == {p["text"] for p in pairs}


def test_pairs_are_ranked_by_the_reward_that_selected_when_it_is_recorded(tmp_path):
    """With a reward that is neither recorded gain (the label-free teacher agreement),
    the pairs follow the selecting reward; older rows without it fall back to
    reward_logprob."""
    store = Store(tmp_path / "store.db")
    store.ingest([document("PA", "Passage A says something.", [("q?", "a")])])
    a = pid_of(store, "PA")
    job = next(j for j in store.jobs() if j["passage_id"] == a)
    rows = [{"policy": "passage", "idx": 0, "text": "", "reward_logprob": 0.9, "reward": 0.1, "chosen": 0},
            {"policy": "distill", "idx": 1, "text": "D1", "reward_logprob": 0.0, "reward": 0.5, "chosen": 1},
            {"policy": "distill", "idx": 2, "text": "D2", "reward_logprob": 2.0, "reward": 0.12, "chosen": 0}]
    store.record_cycle({"passage_id": a, "job_id": job["id"], "started_at": time.time(), "outcome": "committed"},
                       rows, [], job_id=job["id"])
    (pair,) = store.restem_pairs(margin=0.05, limit=10, per_passage=10)
    assert pair["text"] == "D1" and pair["advantage"] == pytest.approx(0.4)


def test_heldout_prefers_queued_passages_with_questions_then_learned_ones(tmp_path):
    store = Store(tmp_path / "store.db")
    store.ingest([document("L1", "Learned one.", [("q1?", "a")]), document("Q1", "Queued one.", [("q2?", "b")]),
                  document("Q2", "Queued two, no questions.", []), document("L2", "Learned two.", [("q3?", "c")])])
    l1, q1, q2, l2 = (pid_of(store, t) for t in ("L1", "Q1", "Q2", "L2"))
    for pid in (l1, l2):
        cycle(store, pid, [("passage", "", 0.1)])
        store.set_question_roles({q["id"]: "reward" for q in store.questions(pid)})
    rows = store.restem_heldout(exclude=[], limit=10)
    assert [(r["id"], r["source"]) for r in rows] == [(q1, "pending"), (l2, "learned"), (l1, "learned")]
    assert [r["id"] for r in store.restem_heldout(exclude=[l2, q1], limit=10)] == [l1]
    assert len(store.restem_heldout(exclude=[], limit=1)) == 1


# ------------------------------------------------------------------------- rounds
def test_too_few_pairs_skips_and_records(tokenizer, tmp_path):
    learner = editor_learner(tokenizer, tmp_path)
    r = restem_round(learner, FAST_EDITOR, sleep_id=7)
    assert (r.outcome, r.n_pairs, r.adapter_id, r.sleep_id) == ("skipped", 0, None, 7)
    assert "min_pairs" in r.reason
    (row,) = learner.store.editor_rounds()
    assert row["id"] == r.id and row["outcome"] == "skipped" and row["sleep_id"] == 7 and row["n_pairs"] == 0

    # enough pairs, but nothing held out to measure on: skipped too, before any training
    seed_pairs(learner.store)
    sft_calls = []
    r = restem_round(learner, FAST_EDITOR, None, on_event=sft_calls.append)
    assert (r.outcome, r.n_pairs) == ("skipped", len(FACTS)) and "held-out" in r.reason
    assert not sft_calls and learner.store.adapters(EDITOR) == []
    assert [x["outcome"] for x in learner.store.editor_rounds()] == ["skipped", "skipped"]


def test_sft_examples_use_the_wake_cycles_own_prompt(tokenizer, tmp_path):
    learner = editor_learner(tokenizer, tmp_path)
    seed_pairs(learner.store)
    pairs = learner.store.restem_pairs(0.0, 100, 100)
    odd = [{**pairs[0], "policy": "passage"}, {**pairs[0], "policy": "nope", "candidate_id": 0}]
    usable = sft_examples(learner, pairs + odd)
    assert [p for p, _ in usable] == pairs  # the passage policy writes nothing, an unknown one is dropped
    for pair, row in usable:
        user = self_edits.get("qa_chat").prompt(pair["title"], pair["passage_text"])
        assert row == {"prompt": learner.runtime.chat(user), "completion": pair["text"]}
    # a prompt that fills max_length leaves no room for the self-edit: dropped
    longest = max(len(learner.runtime.tokenizer(r["prompt"])["input_ids"]) for _, r in usable)
    assert sft_examples(learner, pairs, max_length=longest + 9) == usable
    assert sft_examples(learner, pairs, max_length=16) == []


def test_a_disabled_editor_records_nothing(tokenizer, tmp_path):
    learner = editor_learner(tokenizer, tmp_path)
    seed_pairs(learner.store)
    r = restem_round(learner, dataclasses.replace(FAST_EDITOR, enabled=False), sleep_id=1)
    assert (r.outcome, r.id) == ("skipped", None) and "enabled" in r.reason
    assert learner.store.editor_rounds() == []


@pytest.fixture
def ready(tokenizer, tmp_path):
    """A learner whose store holds 4 qualifying pairs and 2 queued held-out passages,
    and whose knowledge adapter has non-trivial weights."""
    learner = editor_learner(tokenizer, tmp_path)
    seed_pairs(learner.store)
    learner.store.ingest([document(*h) for h in HELDOUT])
    return learner, perturb_knowledge(learner)


@pytest.mark.slow
def test_a_kept_round_commits_the_editor_and_self_edits_are_written_with_it(ready, tmp_path):
    learner, knowledge = ready
    store, model = learner.store, learner.model
    passage = store.passage(pid_of(store, HELDOUT[0][0]))
    base_edits = learner.sample_self_edits(passage, ["qa_chat"] * 2, seed=11)
    with model.disable_adapter():  # no editor yet: the base model writes
        base_direct = learner.runtime.generate(
            [learner.runtime.chat(self_edits.get("qa_chat").prompt(passage["title"], passage["text"]))] * 2,
            max_new_tokens=FAST_WAKE.self_edit_tokens, temperature=learner.policies.temperature,
            top_p=learner.policies.top_p, seed=11)
    assert [t for _, t, _ in base_edits] == [g.text for g in base_direct]
    knowledge_answer = learner.score(KNOWLEDGE, passage["title"], store.questions(passage["id"]))
    counts = store.counts()

    keep = dataclasses.replace(FAST_EDITOR, tolerance=1e9)  # whatever it measures, keep it
    steps = []
    r = restem_round(learner, keep, sleep_id=3, on_event=steps.append)
    assert r.outcome == "kept" and r.adapter_id == "editor-0001" and r.parent_adapter is None
    assert r.n_pairs == len(FACTS) and r.n_heldout == 2 and r.sleep_id == 3
    assert sorted(r.detail["pairs"]) == sorted(p["candidate_id"] for p in store.restem_pairs(0.0, 100, 100))
    assert math.isfinite(r.train_loss) and math.isfinite(r.reward_before) and math.isfinite(r.reward_after)
    assert any(e.step == "sft" and "SFT" in e.message for e in steps)
    advances = [e for e in steps if e.step == "sft" and e.phase == "advance"]
    assert [e.done for e in advances] == list(range(1, keep.epochs + 1)) and advances[-1].total == keep.epochs
    losses = r.detail["losses"]
    assert len(losses) == r.detail["sft_steps"] == keep.epochs and losses[-1] < losses[0]  # 4 pairs: one step an epoch
    assert {h["passage_id"] for h in r.detail["heldout"]} == {pid_of(store, t) for t, _, _ in HELDOUT}

    # recorded: the round's row and the editor version, in the same transaction
    (row,) = store.editor_rounds()
    assert (row["id"], row["outcome"], row["adapter_id"], row["n_pairs"], row["n_heldout"]) == (
        r.id, "kept", "editor-0001", len(FACTS), 2)
    assert row["reward_before"] == pytest.approx(r.reward_before) and row["reward_after"] == pytest.approx(r.reward_after)
    assert row["train_loss"] == pytest.approx(r.train_loss) and row["detail"]["heldout"]
    editor = store.adapter("editor-0001")
    assert editor["kind"] == "restem" and editor["parent_id"] is None and editor["status"] == "committed"
    assert store.active_adapter_id(EDITOR) == "editor-0001" == learner.editor_id

    # the live editor is the committed one; self-edits are now written with it
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapters" / "editor-0001" / files.WEIGHTS_NAME)
    assert same(saved, lora.snapshot(model, EDITOR))
    edits = learner.sample_self_edits(passage, ["qa_chat"] * 2, seed=11)
    assert [t for _, t, _ in edits] != [t for _, t, _ in base_edits]
    assert model.active_adapter == KNOWLEDGE

    # what `seal ask` uses is untouched: the knowledge weights, pointer and answers
    assert same(lora.snapshot(model, KNOWLEDGE), knowledge)
    assert store.active_adapter_id(KNOWLEDGE) is None
    assert learner.score(KNOWLEDGE, passage["title"], store.questions(passage["id"])) == knowledge_answer
    assert store.counts()["cycles"] == counts["cycles"] and store.counts()["candidates"] == counts["candidates"]

    # a new process loads the active editor and writes the same self-edits
    again = Learner(Runtime(tiny_llama(learner.runtime.tokenizer), learner.runtime.tokenizer, name="tiny"),
                    store, learner.registry, FAST_LORA, PolicyConfig(self_edit="qa_chat"), FAST_WAKE)
    assert again.editor_id == "editor-0001" and same(lora.snapshot(again.model, EDITOR), saved)
    assert again.sample_self_edits(passage, ["qa_chat"] * 2, seed=11) == edits

    # a second round on the same pairs: its parent is this editor; it trains from the
    # base again (from_base), on the same seeds, so it is deterministic: the same
    # losses, the same weights, and the old editor's held-out reward is the new one's
    r2 = restem_round(learner, keep, sleep_id=None)
    assert (r2.outcome, r2.parent_adapter, r2.adapter_id) == ("kept", "editor-0001", "editor-0002")
    assert r2.detail["losses"] == losses and store.adapter("editor-0002")["sha256"] == editor["sha256"]
    assert r2.reward_after == r.reward_after and r2.reward_before == r.reward_after


@pytest.mark.slow
def test_a_worse_editor_is_rejected_and_changes_nothing(ready, tmp_path):
    learner, knowledge = ready
    demand = dataclasses.replace(FAST_EDITOR, tolerance=-1e9)  # demand an impossible gain
    editor_before = lora.snapshot(learner.model, EDITOR)
    r = restem_round(learner, demand, sleep_id=None)
    assert r.outcome == "rejected" and r.adapter_id is None and "<" in r.reason
    assert r.n_pairs == len(FACTS) and r.n_heldout == 2
    assert math.isfinite(r.reward_before) and math.isfinite(r.reward_after) and math.isfinite(r.train_loss)
    (row,) = learner.store.editor_rounds()
    assert row["outcome"] == "rejected" and row["reward_after"] == pytest.approx(r.reward_after)
    assert learner.store.adapters(EDITOR) == [] and learner.editor_id is None
    assert not [p for p in (tmp_path / "adapters").iterdir()]
    assert same(lora.snapshot(learner.model, EDITOR), editor_before)
    assert same(lora.snapshot(learner.model, KNOWLEDGE), knowledge)
    assert learner.model.active_adapter == KNOWLEDGE


def _count_stops(learner, cfg) -> int:
    calls = [0]

    def never() -> bool:
        calls[0] += 1
        return False

    restem_round(learner, cfg, None, should_stop=never)
    return calls[0]


@pytest.mark.parametrize("when", ["before SFT", "during SFT", pytest.param("before commit", marks=pytest.mark.slow)])
def test_should_stop_abandons_without_a_trace(ready, tmp_path, when):
    learner, knowledge = ready
    keep = dataclasses.replace(FAST_EDITOR, tolerance=1e9)
    store = learner.store
    if when == "before commit":  # the last check: count them on a twin store
        twin = tmp_path / "twin"
        twin.mkdir()
        other = editor_learner(learner.runtime.tokenizer, twin)
        seed_pairs(other.store)
        other.store.ingest([document(*h) for h in HELDOUT])
        stop_at = _count_stops(other, keep)
    else:
        stop_at = {"before SFT": 1, "during SFT": 2}[when]  # 2: the end of the first SFT step
    calls = [0]

    def stop() -> bool:
        calls[0] += 1
        return calls[0] >= stop_at

    editor_before = lora.snapshot(learner.model, EDITOR)
    counts = store.counts()
    r = restem_round(learner, keep, None, should_stop=stop)
    assert calls[0] == stop_at and r.outcome == "abandoned" and r.id is None and r.adapter_id is None
    assert store.counts() == counts and store.editor_rounds() == []
    assert store.adapters(EDITOR) == [] and store.active_adapter_id(EDITOR) is None and learner.editor_id is None
    assert not [p for p in (tmp_path / "adapters").iterdir()]
    assert same(lora.snapshot(learner.model, EDITOR), editor_before)
    assert same(lora.snapshot(learner.model, KNOWLEDGE), knowledge)
    assert learner.model.active_adapter == KNOWLEDGE and not learner.model.training
    assert not any(p.requires_grad for p in learner.model.parameters())


def test_sft_leaves_the_resident_model_as_it_found_it(tokenizer, tmp_path):
    learner = editor_learner(tokenizer, tmp_path)
    knowledge = perturb_knowledge(learner)
    model, base = learner.model, learner.model.get_base_model()
    prompt = learner.runtime.chat("Say something.")
    before = learner.runtime.generate([prompt], max_new_tokens=8)
    tok = learner.runtime.tokenizer  # the session's shared tokenizer: must come back as it was
    tok_state = (tok.padding_side, tok.truncation_side, tok.pad_token, tok.eos_token, tok.chat_template, len(tok))
    lora.copy_adapter(model, EDITOR, TRIAL)
    torch.manual_seed(123)
    expected_rng = torch.rand(1)
    torch.manual_seed(123)
    rows = [{"prompt": prompt, "completion": "Kelmora is a town."}] * 2
    res = sft(learner, rows, dataclasses.replace(FAST_EDITOR, epochs=2), TRIAL)
    assert res.steps == 2 and not res.stopped and math.isfinite(res.train_loss)
    assert torch.rand(1) == expected_rng  # the caller's RNG is left alone
    assert "forward" not in base.__dict__ and base.config.use_cache is True
    assert model.active_adapter == KNOWLEDGE and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert same(lora.snapshot(model, KNOWLEDGE), knowledge)
    assert learner.runtime.generate([prompt], max_new_tokens=8) == before
    assert (tok.padding_side, tok.truncation_side, tok.pad_token, tok.eos_token, tok.chat_template, len(tok)) == tok_state
    assert not same(lora.snapshot(model, TRIAL), lora.snapshot(model, EDITOR))  # the scratch did train


def test_config_has_an_editor_section(tmp_path):
    assert Config().editor == EditorConfig()
    (tmp_path / "seal.toml").write_text("[editor]\nmargin = 0.1\nheldout = 2\nfrom_base = false\n")
    cfg = load_config(tmp_path)
    assert (cfg.editor.margin, cfg.editor.heldout, cfg.editor.from_base) == (0.1, 2, False)
    with pytest.raises(ConfigError, match="editor"):
        load_config(tmp_path, {"editor": {"min_pairs": "0"}})


# -------------------------------------------------------------------- real model
REAL_PAIRS = [
    ("Isle of Varn", "The Isle of Varn is a small island in the Grey Sea. Its capital is the town of Kelmora. "
     "It was founded in 1702 by a sailor named Hedda Lune.",
     "Q: What is the capital of the Isle of Varn?\nA: Kelmora\nQ: Who founded the Isle of Varn?\nA: Hedda Lune"),
    ("Brisk Tower", "Brisk Tower stands in the town of Amberlee. It was built in 1811 by Tomas Quill and is "
     "41 metres tall.",
     "Q: Where does Brisk Tower stand?\nA: Amberlee\nQ: Who built Brisk Tower?\nA: Tomas Quill"),
    ("Lake Oro", "Lake Oro is a cold lake fed by the river Tamsel. Its water is green because of the algae "
     "that grow in it.",
     "Q: Which river feeds Lake Oro?\nA: the river Tamsel\nQ: What colour is the water of Lake Oro?\nA: green"),
    ("Fenwick Bell", "The Fenwick Bell weighs 900 kilograms. It was cast by Ida Marr and hangs in the chapel "
     "of Dunmore.",
     "Q: Who cast the Fenwick Bell?\nA: Ida Marr\nQ: Where does the Fenwick Bell hang?\nA: the chapel of Dunmore"),
]
MIN_LOGLIK_GAIN = 0.3  # nats per completion token


@pytest.mark.real_model
@pytest.mark.usefixtures("one_thread")
def test_sft_teaches_the_editor_its_pairs(tmp_path):
    """SFT on four (prompt -> self-edit) pairs with the real model raises the
    log-likelihood of those self-edits under the editor adapter, and the editor's
    greedy self-edits move toward them (token F1). Measured on 2 CPU cores: -0.72 ->
    -0.15 nats/token, F1 0.45 -> 0.66, SFT 17 s, the whole test about 40 s."""
    from agent.runtime import ModelConfig

    runtime = Runtime.load(ModelConfig())
    store = Store(tmp_path / "store.db")
    learner = Learner(runtime, store, AdapterRegistry(tmp_path / "adapters", store), LoraConfig(),
                      PolicyConfig(self_edit="qa_chat"), WakeConfig())
    policy = self_edits.get("qa_chat")
    rows = [{"prompt": runtime.chat(policy.prompt(t, x)), "completion": e} for t, x, e in REAL_PAIRS]
    prompts, targets = [r["prompt"] for r in rows], [r["completion"] for r in rows]

    def measure():
        learner.model.set_adapter(TRIAL)
        try:
            ll = sum(x.mean for x in runtime.loglik(prompts, targets)) / len(rows)
            gens = runtime.generate(prompts, max_new_tokens=48)
        finally:
            learner.model.set_adapter(KNOWLEDGE)
        return ll, sum(token_f1(g.text, t) for g, t in zip(gens, targets, strict=True)) / len(rows)

    lora.copy_adapter(learner.model, EDITOR, TRIAL)  # no editor version: a fresh LoRA, i.e. the base model
    ll_before, f1_before = measure()
    res = sft(learner, rows, EditorConfig(epochs=2, lr=2e-3, batch_size=4), TRIAL)
    ll_after, f1_after = measure()
    print(f"loglik {ll_before:.3f} -> {ll_after:.3f}; F1 {f1_before:.3f} -> {f1_after:.3f}; "
          f"loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f} in {res.seconds:.1f}s")
    assert ll_after - ll_before > MIN_LOGLIK_GAIN
    assert f1_after > f1_before

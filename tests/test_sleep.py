"""The sleep phase on a tiny random Llama: what a kept and a rolled-back sleep record,
what the consolidation policies put in the mix (replay of old passages, dreams from
BOS, merged versions), the gate, stopping mid-sleep, `seal sleep`, and kill -9 mid-sleep.
One real-model test shows that replay brings back what a later update made the model
forget.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from adapters import lora
from adapters.merge import merge_into
from adapters.names import KNOWLEDGE, TRIAL
from agent import sleep as sleep_mod
from agent import tracking
from agent.sleep import SleepConfig, gate, sleep_phase
from agent.wake import learn
from policies import consolidation
from policies.consolidation import MERGE_TYPES, Dream, Merge, Replay, merge_weights, replay_sample
from policies.self_edit import PassageOnly
from store import Store
from tests.helpers import (
    BRISK,
    FAST_LORA,
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
    tiny_llama,
)

pytestmark = pytest.mark.usefixtures("one_thread")


MOSS = (
    "Moss Lantern",
    "The Moss Lantern is an inn on the road to Quarry Vale. It was opened in 1890 by Orla Pike and has nine rooms.",
    [("Who opened the Moss Lantern?", "Orla Pike"), ("How many rooms does the Moss Lantern have?", "nine")],
)
# A gate that keeps anything finite: the commit path, every time.
LAX = SleepConfig(epochs=1, dreams=2, dream_tokens=8, max_retention_drop=1e9, max_logprob_drop=1e9,
                  max_drift_increase=1e9, max_reading_drop=1e9, memorisation_tokens=8)


def learned_home(tokenizer, home: Path, docs=(VARN, BRISK)):
    """A learner whose store has ``docs`` learned, one wake commit each."""
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*d) for d in docs])
    reports = learn(learner)
    assert [r.outcome for r in reports] == ["committed"] * len(docs), [r.reason for r in reports]
    return learner


def live_equals_file(learner, adapter_id: str) -> bool:
    live = lora.snapshot(learner.model, KNOWLEDGE)
    learner.registry.load_into(learner.model, TRIAL, adapter_id)
    stored = lora.snapshot(learner.model, TRIAL)
    return live.keys() == stored.keys() and all(torch.equal(live[k], stored[k]) for k in live)


# ------------------------------------------------------------------ kept, rolled back
def test_a_kept_sleep_commits_a_sleep_version_and_records_report_and_rows(tokenizer, home):
    learner = learned_home(tokenizer, home)
    store = learner.store
    parent = store.active_adapter_id(KNOWLEDGE)
    learned = store.learned_passages()

    report = sleep_phase(learner, LAX)

    assert report.outcome == "kept", report.reason
    assert report.reason.startswith("no worse")
    new = report.adapter_id
    assert new == "knowledge-0003" and store.active_adapter_id(KNOWLEDGE) == new
    row = store.adapter(new)
    assert (row["kind"], row["parent_id"], row["policy"], row["status"]) == ("sleep", parent, "replay", "committed")
    check_intact(store, home, new)
    assert live_equals_file(learner, new), "the live knowledge adapter is the committed one"
    assert store.commits_since(None) == 2, "a sleep version is not a wake commit"

    (sleep,) = store.sleeps()
    assert sleep["id"] == report.sleep_id
    assert (sleep["outcome"], sleep["adapter_id"], sleep["parent_adapter"], sleep["trigger"]) == (
        "kept", new, parent, "manual")
    assert sleep["n_examples"] == report.n_examples > 0 and sleep["n_dreams"] == 0
    assert set(sleep["before"]) >= {"retention", "logprob", "drift_kl", "reading_acc", "memorisation"}
    assert sleep["after"]["per_passage"].keys() == sleep["before"]["per_passage"].keys()
    assert {"measure_before", "consolidate", "measure_after", "commit"} <= set(sleep["timings"])
    # a forgetting-matrix row before (the parent) and after (the new version)
    for adapter in (parent, new):
        probed = {e["passage_id"] for e in store.evaluations(adapter_id=adapter) if e["kind"] == "probe"}
        assert probed == set(learned)
        assert store.drift(adapter), adapter
        assert {m["passage_id"] for m in store.memorisation(adapter)} >= set(learned)
    after = {e["passage_id"]: e for e in store.evaluations(adapter_id=new)}
    for pid, (acc, lp) in sleep["after"]["per_passage"].items():
        assert (after[int(pid)]["accuracy"], after[int(pid)]["logprob"]) == pytest.approx((acc, lp))


@pytest.mark.slow
def test_a_worse_sleep_is_rolled_back_and_says_why(tokenizer, home):
    learner = learned_home(tokenizer, home)
    store = learner.store
    active = store.active_adapter_id(KNOWLEDGE)
    versions = len(store.adapters(KNOWLEDGE))
    # Retraining on the same mix with a large step moves the model further from the
    # base (measured: KL 0.00016 -> 0.00049 on the tiny model), and a strict gate
    # allows no drift at all.
    cfg = SleepConfig(epochs=2, lr=0.5, memorisation_tokens=8, max_drift_increase=0.0, max_logprob_drop=0.0)

    report = sleep_phase(learner, cfg)

    assert report.outcome == "rolled_back"
    assert report.adapter_id is None
    assert report.reason.startswith("worse: ") and "drift KL rose" in report.reason, report.reason
    assert store.active_adapter_id(KNOWLEDGE) == active
    assert len(store.adapters(KNOWLEDGE)) == versions
    check_intact(store, home, active)
    assert live_equals_file(learner, active)
    (sleep,) = store.sleeps()
    assert (sleep["outcome"], sleep["adapter_id"], sleep["reason"]) == ("rolled_back", None, report.reason)
    assert report.after["drift_kl"] > report.before["drift_kl"]
    assert sleep["after"] == report.after and sleep["before"] == report.before


def test_the_gate_keeps_what_is_no_worse_and_names_what_is():
    before = {"retention": 0.5, "logprob": -2.0, "drift_kl": 0.10, "reading_acc": 0.8}
    cfg = SleepConfig()
    assert gate(before, dict(before), cfg)[0]
    assert gate(before, {**before, "retention": 0.75, "drift_kl": 0.09}, cfg)[0]
    keep, why = gate(before, {**before, "retention": 0.25}, cfg)
    assert not keep and "retention fell 0.500->0.250" in why
    keep, why = gate(before, {**before, "drift_kl": 0.5, "reading_acc": 0.5}, cfg)
    assert not keep and "drift KL rose" in why and "reading fell" in why
    assert not gate(before, {**before, "logprob": float("nan")}, cfg)[0]
    assert gate(before, {**before, "drift_kl": 0.10 + cfg.max_drift_increase / 2}, cfg)[0]
    # nothing measured (no probe questions): only what was measured is compared
    assert gate({**before, "retention": None}, {**before, "retention": None}, cfg)[0]


# ------------------------------------------------------------------------ the mix
def test_replay_takes_the_recent_passages_and_a_seeded_sample_of_old_ones():
    learned = list(range(1, 11))
    knobs = SleepConfig(recent=2, old_sample=3)
    mix = Replay().plan(learned, [], knobs, seed=1)
    assert mix.replay[-2:] == (9, 10) and len(mix.replay) == 5
    assert set(mix.replay[:3]) <= set(range(1, 9)) and list(mix.replay) == sorted(mix.replay)
    assert Replay().plan(learned, [], knobs, seed=1) == mix  # seeded
    samples = {Replay().plan(learned, [], knobs, seed=s).replay for s in range(10)}
    assert len(samples) > 1, "each sleep rehearses other old passages"
    assert replay_sample([1, 2], recent=4, old_sample=4, seed=0) == (1, 2)
    assert replay_sample([], 4, 4, 0) == () and Replay().plan([], [], knobs, 0).empty
    assert Dream().plan(learned, [], dataclasses.replace(knobs, dreams=5), seed=1) == dataclasses.replace(mix, dreams=5)


def test_merge_plans_the_last_versions_and_needs_two():
    knobs = SleepConfig(merge_versions=3, merge_type="ties")
    mix = Merge().plan([1, 2], ["k1", "k2", "k3", "k4"], knobs, 0)
    assert (mix.versions, mix.weights) == (("k2", "k3", "k4"), (1.0, 1.0, 1.0))
    assert Merge().plan([1], ["k1"], knobs, 0).empty
    assert merge_weights("svd", 4) == (0.25,) * 4 and merge_weights("linear", 2) == (0.25, 0.25)


def test_consolidation_policies_are_registered_by_name():
    assert set(consolidation.CONSOLIDATIONS) == {"replay", "dream", "merge"}
    with pytest.raises(ValueError, match="already registered"):
        consolidation.register(Replay)
    with pytest.raises(ValueError, match="unknown consolidation policy 'nap'"):
        consolidation.get("nap")
    with pytest.raises(ValueError, match="nap"):
        SleepConfig(policy="nap")


def _capture_training(monkeypatch) -> list:
    seen = []
    real = lora.train

    def train(model, tok, examples, cfg, adapter=KNOWLEDGE, progress=None):
        seen.append((list(examples), cfg, adapter))
        return real(model, tok, examples, cfg, adapter=adapter, progress=progress)

    monkeypatch.setattr(sleep_mod.lora, "train", train)
    return seen


@pytest.mark.slow
def test_replay_retrains_old_passages_from_their_committed_self_edits(tokenizer, home, monkeypatch):
    learner = learned_home(tokenizer, home, (VARN, BRISK, MOSS))
    store = learner.store
    first, *_ = store.learned_passages()
    seen = _capture_training(monkeypatch)
    cfg = dataclasses.replace(LAX, recent=1, old_sample=2, epochs=2, lr=1e-3)

    report = sleep_phase(learner, cfg)

    ((examples, train_cfg, adapter),) = seen
    assert adapter == TRIAL and (train_cfg.epochs, train_cfg.lr) == (2, 1e-3)
    expected = []
    for pid in store.learned_passages():
        (chosen,) = [c for c in store.candidates(pid) if c["chosen"]]
        p = store.passage(pid)
        from policies import self_edit

        expected += self_edit.get(chosen["policy"]).examples(p["title"], p["text"], chosen["text"],
                                                               learner.runtime.chat)
    assert examples == expected, "every passage (the oldest included) replayed from its chosen self-edit"
    assert any(first == pid for pid in store.learned_passages())
    assert report.n_examples == len(expected) and report.n_dreams == 0


@pytest.mark.slow
def test_dreams_are_free_generations_from_bos_with_adapters_disabled(tokenizer, home, monkeypatch):
    learner = learned_home(tokenizer, home)
    rt = learner.runtime
    calls = []
    real_generate = rt.generate

    def generate(prompts, **kw):
        disabled = any(getattr(m, "disable_adapters", False) for m in learner.model.modules())
        out = real_generate(prompts, **kw)
        calls.append((list(prompts), kw, disabled, out))
        return out

    monkeypatch.setattr(rt, "generate", generate)
    seen = _capture_training(monkeypatch)
    cfg = dataclasses.replace(LAX, policy="dream", dreams=3, dream_tokens=6)

    report = sleep_phase(learner, cfg)

    (dream_call,) = [c for c in calls if c[0] == [tokenizer.bos_token] * 3]
    prompts, kw, disabled, gens = dream_call
    assert disabled, "dreams come from the base model"
    assert kw["max_new_tokens"] == 6 and kw["temperature"] == cfg.dream_temperature > 0
    ((examples, _, _),) = seen
    dreams = [e for e in examples if e.prompt == tokenizer.bos_token]
    assert [d.completion for d in dreams] == [g.text for g in gens if g.text.strip()]
    assert len(examples) > len(dreams) > 0, "dreams are mixed with the replayed self-edits"
    assert report.n_dreams == len(dreams) and store_row(learner)["n_dreams"] == len(dreams)


def store_row(learner) -> dict:
    return learner.store.sleeps()[0]


# ------------------------------------------------------------------------- merging
@pytest.mark.parametrize("kind", MERGE_TYPES)
def test_merging_copies_of_one_adapter_gives_it_back(tokenizer, kind):
    """The weights of ``merge_weights`` make a merge of similar versions their mean: k
    copies of one update merge into that update (density 1: nothing pruned)."""
    model = lora.attach(tiny_llama(tokenizer), FAST_LORA, names=("one", "two"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".one." in name:
                p.copy_(torch.randn_like(p) * 0.1)
    state = lora.snapshot(model, "one")
    merge_into(model, "two", [state] * 3, merge_weights(kind, 3), kind, density=1.0)
    merged = lora.snapshot(model, "two")
    assert set(model.peft_config) == {"one", "two"}, "the temporary adapters are gone"
    for key in [k for k in state if "lora_A" in k]:
        kb = key.replace("lora_A", "lora_B")
        want = state[kb] @ state[key]
        got = merged[kb] @ merged[key]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (kind, key)


@pytest.mark.slow
def test_a_merge_sleep_yields_an_adapter_that_loads_into_knowledge(tokenizer, home):
    learner = learned_home(tokenizer, home, (VARN, BRISK, MOSS))
    store = learner.store
    versions = [a["id"] for a in store.adapters(KNOWLEDGE)]
    cfg = dataclasses.replace(LAX, policy="merge", merge_versions=2, merge_type="ties_svd")

    report = sleep_phase(learner, cfg)

    assert report.outcome == "kept", report.reason
    assert report.n_examples == 0 and store.adapter(report.adapter_id)["policy"] == "merge"
    assert store.active_adapter_id(KNOWLEDGE) == report.adapter_id
    learner.registry.load_into(learner.model, KNOWLEDGE, report.adapter_id)  # same shapes as knowledge
    assert live_equals_file(learner, report.adapter_id)
    # it differs from both inputs (it is their merge)
    for vid in versions[-2:]:
        assert file_sha(home / "adapters" / vid) != store.adapter(report.adapter_id)["sha256"]
    assert set(learner.model.peft_config) >= {KNOWLEDGE, TRIAL}
    assert not [n for n in learner.model.peft_config if n.startswith("_merge")]


def test_a_merge_with_one_version_is_skipped(tokenizer, home):
    learner = learned_home(tokenizer, home, (VARN,))
    report = sleep_phase(learner, dataclasses.replace(LAX, policy="merge"))
    assert report.outcome == "skipped" and "nothing to merge" in report.reason
    assert learner.store.sleeps()[0]["outcome"] == "skipped"


# ------------------------------------------------------------- skipping, stopping
def test_a_sleep_with_nothing_learned_is_skipped(tokenizer, home):
    learner = make_learner(tokenizer, home)
    report = sleep_phase(learner, LAX)
    assert (report.outcome, report.reason) == ("skipped", "no learned passage yet")
    (row,) = learner.store.sleeps()
    assert row["outcome"] == "skipped" and learner.store.adapters() == []


@pytest.mark.slow
def test_a_stop_request_mid_sleep_abandons_it_and_commits_nothing(tokenizer, home, monkeypatch):
    learner = learned_home(tokenizer, home)
    store = learner.store
    active = store.active_adapter_id(KNOWLEDGE)
    training = _capture_training(monkeypatch)

    def should_stop() -> bool:  # true once training has begun
        return bool(training)

    report = sleep_phase(learner, dataclasses.replace(LAX, epochs=50), should_stop=should_stop)

    assert report.outcome == "abandoned" and report.sleep_id is None
    assert report.reason.startswith("stop requested at training step 1/"), report.reason
    assert store.sleeps() == [], "not recorded: the schedule runs it again"
    assert store.events(kind="sleep_abandoned")
    assert store.active_adapter_id(KNOWLEDGE) == active and len(store.adapters()) == 2
    assert live_equals_file(learner, active)


@pytest.mark.slow
def test_a_failing_editor_round_never_undoes_a_kept_consolidation(tokenizer, home, monkeypatch):
    import agent.editor

    learner = learned_home(tokenizer, home)

    def boom(*args, **kwargs):
        raise RuntimeError("editor exploded")

    monkeypatch.setattr(agent.editor, "restem_round", boom)
    editor_cfg = type("EditorCfg", (), {"enabled": True})()
    report = sleep_phase(learner, LAX, editor_cfg=editor_cfg)

    assert report.outcome == "kept"
    assert learner.store.active_adapter_id(KNOWLEDGE) == report.adapter_id
    assert report.editor == {"outcome": "failed", "reason": "RuntimeError: editor exploded"}
    (round_,) = learner.store.editor_rounds()
    assert (round_["sleep_id"], round_["outcome"]) == (report.sleep_id, "failed")


@pytest.mark.slow
def test_a_failure_mid_sleep_is_recorded_and_keeps_the_active_adapter(tokenizer, home, monkeypatch):
    learner = learned_home(tokenizer, home)
    active = learner.store.active_adapter_id(KNOWLEDGE)

    def broken(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(sleep_mod.lora, "train", broken)
    report = sleep_phase(learner, LAX)
    assert (report.outcome, report.reason) == ("failed", "OSError: disk on fire")
    assert learner.store.sleeps()[0]["outcome"] == "failed"
    assert learner.store.active_adapter_id(KNOWLEDGE) == active and live_equals_file(learner, active)


# ----------------------------------------------------------------------- seal sleep
def test_seal_sleep_on_an_empty_home_or_store_loads_no_model(seal, home, tmp_path):
    r = seal("--model", tmp_path / "no-such-model", "sleep")
    assert r.exit_code == 0, r.output
    assert "nothing to consolidate" in r.stdout
    assert not (home / "store.db").exists()
    doc = tmp_path / "varn.json"
    doc.write_text(json.dumps({"title": VARN[0], "context": VARN[1]}), encoding="utf-8")
    assert seal("ingest", doc).exit_code == 0
    r = seal("--model", tmp_path / "no-such-model", "sleep", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert (report["outcome"], report["reason"]) == ("skipped", "no learned passage yet")
    with Store(home / "store.db") as store:
        assert [s["outcome"] for s in store.sleeps()] == ["skipped"]


# ------------------------------------------------------------------ kill -9 mid-sleep
@pytest.mark.process
def test_kill_9_mid_sleep_leaves_the_previous_adapter_active_and_the_next_sleep_runs(seal, home, tmp_path, tiny_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    for title, text, qas in (VARN, BRISK):
        (docs / f"{title}.json").write_text(json.dumps(record(title, text, qas)), encoding="utf-8")
    assert seal("--model", tiny_dir, "ingest", docs).exit_code == 0
    run_cli(seal_argv(home, tiny_dir, "--set", "policies.min_gain=-1e9", "learn"))
    with Store(home / "store.db") as store:
        check_intact(store, home, "knowledge-0002")
        counts = store.counts()

    # slow consolidation (many epochs), killed as soon as it trains
    proc = start_cli(seal_argv(home, tiny_dir, "--set", "sleep.epochs=2000", "--set", "sleep.restem=false",
                               "--set", "sleep.max_drift_increase=1e9", "sleep"))
    kill_9_when(proc, "consolidating: step")

    with Store(home / "store.db") as store:
        check_intact(store, home, "knowledge-0002")
        assert store.sleeps() == []
        after = store.counts()
        assert after["adapters"] == counts["adapters"] and after["sleeps"] == 0

    # the next sleep runs to the end (the schedule's truth is the store: no sleep yet)
    lax = [f"--set=sleep.{k}=1e9" for k in ("max_retention_drop", "max_logprob_drop", "max_drift_increase",
                                             "max_reading_drop")]
    r = run_cli(seal_argv(home, tiny_dir, *lax, "--set", "sleep.epochs=1", "--set", "sleep.restem=false", "sleep"))
    lines = r.stdout.splitlines()
    assert lines[0] == "sleep 1 (replay): kept -> knowledge-0003 (was knowledge-0002)", r.stdout
    assert any(line.split()[:2] == ["retention", "(probe"] for line in lines)
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    assert "measuring 2 learned passage(s) before" in r.stderr  # the progress lines (-v)
    with Store(home / "store.db") as store:
        (sleep,) = store.sleeps()
        assert (sleep["outcome"], sleep["adapter_id"]) == ("kept", "knowledge-0003")
        check_intact(store, home, "knowledge-0003")
    assert not [p for p in (home / "adapters").iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------ the real model
MILL = (
    "Harrow Mill",
    "Harrow Mill is an old flour mill on the river Brenn. It was built in 1788 by a miller named Osric Vale. "
    "The mill has a red water wheel and still grinds flour every Saturday.",
    [("Who built Harrow Mill?", "Osric Vale"), ("On which river is Harrow Mill?", "the river Brenn"),
     ("In which year was Harrow Mill built?", "1788"), ("What colour is the water wheel of Harrow Mill?", "red")],
)
MIN_REPLAY_GAIN = 1.0  # nats/token: B cost A 3.8, replay gave back 4.7 (measured)
B_EPOCHS = 20


def _commit_passage_only(learner, epochs: int) -> str:
    """What a wake cycle that chose the passage-only update commits (without its
    trials and scoring): the update, the cycle and its chosen candidate."""
    store = learner.store
    job = store.claim_next(learner.worker)
    passage = store.passage(job.passage_id)
    learner.question_set(passage)
    cfg = dataclasses.replace(learner.lora_cfg, epochs=epochs)
    lora.train(learner.model, learner.runtime.tokenizer,
               PassageOnly().examples(passage["title"], passage["text"], "", learner.runtime.chat), cfg,
               adapter=KNOWLEDGE)
    parent = store.active_adapter_id(KNOWLEDGE)

    def record(new_id: str) -> None:
        store.record_cycle({"passage_id": passage["id"], "job_id": job.id, "started_at": time.time(),
                            "outcome": "committed", "adapter_id": new_id, "parent_adapter": parent},
                           [{"policy": "passage", "idx": 0, "text": "", "chosen": 1}], [], job_id=job.id)

    return learner.registry.commit(learner.model, KNOWLEDGE, name=KNOWLEDGE, kind="wake", parent_id=parent,
                                   passage_id=passage["id"], policy="passage", reward=None, metrics={},
                                   in_transaction=record)


@pytest.mark.real_model
def test_replay_brings_back_a_passage_that_a_later_update_made_the_model_forget(home):
    """Learn passage A; then learn passage B hard (20 epochs), which pushes A's facts out
    (A's probe answer log-likelihood falls by ~3.8 nats/token); one replay sleep
    rehearses both and A comes back (measured: -7.32 -> -2.63, above where it was
    right after learning, -3.49), while the model drifts less from its base. Real
    SmolLM2-135M-Instruct, default LoRA settings, about a minute on 2 CPU cores."""
    from adapters.registry import AdapterRegistry
    from agent.learner import Learner
    from agent.runtime import ModelConfig, Runtime
    from agent.wake import WakeConfig
    from policies.config import PolicyConfig

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = Store(home / "store.db")
        learner = Learner(Runtime.load(ModelConfig(threads=1)), store, AdapterRegistry(home / "adapters", store),
                          lora.LoraConfig(), PolicyConfig(), WakeConfig(track=False))
        store.ingest([document(*VARN), document(*MILL)])
        _commit_passage_only(learner, epochs=10)
        a = store.learned_passages()[0]
        a_probes = store.questions(a, role="probe")
        learned_a = learner.score(KNOWLEDGE, VARN[0], a_probes).logprob
        (mem_a,) = tracking.memorisation(learner, KNOWLEDGE, [a])
        _commit_passage_only(learner, epochs=B_EPOCHS)

        report = sleep_phase(learner, SleepConfig(policy="replay", restem=False))

        # measured by the sleep: before it on the active version, after it on the kept one
        forgot_a, replayed_a = report.before["per_passage"][str(a)][1], report.after["per_passage"][str(a)][1]
        print(f"A's probe log-lik: learned {learned_a:.2f}, after B {forgot_a:.2f}, after replay {replayed_a:.2f}; "
              f"sleep {report.outcome}: {report.reason}; timings {report.timings}")
        assert forgot_a < learned_a - MIN_REPLAY_GAIN, "B did not make the model forget A: the test shows nothing"
        assert report.outcome == "kept", report.reason
        assert store.active_adapter_id(KNOWLEDGE) == report.adapter_id
        assert learner.score(KNOWLEDGE, VARN[0], a_probes).logprob == pytest.approx(replayed_a, abs=1e-3)
        assert replayed_a > forgot_a + MIN_REPLAY_GAIN
        assert report.after["retention"] >= report.before["retention"]
        assert report.after["drift_kl"] <= report.before["drift_kl"]
        # a passage trained 10 epochs is memorised verbatim (what dreams are meant to dilute)
        assert mem_a["exact"] == 1 and mem_a["token_match"] == 1.0
    finally:
        torch.set_num_threads(before)


def test_a_sleep_measures_a_bounded_rotating_sample_that_covers_every_passage_in_turn():
    from policies.consolidation import measured_sample

    learned = list(range(1, 2_001))
    assert measured_sample(learned[:20], 32, 4, 0, 0) == learned[:20]  # it fits: all of them
    assert measured_sample(learned, 0, 4, 0, 0) == learned  # 0: no budget
    seen: set[int] = set()
    width = 32 - 4
    for k in range(-(-(len(learned) - 4) // width)):
        got = measured_sample(learned, 32, 4, k, 0)
        assert len(got) == 32 and set(learned[-4:]) <= set(got)  # bounded; the newest always
        assert got == measured_sample(learned, 32, 4, k, 0)  # seeded: the same sleep, the same sample
        seen |= set(got)
    assert seen == set(learned)  # every passage measured again within ceil(N / window) sleeps
    assert measured_sample(learned, 32, 4, 0, 0) != measured_sample(learned, 32, 4, 0, 1)

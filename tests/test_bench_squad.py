"""`seal bench squad` and `seal bench editor` on a tiny random model: a re-run with the
same seed reproduces every figure, a resumed run equals an uninterrupted one, the
ReST-EM editors are trained on tune passages only, and the selection rules."""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from agent.bench.common import bootstrap_ci, split_of
from agent.bench.editor import load_editors, selection_study, study_rules, train_editors
from agent.bench.squad import run_squad
from agent.config import Config
from agent.editor import EditorConfig
from agent.runtime import Runtime
from agent.wake import WakeConfig
from policies import selection
from policies.config import PolicyConfig
from tests.helpers import FAST_LORA, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _titles(split: str, n: int) -> list[str]:
    out, k = [], 0
    while len(out) < n:
        t = f"Place {k}"
        if split_of(t) == split:
            out.append(t)
        k += 1
    return out


def _passage(title: str, k: int) -> dict:
    return {"title": title,
            "context": f"{title} lies on the river Orm{k}. It was founded in {1700 + k} by Ada Vell{k}, a miller.",
            "questions": [{"question": f"On which river does {title} lie?", "answer": f"Orm{k}"},
                          {"question": f"When was {title} founded?", "answer": str(1700 + k)},
                          {"question": f"Who founded {title}?", "answer": f"Ada Vell{k}"},
                          {"question": f"What was the founder of {title}?", "answer": "a miller"}]}


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    titles = _titles("eval", 3) + _titles("tune", 2)
    path = tmp_path / "squad.json"
    path.write_text(json.dumps([_passage(t, k) for k, t in enumerate(titles)]))
    return path


def _cfg(**editor) -> Config:
    return dataclasses.replace(
        Config(),
        lora=FAST_LORA,
        wake=WakeConfig(candidates=2, self_edit_tokens=12, answer_tokens=6),
        policies=PolicyConfig(self_edit="implications"),
        editor=EditorConfig(min_pairs=1, epochs=1, batch_size=2, max_length=256, **editor),
    )


def _squad(tokenizer, data_file: Path, **kw) -> dict:
    runtime = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")
    return run_squad(runtime, _cfg(), data_path=data_file, passages=2, seed=3, policies=("implications", "rewrite"), **kw)


def _figures(result: dict) -> list:
    return [[r["condition"], r["accuracy"], r["f1"], r["ci95"], r["questions"]] for r in result["rows"]] + [
        [p["title"], {c: (v["correct"], v["f1s"], v["answers"]) for c, v in p["conditions"].items()}]
        for p in result["per_passage"]]


@pytest.mark.slow
def test_a_rerun_with_the_same_seed_reproduces_every_figure(tokenizer, data_file):
    first = _squad(tokenizer, data_file)
    assert [r["condition"] for r in first["rows"]] == ["base", "passage", "implications", "rewrite", "default", "open-book"]
    assert first["passages"] == 2 and all(split_of(p["title"]) == "eval" for p in first["per_passage"])
    assert all(r["questions"] > 0 and r["passages"] == 2 for r in first["rows"])
    assert first["versions"]["torch"] and first["config"]["lora"]["rank"] == 4 and first["seed"] == 3
    assert _figures(_squad(tokenizer, data_file)) == _figures(first)


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(tokenizer, data_file):
    full = _squad(tokenizer, data_file)
    saved: list[dict] = []

    def interrupt(partial: dict) -> None:
        saved.append(json.loads(json.dumps(partial)))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _squad(tokenizer, data_file, on_result=interrupt)
    assert saved[-1]["passages"] == 1
    resumed = _squad(tokenizer, data_file, previous=saved[-1])
    assert resumed["passages"] == 2
    assert _figures(resumed) == _figures(full)
    other = dict(saved[-1], seed=4)
    with pytest.raises(ValueError, match="cannot resume"):
        _squad(tokenizer, data_file, previous=other)


@pytest.mark.slow
def test_editors_are_trained_on_tune_passages_and_give_rows(tokenizer, data_file, tmp_path):
    runtime = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")
    out = tmp_path / "editors"
    # a margin no self-edit can clear on a random model would leave no pairs: force one pair per passage
    result = train_editors(runtime, _cfg(), data_path=data_file, passages=2, seed=0, rounds=2, out_dir=out)
    assert all(split_of(t) == "tune" for t in result["passages"]) and len(result["passages"]) == 2
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for r in result["rounds"]:
        for rec in r["per_passage"]:
            assert len(rec["candidates"]) == 2 and rec["n_questions"] == 4
            assert all(len(c["correct"]) == 4 for c in rec["candidates"] if not c.get("nan"))
    editors = load_editors(out, 2)
    assert set(editors) == {"restem-1", "restem-2"}
    # read back, not re-run
    again = train_editors(runtime, _cfg(), data_path=data_file, passages=2, seed=0, rounds=2, out_dir=out,
                          say=lambda m: pytest.fail(f"re-ran: {m}"))
    assert again["rounds"] == json.loads(json.dumps(result["rounds"]))
    # a round whose weights are missing is re-run, and gives the same editor (seeded)
    (out / "round-2.safetensors").unlink()
    rerun = train_editors(runtime, _cfg(), data_path=data_file, passages=2, seed=0, rounds=2, out_dir=out)
    assert rerun["rounds"][1]["pairs"] == result["rounds"][1]["pairs"]
    again_2 = load_editors(out, 2)["restem-2"]
    assert all(torch.equal(again_2[k], editors["restem-2"][k]) for k in editors["restem-2"])
    info = {"passages": result["passages"]}
    got = run_squad(runtime, _cfg(), data_path=data_file, passages=2, seed=3, policies=("implications",),
                    editors=editors, editor_info=info)
    assert [r["condition"] for r in got["rows"]][-3:] == ["restem-1", "restem-2", "open-book"]
    assert all(p["conditions"]["restem-2"]["correct"] is not None for p in got["per_passage"])
    with pytest.raises(ValueError, match="trained on evaluated passages"):
        run_squad(runtime, _cfg(), data_path=data_file, passages=2, seed=3, policies=("implications",),
                  editors=editors, editor_info={"passages": [got["per_passage"][0]["title"]]})
    with pytest.raises(ValueError, match="other settings"):
        train_editors(runtime, _cfg(), data_path=data_file, passages=2, seed=1, rounds=2, out_dir=out)


def test_too_few_pairs_keeps_the_previous_editor(tokenizer, data_file, tmp_path):
    runtime = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")
    cfg = dataclasses.replace(_cfg(), editor=EditorConfig(min_pairs=50))
    result = train_editors(runtime, cfg, data_path=data_file, passages=1, seed=0, rounds=1, out_dir=tmp_path / "e")
    assert result["rounds"][0]["outcome"].startswith("kept the previous editor")


def test_selection_study_replays_rules_on_round_one():
    def grades(correct, lp):
        return {"correct": correct, "f1s": [float(c) for c in correct], "logprobs": lp, "answers": [""] * len(correct)}

    rec = {"n_questions": 5, "baseline": grades([0] * 5, [-5.0] * 5), "passage": grades([1, 0, 0, 0, 0], [-4.0] * 5),
           "candidates": [{"policy": "implications", **grades([1, 1, 1, 1, 1], [-1.0] * 5)},
                          {"policy": "implications", **grades([0, 0, 0, 0, 0], [-9.0] * 5)}]}
    result = {"rounds": [{"per_passage": [rec]}]}
    rows = {r["rule"]: r for r in selection_study(result, 0.4, study_rules(PolicyConfig()))}
    assert rows["passage"]["accuracy"] == pytest.approx(sum([1, 0, 0, 0, 0][q] for q in range(5)
                                                            if q in _probes(5)) / 3)
    assert rows["implications (one sample)"]["accuracy"] == 1.0  # the first sample of the policy
    assert rows["oracle (best on probes)"]["accuracy"] == 1.0
    assert rows["prefer_edit, answer_logprob, margin 0"]["accuracy"] == 1.0  # the all-correct edit wins
    assert all(r["questions"] == 3 for r in rows.values())


def _probes(n: int) -> set[int]:
    from policies.questions import split_roles

    roles = split_roles(list(range(n)), 0.4, seed=0)
    return {q for q in range(n) if roles[q] == "probe"}


@pytest.mark.parametrize("rewards, expect", [
    ((-0.5, -0.2, -0.3), {"best_of_n": None, "floor": 1, "prefer_edit": 1, "always": 1}),  # logprob fell everywhere
    ((0.3, 0.2, 0.25), {"best_of_n": 0, "floor": 0, "prefer_edit": 2, "always": 0}),  # edits within the margin
    ((0.3, 0.1, 0.2), {"best_of_n": 0, "floor": 0, "prefer_edit": 0, "always": 0}),  # passage-only clearly better
])
def test_selection_policies(rewards, expect):
    trials = [selection.Trial(1, "passage", rewards[0], 0.0),
              selection.Trial(2, "implications", rewards[1], 0.0),
              selection.Trial(3, "implications", rewards[2], 0.0)]
    trials = [dataclasses.replace(t, idx=i) for i, t in enumerate(trials)]
    for name, idx in expect.items():
        got = selection.get(name)(trials, 0.0, 0.05)
        want = None if idx is None else idx
        if name == "best_of_n" and rewards[0] < 0:
            assert got.idx is None
        else:
            assert got.idx == want, (name, got)


def test_bootstrap_interval_brackets_the_mean():
    xs = [1.0] * 3 + [0.0] * 7
    lo, hi = bootstrap_ci(xs)
    assert lo <= 0.3 <= hi and lo < hi
    assert bootstrap_ci(xs) == (lo, hi)  # seeded


def test_cli_refuses_bad_input(seal, tmp_path, data_file):
    r = seal("bench", "squad", "--data", str(tmp_path / "nope.json"))
    assert r.exit_code != 0 and "no such file" in r.output and len(r.output.strip().splitlines()) == 1
    r = seal("bench", "squad", "--data", str(data_file), "--resume", "--out", str(tmp_path / "none.json"))
    assert r.exit_code != 0 and "--resume: cannot read" in r.output
    r = seal("bench", "editor", "--data", str(data_file), "--policies", "passage", "--out", str(tmp_path / "e"))
    assert r.exit_code != 0 and "not a self-edit policy that writes text" in r.output


def test_split_is_by_title_hash():
    assert split_of("x") == ("tune" if zlib.crc32(b"x") % 5 == 0 else "eval")


def test_the_data_is_recorded_by_name_and_content_not_by_path(tmp_path):
    import gzip

    from agent.datasets import data_id, default_squad_path

    shipped = default_squad_path()
    copy = tmp_path / "elsewhere" / "squad_dev.json"
    copy.parent.mkdir()
    copy.write_bytes(gzip.decompress(shipped.read_bytes()))
    assert data_id(copy) == data_id(shipped) and data_id(shipped).startswith("squad_dev.json sha256:")
    copy.write_text(copy.read_text(encoding="utf-8").replace("Super Bowl", "Super Bowl!", 1), encoding="utf-8")
    assert data_id(copy) != data_id(shipped)  # other passages: another id


def test_a_policy_that_writes_nothing_is_a_row_and_the_default_selects_it_as_the_wake_cycle_would(tokenizer, data_file):
    runtime = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")
    cfg = dataclasses.replace(_cfg(), policies=PolicyConfig(self_edit="passage_chat", selection="prefer_edit"))
    got = run_squad(runtime, cfg, data_path=data_file, passages=1, seed=3, policies=("passage_chat",))
    assert [r["condition"] for r in got["rows"]] == ["base", "passage", "passage_chat", "default", "open-book"]
    (p,) = got["per_passage"]
    assert [t["policy"] for t in p["trials"]] == ["passage", "passage_chat"]  # the row's trial, not trained twice
    assert p["choice"] in ("passage", "passage_chat")
    assert p["conditions"]["default"]["correct"] == p["conditions"][p["choice"]]["correct"]


def test_the_reward_study_scores_every_trial_on_held_out_rule_made_questions(tokenizer, data_file):
    """Every passage has questions made by rule; each trial that did not train on them
    gets the cloze rewards beside its probe accuracy, and one that did (passage_cloze)
    does not."""
    runtime = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")
    cfg = dataclasses.replace(_cfg(), policies=PolicyConfig(self_edit="passage_chat", selection="prefer_edit"))
    got = run_squad(runtime, cfg, data_path=data_file, passages=1, seed=3, policies=("passage_chat", "passage_cloze"),
                    reward_study=True)
    (p,) = got["per_passage"]
    assert p["n_rule_questions"] > 0
    rows = {t["policy"]: t for t in p["reward_study"]}
    assert set(rows) == {"passage", "passage_chat", "passage_cloze"}
    for name in ("passage", "passage_chat"):
        assert all(math.isfinite(rows[name][k]) for k in ("cloze_logprob", "cloze_accuracy", "cloze_agreement"))
    assert "cloze_logprob" not in rows["passage_cloze"]
    assert got["reward_study"]["cloze_logprob"]["trials"] == 2


def test_candidate_ranking_says_how_often_each_reward_picked_the_candidate_better_on_the_probes():
    from agent.bench.squad import candidate_ranking

    def record(trials, accs):
        return {"trials": [{"policy": p, "reward": r, "other": o, "ok": True} for p, r, o in trials],
                "conditions": {p: {"accuracy": a} for p, a in accs.items()}}

    result = {"config": {"policies": {"reward": "answer_logprob"}}, "per_passage": [
        record([("passage", 2.0, 0.5), ("passage_chat", 1.0, 0.5)], {"passage": 0.0, "passage_chat": 1.0}),  # wrong, tied
        record([("passage", 1.0, 0.0), ("passage_chat", 3.0, 0.5)], {"passage": 0.0, "passage_chat": 0.5}),  # right, right
        record([("passage", 1.0, 0.0), ("passage_chat", 3.0, 0.5)], {"passage": 0.5, "passage_chat": 0.5}),  # undecided
        record([("passage", 1.0, 0.0), ("rewrite", 3.0, 0.5)], {"passage": 0.5}),  # rewrite has no row: left out
    ]}
    got = candidate_ranking(result)
    assert got["answer_logprob"] | {"spearman_within_passage": None} == {
        "trials": 6, "spearman_within_passage": None, "picked_best": 1, "tied": 0, "passages_decided": 2}
    assert got["qa_accuracy"]["picked_best"] == 1 and got["qa_accuracy"]["tied"] == 1


def test_perfect_pick_is_the_probe_accuracy_of_the_best_candidate_on_each_passage():
    from agent.bench.squad import perfect_pick

    def record(n_probe, correct, failed=()):
        return {"n_probe": n_probe,
                "trials": [{"policy": p, "ok": p not in failed} for p in correct],
                "conditions": {p: {"correct": c} for p, c in correct.items() if p != "rewrite"}}

    result = {"per_passage": [
        record(3, {"passage": [1, 0, 0], "passage_chat": [0, 1, 1]}),  # passage_chat: 2 of 3
        record(2, {"passage": [1, 1], "passage_chat": [0, 0]}),  # passage: 2 of 2
        record(2, {"passage": [0, 1], "passage_chat": [1, 1]}, failed=("passage_chat",)),  # a failed trial: 1
        record(1, {"passage": [0], "rewrite": [1]}),  # rewrite has no row: left out
    ]}
    assert perfect_pick(result) == {"accuracy": 5 / 8, "questions": 8, "passages_compared": 2}
    assert perfect_pick({"per_passage": [record(1, {"passage": [1]})]}) is None  # nothing to choose between

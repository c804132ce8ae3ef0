"""`seal bench continual` on a tiny random model: the shape of the forgetting matrix,
the branch point shared by the conditions, the summary arithmetic, reproducibility."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from agent.bench.continual import run_continual, summarise
from agent.config import Config
from agent.runtime import Runtime
from agent.wake import WakeConfig
from policies.config import PolicyConfig
from tests.helpers import FAST_LORA, PASSAGES, record, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "seq.json"
    path.write_text(json.dumps([record(*p) for p in PASSAGES]))
    return path


def _cfg() -> Config:
    cfg = Config()
    return dataclasses.replace(
        cfg,
        lora=FAST_LORA,
        wake=WakeConfig(candidates=1, self_edit_tokens=12, answer_tokens=6),
        policies=PolicyConfig(self_edit="implications", min_gain=-1e9),
        sleep=dataclasses.replace(cfg.sleep, epochs=1, dreams=2, dream_tokens=8),
    )


def _run(tokenizer, data_file: Path) -> dict:
    runtime = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")
    return run_continual(runtime, _cfg(), data_path=data_file, passages=3, sleep_every=2, seed=1, split="all")


@pytest.mark.slow
def test_the_matrix_has_a_row_per_update_and_per_sleep(tokenizer, data_file, seal, tmp_path):
    result = _run(tokenizer, data_file)
    by_cond = {r["condition"]: r for r in result["runs"]}
    assert set(by_cond) == {"no-sleep", "sleep", "sleep+dreams"}
    assert [row["kind"] for row in by_cond["no-sleep"]["rows"]] == ["wake", "wake", "wake"]
    assert [row["kind"] for row in by_cond["sleep"]["rows"]] == ["wake", "wake", "sleep", "wake"]
    for r in result["runs"]:
        ids = [str(p["id"]) for p in r["passages"]]
        assert list(r["base"]) == ids and all(v["n"] > 0 for v in r["base"].values())  # probes measured before learning
        for row in r["rows"]:
            seen = row["step"] if row["kind"] == "wake" else row["step"]
            assert list(row["scores"]) == ids[:seen]  # only passages seen so far are measured
        # the conditions share the rows before the first sleep
        assert r["rows"][:2] == by_cond["no-sleep"]["rows"][:2]
    assert {s["condition"] for s in result["summary"]} == set(by_cond)
    saved = tmp_path / "continual.json"
    saved.write_text(json.dumps(result))  # JSON-able as written, and `seal bench show` prints it
    r = seal("bench", "show", saved)
    assert r.exit_code == 0, r.output
    assert "sleep+dreams: probe accuracy %" in r.output
    assert re.search(r"^1 (Isle of Varn|Brisk Tower|Lake Osk)", r.output, re.M)
    assert max(len(line) for line in r.output.splitlines()) <= 80


@pytest.mark.slow
def test_same_seed_same_figures(tokenizer, data_file):
    a, b = _run(tokenizer, data_file), _run(tokenizer, data_file)
    strip = lambda r: [[row["scores"] for row in run["rows"]] for run in r["runs"]]  # noqa: E731
    assert strip(a) == strip(b)
    assert [s["final"] for s in a["summary"]] == [s["final"] for s in b["summary"]]


def test_summary_arithmetic():
    def row(step, scores, kind="wake"):
        return {"kind": kind, "step": step, "scores": scores}

    s = lambda acc, lp: {"accuracy": acc, "logprob": lp, "n": 2}  # noqa: E731
    run = {
        "condition": "sleep", "passages": [{"id": 1}, {"id": 2}],
        "base": {"1": s(0.0, -4.0), "2": s(0.0, -5.0)},
        "rows": [row(1, {"1": s(1.0, -1.0)}), row(2, {"1": s(0.5, -2.0), "2": s(0.5, -3.0)}),
                 row(2, {"1": s(1.0, -1.5), "2": s(0.5, -3.0)}, kind="sleep")],
        "memorisation": {"exact": 0.5, "token_match": 0.75, "n": 2},
    }
    (out,) = summarise([run], ("sleep",))
    assert out["at_learning"] == pytest.approx(0.75)  # passage 1 at step 1, passage 2 at step 2
    assert out["final"] == pytest.approx(0.75)  # the last row, after the sleep
    assert out["retention"] == pytest.approx(1.0)
    assert out["logprob_gain_at_learning"] == pytest.approx((3.0 + 2.0) / 2)
    assert out["logprob_gain_final"] == pytest.approx((2.5 + 2.0) / 2)
    assert out["memorisation_exact"] == 0.5


def test_bench_continual_rejects_an_unknown_condition(seal, data_file):
    r = seal("bench", "continual", "--data", data_file, "--conditions", "sleep,naps")
    assert r.exit_code == 1 and "unknown condition 'naps'" in r.output


def test_several_sequences_give_mean_and_standard_deviation():
    def run(acc_first: float, acc_final: float) -> dict:
        s = {"accuracy": acc_first, "logprob": -1.0}
        return {"condition": "sleep", "passages": [{"id": 1}],
                "rows": [{"kind": "wake", "step": 1, "scores": {"1": s}},
                         {"kind": "sleep", "step": 1, "scores": {"1": {"accuracy": acc_final, "logprob": -1.0}}}],
                "base": {"1": {"logprob": -2.0}}, "memorisation": {"exact": 0.0, "token_match": 0.5}}

    (s,) = summarise([run(0.2, 0.4), run(0.4, 0.2)], ("sleep",))
    assert s["sequences"] == 2 and s["at_learning"] == pytest.approx(0.3) and s["final"] == pytest.approx(0.3)
    assert s["at_learning_sd"] == pytest.approx(0.1414, abs=1e-3) and s["at_learning_spread"] == pytest.approx(0.2)
    (one,) = summarise([run(0.2, 0.4)], ("sleep",))
    assert one["at_learning_sd"] == 0.0


@pytest.mark.slow
def test_an_interrupted_run_resumes_with_its_finished_sequences_kept(tokenizer, data_file):
    runtime = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")
    kw = dict(data_path=data_file, passages=2, sleep_every=2, seed=1, split="all", conditions=("no-sleep",))
    first = run_continual(runtime, _cfg(), sequences=1, **kw)
    said = []
    both = run_continual(runtime, _cfg(), sequences=2, previous=first, say=said.append, **kw)
    assert "seq 1: kept from the previous run" in said and not any(m.startswith("seq 1: update") for m in said)
    assert any(m.startswith("seq 2: update") for m in said)
    assert [r["sequence"] for r in both["runs"]] == [0, 1]
    assert both["runs"][0] == first["runs"][0] and both["summary"][0]["sequences"] == 2
    with pytest.raises(ValueError, match="cannot resume: the saved result has seed 1, not 2"):
        run_continual(runtime, _cfg(), sequences=2, previous=first, **{**kw, "seed": 2})

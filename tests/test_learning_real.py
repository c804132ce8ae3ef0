"""A learning test with the real default model (SmolLM2-135M-Instruct): `seal learn`
on a passage of invented facts must make the model measurably better at them.

The facts are made up, so the base model cannot know them: before learning it does
not name the capital; after one wake cycle (passage-only or one self-edit, 10 LoRA
epochs) the answer log-likelihood of the held-out probe questions rises by about
1 nat/token (measured 0.9-1.2 over seeds) and the model names the capital when asked.
Runs in 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from store import Store

pytestmark = pytest.mark.real_model

TITLE = "Isle of Varn"
PASSAGE = {
    "title": TITLE,
    "context": (
        "The Isle of Varn is a small island in the Grey Sea. Its capital is the town of Kelmora. "
        "The island was founded in 1702 by a sailor named Hedda Lune. About 4,300 people live on "
        "the island, and most of them keep sheep."
    ),
    "questions": [
        {"question": "What is the capital of the Isle of Varn?", "answer": "Kelmora"},
        {"question": "Who founded the Isle of Varn?", "answer": "Hedda Lune"},
        {"question": "In which year was the Isle of Varn founded?", "answer": "1702"},
        {"question": "In which sea is the Isle of Varn?", "answer": "the Grey Sea"},
    ],
}
CAPITAL_Q, CAPITAL = PASSAGE["questions"][0]["question"], PASSAGE["questions"][0]["answer"]
FAST = ["--set", "model.threads=1", "--set", "wake.candidates=1", "--set", "wake.self_edit_tokens=96"]
MIN_PROBE_GAIN = 0.5  # nats per answer token; measured 0.9-1.2


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on 2 cores shared with another busy process, two OpenMP threads
    wait on each other and a cycle takes several times longer. Restored afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_learning_a_passage_of_invented_facts(seal, home: Path, tmp_path: Path):
    doc = tmp_path / "varn.json"
    doc.write_text(json.dumps(PASSAGE), encoding="utf-8")
    r = seal(*FAST, "ingest", doc)
    assert r.exit_code == 0, r.output

    before = seal(*FAST, "ask", "--title", TITLE, CAPITAL_Q)
    assert before.exit_code == 0, before.output
    assert CAPITAL.lower() not in before.stdout.lower(), "the base model cannot know an invented capital"

    r = seal(*FAST, "learn")
    assert r.exit_code == 0, r.output
    assert "learned 1 of 1 passage(s); active adapter: knowledge-0001" in r.stdout

    with Store(home / "store.db") as store:
        (cycle,) = store.cycles()
        assert cycle["outcome"] == "committed", cycle["reason"]
        new = cycle["adapter_id"]
        assert store.active_adapter_id("knowledge") == new
        assert (cycle["n_reward"], cycle["n_probe"]) == (2, 2)
        probes = {q["question"] for q in store.questions(cycle["passage_id"], role="probe")}
        assert CAPITAL_Q not in probes  # asked below: a reward question, the probes stay held out
        evals = {e["adapter_id"]: e for e in store.evaluations(passage_id=cycle["passage_id"]) if e["kind"] == "probe"}
        base, after = evals[None], evals[new]
        gain = after["logprob"] - base["logprob"]
        timings = json.loads(cycle["timings"])
    print(f"probe answer log-likelihood {base['logprob']:.3f} -> {after['logprob']:.3f} (gain {gain:+.3f} nats/token), "
          f"accuracy {base['accuracy']:.2f} -> {after['accuracy']:.2f}; timings "
          + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    assert gain > MIN_PROBE_GAIN

    r = seal(*FAST, "ask", "--title", TITLE, CAPITAL_Q)
    assert r.exit_code == 0, r.output
    assert CAPITAL.lower() in r.stdout.lower(), r.stdout

"""Data-parallel LoRA training as a job of its own processes (``agent.cluster.train_job``,
what a sleep runs with ``sleep.processes`` > 1): two gloo processes under torchrun train
the same adapter as one process does, a failed job says why, and a stop kills it."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from adapters import files, lora
from adapters.names import KNOWLEDGE
from agent.cluster.train_job import JobError, launch, write_job
from agent.runtime import ModelConfig, Runtime

pytestmark = [pytest.mark.process, pytest.mark.cluster, pytest.mark.usefixtures("one_thread")]

CFG = lora.LoraConfig(rank=4, alpha=8, epochs=3, lr=1e-2, batch_size=4, seed=5)
TEXTS = [("What is the capital of Varn?", "Kelmora."), ("Who founded Varn?", "Hedda Lune, a sailor."),
         ("", "The Isle of Varn lies in the Grey Sea. Its capital is Kelmora."),
         ("When was Varn founded?", "In 1702."), ("How many live on Varn?", "About 4,300 people.")]


def _model(tiny_dir):
    cfg = ModelConfig(path=str(tiny_dir), device="cpu", threads=1)
    rt = Runtime.load(cfg)
    return cfg, rt, lora.attach(rt.model, CFG, names=(KNOWLEDGE,))


def _examples(rt) -> list[lora.Example]:
    plain = [lora.Example(rt.chat(q) if q else "", a, eos=bool(q)) for q, a in TEXTS]
    goldfish = dataclasses.replace(plain[2], goldfish=3)
    distilled = plain[0]
    ids = [lora.completion_ids(rt.tokenizer, distilled)]
    ((t_ids, t_lp),) = rt.topk_logprobs([rt.chat("Using the passage: what is the capital of Varn?")], ids, 4)
    return [*plain[:2], goldfish, *plain[3:], dataclasses.replace(distilled, teacher=lora.Teacher(t_ids, t_lp))]


def test_two_processes_train_the_weights_one_process_trains(tiny_dir, tmp_path):
    model_cfg, rt, peft = _model(tiny_dir)
    examples = _examples(rt)
    job = write_job(tmp_path / "job", model_cfg, CFG, examples, peft, KNOWLEDGE)  # the parent: as it is now
    alone = lora.train(peft, rt.tokenizer, examples, CFG, adapter=KNOWLEDGE)
    want = lora.snapshot(peft, KNOWLEDGE)

    got = launch(job, processes=2)
    assert got["processes"] == 2 and got["steps"] == alone.steps and not got["nan"]
    assert got["losses"] == pytest.approx(list(alone.losses), rel=1e-4)
    assert got["tokens"] == alone.tokens
    _, _, other = _model(tiny_dir)
    files.load(other, KNOWLEDGE, job / "adapter", expected_sha256=got["sha256"])
    for k, w in lora.snapshot(other, KNOWLEDGE).items():
        assert torch.allclose(w, want[k], atol=1e-5), k
    assert any(w.abs().sum() > 0 for k, w in want.items() if "lora_B" in k)  # it did learn something

    one = launch(write_job(tmp_path / "one", model_cfg, CFG, examples, other, KNOWLEDGE), processes=1)
    assert one["processes"] == 1 and one["steps"] == alone.steps


def test_a_job_that_fails_says_why_and_leaves_no_result(tiny_dir, tmp_path):
    model_cfg, rt, peft = _model(tiny_dir)
    job = write_job(tmp_path / "job", model_cfg, CFG, _examples(rt)[:2], peft, KNOWLEDGE)
    spec = json.loads((job / "job.json").read_text())
    (job / "job.json").write_text(json.dumps({**spec, "parent_sha256": "0" * 64}))
    with pytest.raises(JobError, match="sha256"):
        launch(job, processes=2)
    assert not (job / "result.json").exists() and not (job / "adapter").exists()


def test_a_stop_kills_the_job(tiny_dir, tmp_path):
    model_cfg, rt, peft = _model(tiny_dir)
    job = write_job(tmp_path / "job", model_cfg, dataclasses.replace(CFG, epochs=100000), _examples(rt), peft,
                    KNOWLEDGE)
    polls = []
    with pytest.raises(JobError, match="stop requested"):
        launch(job, processes=2, should_stop=lambda: polls.append(1) or len(polls) > 20)
    assert not (job / "result.json").exists()
    time.sleep(2)  # no worker outlives its job: none is still training on it
    assert not _processes_of(job)


def _processes_of(job) -> list[str]:
    """The command lines of processes that name ``job`` (the job's workers)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "agent.cluster.train_job" in cmd and str(job) in cmd:
            out.append(cmd)
    return out


def test_a_sleep_trains_its_consolidation_in_two_processes(tiny_dir, tmp_path):
    """sleep.processes = 2: the same kept sleep version as in the daemon's own model,
    and no job folder left behind."""
    from adapters.registry import AdapterRegistry
    from agent.learner import Learner
    from agent.sleep import SleepConfig, sleep_phase
    from agent.wake import learn
    from store import Store
    from tests.helpers import ALWAYS, BRISK, FAST_WAKE, LEARNER_LORA, VARN, document

    lax = SleepConfig(epochs=1, dreams=0, max_retention_drop=1e9, max_logprob_drop=1e9, max_drift_increase=1e9,
                      max_reading_drop=1e9, memorisation_tokens=8, restem=False)

    def slept(home, processes: int):
        rt = Runtime.load(ModelConfig(path=str(tiny_dir), device="cpu", threads=1))
        store = Store(home / "store.db")
        learner = Learner(rt, store, AdapterRegistry(home / "adapters", store), LEARNER_LORA, ALWAYS, FAST_WAKE)
        store.ingest([document(*VARN), document(*BRISK)])
        assert [r.outcome for r in learn(learner)] == ["committed", "committed"]
        report = sleep_phase(learner, dataclasses.replace(lax, processes=processes))
        assert report.outcome == "kept", report.reason
        return learner, report

    one, r1 = slept(tmp_path / "one", 1)
    two, r2 = slept(tmp_path / "two", 2)
    assert r2.n_examples == r1.n_examples > 0
    a, b = lora.snapshot(one.model, KNOWLEDGE), lora.snapshot(two.model, KNOWLEDGE)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not (tmp_path / "two" / "jobs").exists()


ROWS = [{"prompt": f"Write a note about fact {i}.\n", "completion": f"Fact {i}: {q} {a}"}
        for i, (q, a) in enumerate(TEXTS[:2] + TEXTS[3:])] * 2


def test_the_editor_sft_in_two_processes_trains_what_one_process_trains(tiny_dir, tmp_path):
    """The editor's SFT (trl's SFTTrainer) as a job of two processes: the same steps,
    losses and weights as the SFT in the daemon's model (DDP sums what one process
    computes; only float rounding differs)."""
    from agent.editor import EditorConfig, sft_model

    cfg = EditorConfig(epochs=2, lr=1e-2, batch_size=4, max_length=128, processes=2)
    from agent.cluster.train_job import write_sft_job

    model_cfg, rt, peft = _model(tiny_dir)
    job = write_sft_job(tmp_path / "job", model_cfg, CFG, ROWS, cfg, peft, KNOWLEDGE)
    alone = sft_model(peft, rt.tokenizer, ROWS, cfg, KNOWLEDGE)
    want = lora.snapshot(peft, KNOWLEDGE)

    got = launch(job, processes=2)
    assert got["processes"] == 2 and got["steps"] == alone.steps == 4 and not got["stopped"]
    assert got["losses"] == pytest.approx(list(alone.losses), rel=1e-3)
    assert got["train_loss"] == pytest.approx(alone.train_loss, rel=1e-3)
    _, _, other = _model(tiny_dir)
    files.load(other, KNOWLEDGE, job / "adapter", expected_sha256=got["sha256"])
    for k, w in lora.snapshot(other, KNOWLEDGE).items():
        assert torch.allclose(w, want[k], atol=1e-4), k
    assert any(w.abs().sum() > 0 for k, w in want.items() if "lora_B" in k)


def test_editor_processes_runs_the_learners_sft_as_a_job(tiny_dir, tmp_path):
    """editor.processes = 2 through ``agent.editor.sft``: the scratch adapter gets the
    job's weights, the knowledge adapter is untouched and active, no job folder is left;
    a stop returns a stopped result and leaves the scratch as it was."""
    from adapters.names import TRIAL
    from adapters.registry import AdapterRegistry
    from agent.editor import EditorConfig, sft
    from agent.learner import Learner
    from store import Store
    from tests.helpers import ALWAYS, FAST_WAKE, LEARNER_LORA

    rt = Runtime.load(ModelConfig(path=str(tiny_dir), device="cpu", threads=1))
    store = Store(tmp_path / "store.db")
    learner = Learner(rt, store, AdapterRegistry(tmp_path / "adapters", store), LEARNER_LORA, ALWAYS, FAST_WAKE)
    knowledge, scratch = lora.snapshot(learner.model, KNOWLEDGE), lora.snapshot(learner.model, TRIAL)
    cfg = EditorConfig(epochs=1, lr=1e-2, batch_size=4, max_length=128, processes=2)

    stopped = sft(learner, ROWS, cfg, TRIAL, should_stop=lambda: True)
    assert stopped.stopped and stopped.steps == 0
    assert all(torch.equal(w, scratch[k]) for k, w in lora.snapshot(learner.model, TRIAL).items())

    res = sft(learner, ROWS, cfg, TRIAL)
    assert res.steps == 2 and not res.stopped and res.train_loss == res.train_loss
    trained = lora.snapshot(learner.model, TRIAL)
    assert not all(torch.equal(w, scratch[k]) for k, w in trained.items())
    assert all(torch.equal(w, knowledge[k]) for k, w in lora.snapshot(learner.model, KNOWLEDGE).items())
    assert learner.model.active_adapter == KNOWLEDGE
    assert not (tmp_path / "jobs" / "editor").exists()


def test_editor_processes_must_divide_the_batch():
    from agent.editor import EditorConfig

    with pytest.raises(ValueError, match="divide batch_size"):
        EditorConfig(batch_size=4, processes=3)

"""The trial runner interface on a tiny random Llama: specs go in by value, each
trained adapter comes back as a PEFT folder with its sha256, and the wake cycle
commits exactly the chosen trial's weights through whichever runner it is given."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from adapters import files, lora
from adapters.names import KNOWLEDGE
from agent.runner import LocalRunner, ParentRef, TrialSpec, passage_spec, run_spec, runner_of
from agent.trial import PASSAGE, Candidate
from agent.wake import learn
from tests.helpers import VARN, document, make_learner

pytestmark = pytest.mark.usefixtures("one_thread")

QS = ({"id": 1, "question": "What is the capital of Varn?", "answer": "Kelmora"},)


def _specs(learner, passage: dict) -> list[TrialSpec]:
    baseline = learner.score(KNOWLEDGE, passage["title"], list(QS))
    cands = [Candidate(PASSAGE), Candidate("rewrite", "Varn's capital is Kelmora, on the Grey Sea.")]
    return [TrialSpec(i, passage_spec(passage), c, 7 + i, QS, baseline, beside_passage=True)
            for i, c in enumerate(cands)]


def test_the_local_runner_returns_each_trained_adapter_as_a_checked_peft_folder(tokenizer, home):
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN)])
    passage = learner.store.passages()[0]
    specs = _specs(learner, passage)
    assert pickle.loads(pickle.dumps(specs)) == specs  # by value: a worker elsewhere gets the same specs
    runner = LocalRunner(learner, home / "trials")
    results = runner.run(specs)
    assert [r.spec.idx for r in results] == [0, 1] and all(r.outcome.ok for r in results)
    for r in results:
        assert (r.adapter / files.CONFIG_NAME).is_file()
        assert hashlib.sha256((r.adapter / files.WEIGHTS_NAME).read_bytes()).hexdigest() == r.sha256
    # the folder is the trial: loaded into the knowledge adapter, it scores what the trial scored
    results[1].load_into(learner.model, KNOWLEDGE)
    again = learner.score(KNOWLEDGE, passage["title"], list(QS))
    assert again.logprob == pytest.approx(results[1].outcome.scores.logprob, abs=1e-5)
    # another run starts from empty scratch; a corrupted folder is refused before loading
    (results[0].adapter / files.WEIGHTS_NAME).write_bytes(b"not weights")
    with pytest.raises(lora.AdapterError, match="sha256"):
        results[0].load_into(learner.model, KNOWLEDGE)
    runner.run(specs[:1])
    assert sorted(p.name for p in (home / "trials").iterdir()) == ["trial-00"]


def test_a_trial_that_does_not_train_returns_no_folder(tokenizer, home):
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN)])
    passage = learner.store.passages()[0]
    spec = _specs(learner, passage)[0]
    same = TrialSpec(1, spec.passage, Candidate("rewrite", ""), 8, QS, spec.baseline, beside_passage=True)
    r = run_spec(learner, same, home / "trials" / "x")
    assert r.outcome.note and r.adapter is None and r.sha256 is None and not (home / "trials" / "x").exists()


class Recording:
    """A runner that keeps the specs it was given (pickled, as a remote runner would
    send them) and runs them locally."""

    name = "recording"

    def __init__(self, learner, scratch):
        self.inner, self.specs = LocalRunner(learner, scratch), []

    def run(self, specs, *, beat=None, on_event=None):
        self.specs += [pickle.loads(pickle.dumps(s)) for s in specs]
        return self.inner.run(specs, beat=beat)

    def close(self):
        self.inner.close()


def test_the_wake_cycle_hands_specs_to_its_runner_and_commits_the_chosen_folder(tokenizer, home):
    learner = make_learner(tokenizer, home)
    assert isinstance(runner_of(learner), LocalRunner)  # the default
    learner.runner = Recording(learner, home / "trials")
    learner.store.ingest([document(*VARN)])
    (first,) = learn(learner)
    assert first.outcome == "committed"
    specs = learner.runner.specs
    assert [s.idx for s in specs] == list(range(len(first.candidates)))
    assert all(s.parent == ParentRef() for s in specs)  # the first passage starts from the base model
    active = learner.registry.active(KNOWLEDGE)
    chosen = home / "trials" / f"trial-{first.chosen:02d}"
    assert active["sha256"] == hashlib.sha256((chosen / files.WEIGHTS_NAME).read_bytes()).hexdigest()
    # the next passage's trials start from the version just committed: named by id, folder and checksum
    learner.store.ingest([document("Tolm", "Tolm is a river town. Its bridge is called the Ashway.",
                                   [("What is the bridge of Tolm called?", "the Ashway")])])
    learner.runner.specs.clear()
    (second,) = learn(learner)
    parent = learner.runner.specs[0].parent
    assert (parent.id, parent.path, parent.sha256) == (
        active["id"], str(learner.registry.root / active["path"]), active["sha256"])
    assert second.outcome in ("committed", "rejected")


def test_the_gpu_example_config_loads_and_its_ray_lines_too(tmp_path):
    """examples/seal-gpu.toml (a 1-8B model on one GPU, SEAL's LoRA shape) is a valid
    seal.toml, and so it is with its Ray and multi-GPU lines uncommented."""
    from agent.config import load_config
    from tests.helpers import REPO

    text = (REPO / "examples" / "seal-gpu.toml").read_text()
    (tmp_path / "seal.toml").write_text(text)
    cfg = load_config(tmp_path)
    assert (cfg.model.device, cfg.model.dtype) == ("cuda", "bfloat16")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (32, 64, ("q_proj", "v_proj"))
    assert cfg.runner.kind == "local"
    ray_on = text.replace('kind = "local"\n# kind = "ray"', 'kind = "ray"')
    ray_on = "\n".join(line[2:] if line.startswith("# ") and "=" in line and "[" not in line else line
                       for line in ray_on.splitlines())
    (tmp_path / "seal.toml").write_text(ray_on)
    cfg = load_config(tmp_path)
    assert (cfg.runner.kind, cfg.runner.workers, cfg.runner.gpus_per_worker) == ("ray", 2, 0.5)
    assert (cfg.sleep.processes, cfg.editor.processes) == (2, 2)

"""Trials on a real local Ray cluster (``ray.init(num_cpus=2)``), the tiny model in
every actor: the same adapters and rewards as the local runner for the same seeds,
the parent version shipped and checked, a killed actor's trial run again, and a wake
cycle through Ray that commits once. ``make test-cluster`` runs these (CI too)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from adapters import lora  # noqa: E402
from adapters.names import KNOWLEDGE  # noqa: E402
from agent.cluster.ray_runner import RayRunner, learner_args  # noqa: E402
from agent.config import Config  # noqa: E402
from agent.runner import LocalRunner, ParentRef, RunnerConfig, TrialSpec, passage_spec  # noqa: E402
from agent.runtime import ModelConfig, tiny_runtime  # noqa: E402
from agent.trial import PASSAGE, Candidate  # noqa: E402
from agent.wake import learn  # noqa: E402
from tests.helpers import ALWAYS, FAST_WAKE, LEARNER_LORA, VARN, document, make_learner  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("one_thread")]

QS = ({"id": 1, "question": "What is the capital of Varn?", "answer": "Kelmora"},)


@pytest.fixture(scope="module")
def cluster():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # this module's helpers travel to the actors
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


@pytest.mark.process
def test_the_daemon_learns_with_its_trials_on_ray(tmp_path, tiny_dir):
    """`seal daemon run --burst --ray local`: a private Ray cluster, the trials on its
    actors (each loads the configured model itself), one commit. Runs before the other
    tests start this module's cluster."""
    from tests.helpers import INVENTED, record, run_cli, seal_argv

    home = tmp_path / "home"
    doc = tmp_path / "brenmoor.json"
    doc.write_text(json.dumps(record(*INVENTED, [("What is the only town on Brenmoor?", "Quorrin")])))
    run_cli(seal_argv(home, tiny_dir, "ingest", "--local", str(doc)))
    flags = ["--set", "schedule.policy=never", "--set", "policies.min_gain=-1e9", "--set", "runner.workers=2"]
    r = run_cli(seal_argv(home, tiny_dir, *flags, "daemon", "run", "--burst", "--ray", "local"), timeout=400)
    assert "learned 1 of 1 passage(s)" in r.stdout
    assert "runner.kind = ray" in r.stderr or "'ray'" in r.stderr or "ray" in r.stderr
    from store import Store

    with Store(home / "store.db") as store:
        assert store.active_adapter_id(KNOWLEDGE) == "knowledge-0001"
        assert store.queue_summary()["done"] == 1


@pytest.mark.process
def test_bench_speed_runner_ray_reports_trials_per_second_for_each_pool(tmp_path, tiny_dir):
    """`seal bench speed --runner ray --workers 1,2` on the tiny model: the local runner
    and two pools run the same trials, with the same adapters, and the JSON says so."""
    from tests.helpers import run_cli, seal_argv

    out = tmp_path / "runners.json"
    r = run_cli(seal_argv(tmp_path / "home", tiny_dir, "bench", "speed", "--runner", "ray", "--workers", "1,2",
                          "--trials", "2", "--out", str(out)), timeout=400)
    result = json.loads(out.read_text())
    assert [(row["runner"], row["workers"]) for row in result["rows"]] == [("local", 1), ("ray", 1), ("ray", 2)]
    assert all(row["trials_per_s"] > 0 for row in result["rows"])
    assert all(row["same_adapters"] for row in result["rows"][1:])
    shown = [line for line in r.stdout.splitlines() if not line.startswith("wrote ")]
    assert "trials/s" in r.stdout and max(len(line) for line in shown) <= 80
    bad = run_cli(seal_argv(tmp_path / "home", tiny_dir, "bench", "speed", "--runner", "ray", "--workers", "0"),
                  ok=False)
    assert bad.returncode != 0 and "at least 1 worker" in bad.stderr


def _runner(tmp: Path, workers: int = 2, train_fn=None, **kw) -> RayRunner:
    # the actors' learners are make_learner's: the same tiny model (seed 0), LoRA and policies
    args = learner_args(Config()) | {"lora_cfg": LEARNER_LORA, "policies": ALWAYS, "wake": FAST_WAKE}
    return RayRunner(RunnerConfig(kind="ray", workers=workers, **kw), functools.partial(tiny_runtime, ModelConfig()),
                     args, tmp / "ray-trials", train_fn=train_fn, poll_s=0.5)


def _specs(learner, parent: ParentRef) -> list[TrialSpec]:
    passage = learner.store.passages()[-1]
    baseline = learner.score(KNOWLEDGE, passage["title"], list(QS))
    cands = [Candidate(PASSAGE), Candidate("rewrite", "Varn's capital is Kelmora, on the Grey Sea."),
             Candidate("implications", "Kelmora is the capital.\nVarn lies in the Grey Sea.")]
    return [TrialSpec(i, passage_spec(passage), c, 11 + i, QS, baseline, beside_passage=True, parent=parent)
            for i, c in enumerate(cands)]


def _learner_with_a_parent(tokenizer, home):
    """A learner (tiny model, seed 0 as in the actors) that has committed one version."""
    learner = make_learner(tokenizer, home)
    learner.store.ingest([document(*VARN)])
    (report,) = learn(learner)
    assert report.outcome == "committed"
    learner.store.ingest([document("Tolm", "Tolm is a river town. Its bridge is called the Ashway.",
                                   [("What is the bridge of Tolm called?", "the Ashway")])])
    a = learner.registry.active(KNOWLEDGE)
    return learner, ParentRef(a["id"], str(learner.registry.root / a["path"]), a["sha256"])


def test_ray_trials_equal_the_local_runners_for_the_same_seeds(cluster, tokenizer, home, tmp_path):
    learner, parent = _learner_with_a_parent(tokenizer, home)
    specs = _specs(learner, parent)
    local = LocalRunner(learner, tmp_path / "local").run(specs)
    runner = _runner(tmp_path)
    try:
        remote = runner.run(specs)
        assert len(set(runner.worker_pids()) - {os.getpid()}) == 2  # two actors, neither this process
        remote[2].load_into(learner.model, KNOWLEDGE)  # a folder from Ray loads, checksum checked
    finally:
        runner.close()
    assert [r.spec.idx for r in remote] == [0, 1, 2]
    for a, b in zip(local, remote, strict=True):
        assert a.outcome.ok and b.outcome.ok
        assert b.sha256 == a.sha256  # the same weights, bit for bit
        assert b.outcome.reward == a.outcome.reward and b.outcome.reward_logprob == a.outcome.reward_logprob
        assert b.outcome.result.steps == a.outcome.result.steps


def test_a_parent_whose_files_do_not_match_its_checksum_is_refused(cluster, tokenizer, home, tmp_path):
    learner, parent = _learner_with_a_parent(tokenizer, home)
    bad = ParentRef(parent.id, parent.path, "0" * 64)
    runner = _runner(tmp_path, workers=1, max_retries=0)
    try:
        with pytest.raises(lora.AdapterError, match="sha256"):
            runner.run(_specs(learner, bad)[:1])
    finally:
        runner.close()


class DieOnce:
    """A train function that kills its process the first time (while a marker file
    exists), as an OOM kill would: the actor dies mid-trial."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __call__(self, *args, **kwargs):
        if self.marker.exists():
            self.marker.unlink()
            os._exit(9)
        return lora.train(*args, **kwargs)


def test_a_killed_actors_trial_is_run_again_and_the_cycle_commits_once(cluster, tokenizer, home, tmp_path):
    marker = tmp_path / "die-once"
    marker.touch()
    learner = make_learner(tokenizer, home)
    learner.runner = _runner(tmp_path, workers=1, train_fn=DieOnce(marker))
    try:
        learner.store.ingest([document(*VARN)])
        (report,) = learn(learner)
    finally:
        learner.runner.close()
    assert not marker.exists()  # the actor did die once
    assert report.outcome == "committed"
    store = learner.store
    assert len(store.adapters()) == 1 and store.queue_summary()["done"] == 1
    (cycle,) = store.cycles()
    assert len(store.candidates(cycle["passage_id"])) == len(report.candidates)
    # what was committed is what a local run of the same cycle commits
    twin = make_learner(tokenizer, tmp_path / "twin")
    twin.store.ingest([document(*VARN)])
    learn(twin)
    assert twin.registry.active(KNOWLEDGE)["sha256"] == learner.registry.active(KNOWLEDGE)["sha256"]


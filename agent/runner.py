"""Trial runners: where a wake cycle's candidate updates are trained and scored.

The wake cycle describes each trial as a ``TrialSpec``, by value: the passage, the
candidate, the seed, the reward questions with their no-update baseline, and the
knowledge version the update starts from (``parent``: its id, folder and sha256). It
hands the specs to a runner, which returns one ``TrialResult`` per spec, in order: the
``TrialOutcome`` (rewards, costs) and, for a trial that trained to the end, the trained
adapter as a standard PEFT folder with its sha256. The cycle loads the chosen folder,
checksum verified, into its knowledge adapter to evaluate and commit it; nothing of a
trial is shared state.

- ``LocalRunner`` (the default) trains the specs one after another on the learner's own
  model, in its scratch ``trial`` adapter (``agent.trial.try_candidate``), and saves each
  trained adapter into a scratch folder of the home (emptied at each run).
- ``agent.scale.ray_runner.RayRunner`` (the ``ray`` extra) runs them on a pool of actors
  that each hold the base model.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from adapters import files
from adapters.names import TRIAL
from policies.reward import Scores

from .events import OnEvent, ignore
from .learner import Learner
from .trial import Candidate, TrialOutcome, try_candidate

RUNNERS = ("local", "ray")


@dataclass(frozen=True)
class RunnerConfig:
    kind: str = field(default="local", metadata={"help": "where trials run: local (in the daemon, one after another) | ray (a pool of actors; the `ray` extra)"})
    address: str = field(default="", metadata={"help": "ray: the cluster to join (auto, or ray://HOST:10001); empty = start a private one on this machine"})
    workers: int = field(default=2, metadata={"help": "ray: trial actors, each holding the base model"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "ray: CPUs reserved by each actor (its torch threads)"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "ray: GPUs per actor; a fraction lets several small-model actors share one card"})
    max_retries: int = field(default=2, metadata={"help": "ray: a trial whose actor died is run again this often (the actor is restarted)"})

    def __post_init__(self) -> None:
        if self.kind not in RUNNERS:
            raise ValueError(f"kind: expected one of {', '.join(RUNNERS)}, got {self.kind!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.max_retries < 0:
            raise ValueError("cpus_per_worker must be > 0, gpus_per_worker and max_retries >= 0")


@dataclass(frozen=True)
class ParentRef:
    """The knowledge version a trial starts from: None for the base model (a fresh LoRA)."""

    id: str | None = None
    path: str | None = None  # its PEFT folder
    sha256: str | None = None


@dataclass(frozen=True)
class TrialSpec:
    """One trial, by value: what a worker in another process needs to run it."""

    idx: int  # its place among the cycle's candidates
    passage: dict  # id, title, text
    candidate: Candidate
    seed: int
    reward_qs: tuple[dict, ...]  # question, answer: scored closed book after the update
    baseline: Scores  # the same questions before it
    teacher_scores: Scores | None = None  # asked open book (a reward relative to the teacher needs it)
    beside_passage: bool = False  # a passage-only trial is in the same set (see try_candidate)
    parent: ParentRef = ParentRef()


@dataclass(frozen=True)
class TrialResult:
    spec: TrialSpec
    outcome: TrialOutcome
    adapter: Path | None = None  # the trained adapter's PEFT folder (None: it did not train to the end)
    sha256: str | None = None  # of its adapter_model.safetensors

    def load_into(self, peft_model, adapter: str) -> None:
        """Put the trained weights into a named adapter, checking the sha256 first."""
        if self.adapter is None:
            raise ValueError(f"trial {self.spec.idx} has no trained adapter")
        files.load(peft_model, adapter, self.adapter, expected_sha256=self.sha256)


class TrialRunner(Protocol):
    name: str

    def run(self, specs: Sequence[TrialSpec], *, beat: Callable[[], None] | None = None,
            on_event: OnEvent = ignore) -> list[TrialResult]:
        """Run every spec; the results in the specs' order. ``beat`` is called while
        they run (a claim's heartbeat; it may raise to abandon them)."""
        ...

    def close(self) -> None: ...


def passage_spec(passage: dict) -> dict:
    """The part of a passage row a trial needs."""
    return {"id": passage["id"], "title": passage["title"], "text": passage["text"]}


def run_spec(learner: Learner, spec: TrialSpec, folder: Path, *, beat: Callable[[], None] | None = None,
             on_event: OnEvent = ignore) -> TrialResult:
    """One spec on a learner whose knowledge adapter holds the spec's parent: the
    trial (``try_candidate``), and its trained adapter saved at ``folder``."""
    o = try_candidate(learner, spec.passage, spec.candidate, spec.seed, list(spec.reward_qs), spec.baseline,
                      idx=spec.idx, beside_passage=spec.beside_passage, beat=beat, on_event=on_event,
                      teacher_scores=spec.teacher_scores)
    if not o.ok:
        return TrialResult(spec, o)
    return TrialResult(spec, o, folder, files.save(learner.model, TRIAL, folder))


def runner_of(learner: Learner) -> TrialRunner:
    """The learner's runner: the one set on it (``learner.runner``), else a local one
    whose scratch folder is ``trials`` beside the adapters."""
    if learner.runner is None:
        learner.runner = LocalRunner(learner, learner.registry.root.parent / SCRATCH)
    return learner.runner


SCRATCH = "trials"


class LocalRunner:
    """The specs one after another on the learner's model (its knowledge adapter is the
    parent: the wake cycle makes specs from the version it has loaded)."""

    name = "local"

    def __init__(self, learner: Learner, scratch: Path):
        self.learner, self.scratch = learner, Path(scratch)

    def run(self, specs: Sequence[TrialSpec], *, beat: Callable[[], None] | None = None,
            on_event: OnEvent = ignore) -> list[TrialResult]:
        self.clear()
        out = []
        for spec in specs:
            out.append(run_spec(self.learner, spec, self.scratch / f"trial-{spec.idx:02d}", beat=beat,
                                on_event=on_event))
            if beat is not None:
                beat()
        return out

    def clear(self) -> None:
        """Remove the previous run's folders (a crash may have left them too)."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def close(self) -> None:
        self.clear()

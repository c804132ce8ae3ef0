"""The wake cycle: learn one passage the SEAL way.

``wake_cycle`` reads top to bottom: questions -> baseline -> self-edits -> one trial
per candidate (``agent.trial.try_candidate``, the step the benchmarks and the editor
share, run by a trial runner: ``agent.runner``) -> select -> evaluate -> commit (or
record why not). Trials are specs handed to the runner, which returns each trained
adapter as a PEFT folder, so the active ``knowledge`` adapter is never touched until
a winner is chosen and loaded from its folder (sha256 checked); the commit writes
the adapter's files atomically and then, in one store transaction, the adapter row,
the active pointer, the cycle, every candidate, the evaluations and the job's state. A crash anywhere before that transaction leaves
the previous adapter active and the passage claimable again.

Each step is announced as an ``agent.events.Event`` (start, end, training progress),
which is what progress bars and the speed benchmark read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from adapters.names import KNOWLEDGE
from policies import selection as selections
from policies.reward import Scores, relative_to
from store import Job

from .events import END, START, Event, OnEvent, ignore
from .learner import Learner
from .runner import ParentRef, TrialSpec, passage_spec, runner_of
from .trial import PASSAGE, Candidate, TrialOutcome, candidates_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WakeConfig:
    renamed: ClassVar[dict[str, str]] = {"heartbeat_s": "claim_heartbeat_s"}  # old seal.toml keys

    candidates: int = field(default=3, metadata={"help": "self-edits sampled per passage (N of best-of-N)"})
    self_edit_tokens: int = field(default=192, metadata={"help": "longest self-edit, in tokens"})
    answer_tokens: int = field(default=32, metadata={"help": "longest closed-book answer when grading"})
    forgetting_sample: int = field(default=4, metadata={"help": "earlier passages re-evaluated after each commit (rotating)"})
    claim_heartbeat_s: float = field(default=30.0, metadata={"help": "how often a claimed job's heartbeat is written while it is learned (s)"})
    stale_after_s: float = field(default=300.0, metadata={"help": "a claim with no heartbeat for this long is requeued (s)"})
    max_attempts: int = field(default=3, metadata={"help": "a passage that fails this often is marked failed"})
    max_deferrals: int = field(default=20, metadata={"help": "a passage given back this often by a temporary fault (disk full, out of memory, a locked store) is marked failed; 0 = never"})
    seed: int = field(default=0, metadata={"help": "base seed of sampling and training"})
    track: bool = field(default=True, metadata={"help": "after a commit, record general drift and verbatim memorisation of the new version"})


@dataclass(frozen=True)
class CycleReport:
    passage_id: int
    title: str
    outcome: str  # committed | rejected | failed | deferred
    reason: str
    adapter_id: str | None
    baseline: Scores | None
    chosen: int | None
    candidates: list[dict]
    timings: dict[str, float]
    probe_before: Scores | None = None
    probe_after: Scores | None = None


class ClaimLost(RuntimeError):
    """Another worker took this job back (our heartbeat went stale): do not commit."""


class StopRequested(BaseException):  # noqa: N818 - an exit request, like KeyboardInterrupt
    """A warm stop was requested (the daemon got SIGTERM): abandon the cycle at the next
    heartbeat. A BaseException, so that no ``except Exception`` records it as a failure."""


class _Steps:
    """Times the cycle's named steps, announces them, and keeps the claim alive: the
    job's heartbeat is written after every step and, within a trial, at most once per
    ``claim_heartbeat_s`` (a long trial would otherwise look dead to another worker's
    recovery). When ``should_stop`` turns true, the next beat raises StopRequested."""

    def __init__(self, learner: Learner, job: Job, on_event: OnEvent, should_stop: Callable[[], bool] | None):
        self.store, self.job, self.every = learner.store, job, learner.cfg.claim_heartbeat_s
        self.on_event, self.should_stop = on_event, should_stop
        self.timings: dict[str, float] = {}
        self.last_beat = time.monotonic()

    def beat(self, force: bool = False) -> None:
        if self.should_stop is not None and self.should_stop():
            raise StopRequested(f"stop requested while learning passage {self.job.passage_id}")
        if force or time.monotonic() - self.last_beat >= self.every:
            self.store.heartbeat(self.job.id)
            self.last_beat = time.monotonic()

    @contextlib.contextmanager
    def __call__(self, name: str, message: str = "") -> Iterator[None]:
        self.on_event(Event(name, START, message))
        t0 = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - t0)
        self.on_event(Event(name, END))
        self.beat(force=True)

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds


def wake_cycle(learner: Learner, job: Job, on_event: OnEvent = ignore,
               should_stop: Callable[[], bool] | None = None) -> CycleReport:
    """Learn one claimed passage. Returns what happened; the store has it all. If
    ``should_stop`` turns true, the next heartbeat raises StopRequested (nothing of
    the cycle is recorded; the caller gives the claim back)."""
    store, cfg, pol = learner.store, learner.cfg, learner.policies
    passage = store.passage(job.passage_id)
    title = passage["title"]
    steps = _Steps(learner, job, on_event, should_stop)
    started = time.time()
    seed = cfg.seed + passage["id"] * 1000 + job.attempts
    parent = learner.registry.active(KNOWLEDGE)

    # 2. questions: reward (selects) and probe (held out, measured only)
    with steps("questions", f"questions for '{title}'"):
        reward_qs, probe_qs = learner.question_set(passage)

    # 3. the no-update baseline, closed book (and the teacher, reading, when the reward is relative to it)
    with steps("baseline"):
        baseline = learner.score(KNOWLEDGE, title, reward_qs)
        teacher_scores = learner.score(KNOWLEDGE, title, reward_qs, context=passage["text"]) \
            if relative_to(pol.reward) == "teacher" else None

    # 4. candidates: the passage alone (the reference) and N self-edits, batched
    with steps("generate", f"writing {cfg.candidates} self-edits ({pol.self_edit})"):
        written = learner.sample_self_edits(passage, pol.sampled(cfg.candidates), seed)
    edits = [Candidate(name, text, n) for name, text, n in written]
    cands = candidates_of(pol, edits)

    # 5. one trial update per candidate, scored on the reward questions: specs, by
    # value, handed to the trial runner (local by default), which returns each trained
    # adapter as a PEFT folder with its sha256
    ref = ParentRef(parent["id"], str(learner.registry.root / parent["path"]), parent["sha256"]) if parent else ParentRef()
    specs = [TrialSpec(idx, passage_spec(passage), cand, seed + idx, tuple(reward_qs), baseline, teacher_scores,
                       beside_passage=cands[0].policy == PASSAGE, parent=ref) for idx, cand in enumerate(cands)]
    results = runner_of(learner).run(specs, beat=steps.beat, on_event=on_event)
    outcomes: list[TrialOutcome] = [r.outcome for r in results]
    for o in outcomes:
        if o.result is not None:
            steps.add("train", o.result.seconds)
            steps.add("score", o.score_seconds)
    steps.beat(force=True)
    per_edit_s = steps.timings.get("generate", 0.0) / max(len(edits), 1)
    rows = [_candidate_row(i, o, per_edit_s) for i, o in enumerate(outcomes)]

    # 6. select, with margins
    choice = selections.get(pol.selection)([o.as_trial(i) for i, o in enumerate(outcomes)], pol.min_gain,
                                           pol.edit_margin)
    on_event(Event("select", END, choice.reason))

    # 7. evaluate: the new passage's probes before/after, and earlier passages' probes
    with steps("evaluate"):
        probe_before = learner.score(KNOWLEDGE, title, probe_qs) if probe_qs else None
        if choice.idx is not None:
            results[choice.idx].load_into(learner.model, KNOWLEDGE)
            rows[choice.idx]["chosen"] = 1
        probe_after, earlier = _evaluate_new(learner, passage, probe_qs, job) if choice.idx is not None else (None, [])

    cycle = {
        "passage_id": passage["id"], "job_id": job.id, "started_at": started,
        "parent_adapter": parent["id"] if parent else None, "baseline_logprob": baseline.logprob,
        "baseline_acc": baseline.accuracy, "n_reward": len(reward_qs), "n_probe": len(probe_qs),
        "tokens": json.dumps({"generate": sum(c.n_tokens for c in edits),
                              **({"train": sum(o.result.tokens for o in outcomes if o.result)}
                                 if any(o.result for o in outcomes) else {})}),
        "reason": choice.reason,
    }
    evals = [_eval_row(cycle["parent_adapter"], passage["id"], "probe", probe_before)] if probe_before else []
    if choice.idx is None:
        store.record_cycle({**cycle, "outcome": "rejected", "timings": json.dumps(steps.timings)}, rows, evals,
                           job_id=job.id)
        return CycleReport(passage["id"], title, "rejected", choice.reason, None, baseline, None, rows,
                           steps.timings, probe_before)

    adapter_id = _commit(learner, job, steps, cycle, rows, evals, outcomes[choice.idx], probe_after, earlier)
    if cfg.track:  # drift and memorisation of the new version (never fails the commit)
        from .tracking import track

        on_event(Event("track", START))  # after the commit: no heartbeat, no stop check
        track(learner, adapter_id, [passage["id"], *(pid for pid, _ in earlier)])
        on_event(Event("track", END))
    return CycleReport(passage["id"], title, "committed", choice.reason, adapter_id, baseline,
                       choice.idx, rows, steps.timings, probe_before, probe_after)


def _candidate_row(idx: int, o: TrialOutcome, per_edit_s: float) -> dict:
    """A candidates-table row of one trial (the RL data: text, rewards, costs)."""
    c = o.candidate
    row = {"policy": c.policy, "idx": idx, "text": c.text, "prompt": "", "n_tokens": c.n_tokens,
           "n_examples": o.n_examples, "chosen": 0, "note": o.note,
           "transfer": json.dumps([a.as_dict() for a in o.transfer]) if o.transfer else None}
    if o.result is None:  # not trained: nothing but the note to record
        return row
    return {**row, "reward": o.reward if math.isfinite(o.reward) else None,
            "reward_logprob": o.reward_logprob, "reward_acc": o.reward_acc, "reward_f1": o.reward_f1,
            "train_loss": o.result.final_loss, "gen_seconds": per_edit_s if c.text else 0.0,
            "train_seconds": o.result.seconds, "score_seconds": o.score_seconds}


def _evaluate_new(learner: Learner, passage: dict, probe_qs: list[dict], job: Job) -> tuple[Scores | None, list]:
    """With the chosen update in the knowledge adapter: the new passage's probes, and
    the probes of a rotating sample of earlier passages (the forgetting matrix)."""
    store = learner.store
    after = learner.score(KNOWLEDGE, passage["title"], probe_qs) if probe_qs else None
    earlier = []
    for pid in store.learned_sample(passage["id"], learner.cfg.forgetting_sample, job.id):
        qs = store.questions(pid, role="probe")
        if qs:
            earlier.append((pid, learner.score(KNOWLEDGE, store.passage(pid)["title"], qs)))
    return after, earlier


def _commit(learner: Learner, job: Job, steps: _Steps, cycle: dict, rows: list[dict], evals: list[dict],
            chosen: TrialOutcome, probe_after: Scores | None, earlier: list) -> str:
    """Files first (atomic), then one transaction for the adapter row, the active
    pointer and everything the cycle recorded; returns the new version's id."""
    store, pid = learner.store, cycle["passage_id"]
    steps.on_event(Event("commit", START))
    t0 = time.perf_counter()

    def record(new_id: str) -> None:
        if not store.holds_claim(job.id, learner.worker):
            raise ClaimLost(f"job {job.id} was taken back from this worker: not committing")
        steps.timings["commit"] = time.perf_counter() - t0
        ev = list(evals)
        if probe_after:
            ev.append(_eval_row(new_id, pid, "probe", probe_after))
        ev += [_eval_row(new_id, p, "probe", s) for p, s in earlier]
        store.record_cycle({**cycle, "outcome": "committed", "adapter_id": new_id,
                            "timings": json.dumps(steps.timings)}, rows, ev, job_id=job.id)

    adapter_id = learner.registry.commit(
        learner.model, KNOWLEDGE, name=KNOWLEDGE, kind="wake", parent_id=cycle["parent_adapter"],
        passage_id=pid, policy=chosen.candidate.policy, reward=chosen.reward,
        metrics={"baseline": cycle["baseline_logprob"], "reward_logprob": chosen.reward_logprob,
                 "reward_acc": chosen.reward_acc, "probe_acc": probe_after.accuracy if probe_after else None},
        in_transaction=record,
    )
    steps.on_event(Event("commit", END))
    return adapter_id


def _eval_row(adapter_id: str | None, passage_id: int, kind: str, s: Scores) -> dict:
    return {"adapter_id": adapter_id, "passage_id": passage_id, "kind": kind,
            "accuracy": s.accuracy, "f1": s.f1, "logprob": s.logprob, "n": s.n}


# Faults of the machine rather than of the passage: they do not count as an attempt.
TEMPORARY = (OSError, MemoryError, sqlite3.OperationalError)


def learn(learner: Learner, max_passages: int | None = None, on_event: OnEvent = ignore,
          should_stop: Callable[[], bool] = lambda: False,
          on_report: Callable[[CycleReport], None] | None = None, recover: bool = True) -> list[CycleReport]:
    """Drain the queue (burst mode): claim, learn, repeat. A failure is recorded on
    the job (retried up to max_attempts) and the loop goes on; a temporary fault
    (``TEMPORARY``: disk full, out of memory, a locked database) gives the job back
    without counting the attempt and stops the loop (outcome ``deferred``: the caller
    backs off). A job whose worker died on it ``max_attempts`` times is marked failed
    when the queue is next claimed from, so a poison passage never blocks it. When ``should_stop``
    turns true mid-cycle, the cycle is abandoned at its next heartbeat: the live
    adapter is reloaded from the store and the claim given back without counting an
    attempt, and the loop stops. ``recover``: first give back dead workers' claims and
    remove half-written folders (the daemon did that once, at its start)."""
    if recover:
        learner.recover()
    reports: list[CycleReport] = []
    while (max_passages is None or len(reports) < max_passages) and not should_stop():
        job = learner.store.claim_next(learner.worker, max_attempts=learner.cfg.max_attempts)
        if job is None:
            break
        try:
            reports.append(wake_cycle(learner, job, on_event, should_stop))
            if on_report:
                on_report(reports[-1])
        except StopRequested:
            learner.reload_active()
            learner.store.release_claim(learner.worker, job.id)
            log.info("stop requested: gave back passage %s unfinished", job.passage_id)
            break
        except KeyboardInterrupt:
            learner.reload_active()
            learner.store.requeue_claimed_by(learner.worker)
            raise
        except TEMPORARY as e:  # the machine, not the passage: give it back uncounted and back off
            log.warning("temporary fault on passage %s (%s: %s): deferred", job.passage_id, type(e).__name__, e)
            learner.reload_active()
            state = learner.store.defer_job(job.id, f"{type(e).__name__}: {e}", max_deferrals=learner.cfg.max_deferrals)
            p = learner.store.passage(job.passage_id) or {"title": "?"}
            reports.append(CycleReport(job.passage_id, p["title"], "deferred",
                                       f"{type(e).__name__}: {e} (temporary{'; job failed: deferred too often' if state == 'failed' else ''})",
                                       None, None, None, [], {}))
            if on_report:
                on_report(reports[-1])
            break
        except Exception as e:  # a bug or a bad passage: record it and go on
            log.exception("wake cycle failed on passage %s", job.passage_id)
            learner.reload_active()
            state = learner.store.fail_job(job.id, f"{type(e).__name__}: {e}", learner.cfg.max_attempts)
            p = learner.store.passage(job.passage_id) or {"title": "?"}
            reports.append(CycleReport(job.passage_id, p["title"], "failed", f"{type(e).__name__}: {e} (job {state})",
                                       None, None, None, [], {}))
            if on_report:
                on_report(reports[-1])
    return reports

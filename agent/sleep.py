"""The sleep phase: consolidate what was learned, keep it only if nothing got worse.

``sleep_phase`` reads top to bottom: measure before -> consolidate into the scratch
``trial`` adapter (replay, dream or merge, by policy) -> measure after -> gate ->
commit (or roll back) -> a ReST-EM round on the editor. The live ``knowledge`` adapter
is never touched until the gate has kept the result; the commit writes the adapter's
files atomically and then, in one store transaction, the adapter row, the active
pointer, the sleep report and the after-measures. A crash (or kill -9) at any point
before that transaction leaves the previous version active; a stop request abandons
the sleep at the next step or training step and commits nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters import lora
from adapters.lora import Example
from adapters.merge import merge_into
from adapters.names import EDITOR, KNOWLEDGE, TRIAL
from policies import consolidation as consolidations
from policies import self_edit as self_edits
from policies.consolidation import MERGE_TYPES, Mix
from policies.reward import Scores

from . import teacher, tracking
from .events import ADVANCE, END, START, Event, OnEvent, ignore
from .trial import Candidate, examples_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SleepConfig:
    policy: str = field(default="replay", metadata={"help": "consolidation policy: replay | dream | merge"})
    recent: int = field(default=4, metadata={"help": "replay: the most recently learned passages always replayed"})
    old_sample: int = field(default=4, metadata={"help": "replay: older passages sampled (seeded, a new sample each sleep)"})
    epochs: int = field(default=3, metadata={"help": "replay/dream: passes over the mix"})
    lr: float = field(default=0.0, metadata={"help": "replay/dream: learning rate; 0 = lora.lr"})
    dreams: int = field(default=8, metadata={"help": "dream: free generations of the base model from BOS mixed in"})
    dream_tokens: int = field(default=64, metadata={"help": "dream: longest free generation, in tokens"})
    dream_temperature: float = field(default=1.0, metadata={"help": "dream: sampling temperature of the free generations"})
    dream_top_p: float = field(default=0.95, metadata={"help": "dream: nucleus sampling of the free generations"})
    merge_versions: int = field(default=3, metadata={"help": "merge: the last N committed knowledge versions combined"})
    merge_type: str = field(default="ties_svd", metadata={"help": "merge: peft combination type: " + " | ".join(MERGE_TYPES)})
    density: float = field(default=0.5, metadata={"help": "merge: fraction of values kept by TIES/DARE/magnitude pruning"})
    max_retention_drop: float = field(default=0.0, metadata={"help": "gate: mean probe accuracy may fall by at most this"})
    max_logprob_drop: float = field(default=0.05, metadata={"help": "gate: mean probe answer log-likelihood (nats/token) may fall by at most this"})
    max_drift_increase: float = field(default=0.02, metadata={"help": "gate: KL from the base on the generic texts may rise by at most this"})
    max_reading_drop: float = field(default=0.1, metadata={"help": "gate: open-book reading accuracy may fall by at most this"})
    measure_budget: int = field(default=32, metadata={"help": "learned passages a sleep measures: the recent ones and a rotating, seeded window of the rest (every one in turn); 0 = all"})
    memorisation_tokens: int = field(default=32, metadata={"help": "memorisation: prefix and continuation length, in tokens"})
    restem: bool = field(default=True, metadata={"help": "run a ReST-EM round on the editor after the consolidation"})
    processes: int = field(default=1, metadata={"help": "replay/dream: train the consolidation in this many processes, data parallel (one per GPU; torchrun, agent.cluster.train_job); 1 = in the daemon's model"})
    seed: int = field(default=0, metadata={"help": "base seed of sampling old passages, dreams and training"})

    def __post_init__(self) -> None:
        try:
            consolidations.CONSOLIDATIONS.get(self.policy)
        except ValueError as e:
            raise ValueError(f"policy: {e}") from None
        if self.merge_type not in MERGE_TYPES:
            raise ValueError(f"merge_type: unknown {self.merge_type!r} (known: {', '.join(MERGE_TYPES)})")
        for name in ("recent", "old_sample", "dreams", "dream_tokens", "merge_versions", "memorisation_tokens",
                     "measure_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.epochs < 1 or self.processes < 1:
            raise ValueError("epochs and processes must be >= 1")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError("lr must be >= 0")
        if not (self.dream_temperature > 0 and 0 < self.dream_top_p <= 1):
            raise ValueError("dream_temperature must be > 0 and dream_top_p in (0, 1]")
        if not 0 < self.density <= 1:
            raise ValueError("density must be in (0, 1]")
        for name in ("max_retention_drop", "max_logprob_drop", "max_drift_increase", "max_reading_drop"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True)
class SleepReport:
    sleep_id: int | None
    outcome: str  # kept | rolled_back | skipped | failed | abandoned (abandoned: not recorded)
    reason: str
    adapter_id: str | None
    before: dict
    after: dict | None
    timings: dict
    editor: object | None = None
    policy: str = ""
    parent_id: str | None = None
    n_examples: int = 0
    n_dreams: int = 0
    train_loss: float | None = None


class Abandoned(Exception):
    """A stop was requested mid-sleep: nothing is committed."""


# ------------------------------------------------------------------- measuring
@dataclass
class Measures:
    summary: dict  # what the sleep report stores (JSON)
    scores: dict[int, Scores]
    drift: dict
    memorisation: list[dict]


def measure(learner, adapter: str, passages: list[int], cfg: SleepConfig,
            should_stop: Callable[[], bool] = lambda: False) -> Measures:
    """Retention of every learned passage, general drift and memorisation, with
    ``adapter`` active."""
    scores = tracking.retention(learner, adapter, passages)
    if should_stop():
        raise Abandoned("stop requested while measuring")
    d = tracking.drift(learner, adapter)
    if should_stop():
        raise Abandoned("stop requested while measuring")
    mem = tracking.memorisation(learner, adapter, passages, cfg.memorisation_tokens, cfg.memorisation_tokens)
    learner.model.set_adapter(KNOWLEDGE)
    summary = {
        "retention": _mean([s.accuracy for s in scores.values()]),
        "logprob": _mean([s.logprob for s in scores.values()]),
        "n_passages": len(scores),
        "per_passage": {str(pid): [s.accuracy, s.logprob] for pid, s in scores.items()},
        "drift_kl": d["kl"],
        "reading_acc": d["reading_acc"],
        "memorisation": _mean([m["exact"] for m in mem]),
        "token_match": _mean([m["token_match"] for m in mem]),
    }
    return Measures(summary, scores, d, mem)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _eval_rows(adapter_id: str | None, scores: dict[int, Scores]) -> list[dict]:
    return [{"adapter_id": adapter_id, "passage_id": pid, "kind": "probe", "accuracy": s.accuracy,
             "f1": s.f1, "logprob": s.logprob, "n": s.n} for pid, s in scores.items()]


def _write_measures(store, adapter_id: str | None, m: Measures) -> None:
    store.add_evaluations(_eval_rows(adapter_id, m.scores))
    store.add_drift({"adapter_id": adapter_id, **m.drift})
    store.add_memorisation([{"adapter_id": adapter_id, **r} for r in m.memorisation])


# ------------------------------------------------------------------------ the gate
def gate(before: dict, after: dict, cfg: SleepConfig) -> tuple[bool, str]:
    """Keep the consolidated weights only if mean retention (accuracy and answer
    log-likelihood of the probe questions) and general drift (KL from the base,
    open-book reading) are no worse than before, within the configured slack."""
    checks = [  # (name, before, after, allowed change, higher is better)
        ("retention", before["retention"], after["retention"], cfg.max_retention_drop, True),
        ("probe log-lik", before["logprob"], after["logprob"], cfg.max_logprob_drop, True),
        ("drift KL", before["drift_kl"], after["drift_kl"], cfg.max_drift_increase, False),
        ("reading", before["reading_acc"], after["reading_acc"], cfg.max_reading_drop, True),
    ]
    worse, seen = [], []
    for name, b, a, slack, up in checks:
        if b is None or a is None:
            continue
        seen.append(f"{name} {b:.3f}->{a:.3f}")
        if not (math.isfinite(a) and (a >= b - slack if up else a <= b + slack)):
            worse.append(f"{name} {'fell' if up else 'rose'} {b:.3f}->{a:.3f} (allowed {'-' if up else '+'}{slack:g})")
    if worse:
        return False, "worse: " + "; ".join(worse)
    return True, "no worse: " + ", ".join(seen)


# ------------------------------------------------------------------ consolidating
def commit_order(learner, learned: list[int]) -> list[int]:
    """Learned passages in the order they were committed (by their latest wake version)."""
    last = learner.store.last_wake_versions(KNOWLEDGE)
    return sorted(learned, key=lambda p: (last.get(p, 0), p))


def committed_examples(learner, passage_id: int) -> list[Example]:
    """A committed passage's training examples, rebuilt from the self-edit its commit
    chose (the passage alone when none is recorded). A distillation candidate is
    re-distilled: its stored transfer set (prompts and the teacher's answers) gets
    fresh teacher targets from the model as it is now, with the passage in view; the
    passage text, when it is in the mix, is goldfish-masked."""
    store = learner.store
    p = store.passage(passage_id)
    committed = {c["id"] for c in store.cycles(passage_id=passage_id) if c["outcome"] == "committed"}
    chosen = [c for c in store.candidates(passage_id) if c["chosen"] and c["cycle_id"] in committed]
    name, edit = (chosen[-1]["policy"], chosen[-1]["text"] or "") if chosen else ("passage", "")
    if name not in self_edits.SELF_EDIT_POLICIES:
        log.warning("passage %s was committed with unknown self-edit policy %r: replaying the passage alone",
                    passage_id, name)
        name, edit = "passage", ""
    stored = json.loads((chosen[-1].get("transfer") if chosen else None) or "[]")
    examples, _ = examples_of(learner, p, Candidate(name, edit), answered=[teacher.Answered(**a) for a in stored])
    return examples


def dream(learner, n: int, cfg: SleepConfig, seed: int) -> list[Example]:
    """``n`` free generations of the base model (adapters disabled) from BOS alone,
    as plain-text examples that continue BOS."""
    if n <= 0:
        return []
    rt, model = learner.runtime, learner.model
    start = rt.tokenizer.bos_token or rt.tokenizer.eos_token
    if not start:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to dream from")
    model.set_adapter(KNOWLEDGE)
    with model.disable_adapter():
        gens = rt.generate([start] * n, max_new_tokens=cfg.dream_tokens, temperature=cfg.dream_temperature,
                           top_p=cfg.dream_top_p, seed=seed)
    return [Example(prompt=start, completion=g.text, goldfish=learner.distill.goldfish) for g in gens if g.text.strip()]


def _train_mix(learner, mix: Mix, cfg: SleepConfig, seed: int, on_event: OnEvent,
               should_stop: Callable[[], bool], timings: dict) -> tuple[lora.TrainResult, int, int]:
    examples = [e for pid in mix.replay for e in committed_examples(learner, pid)]
    n_replay = len(examples)
    t0 = time.perf_counter()
    if mix.dreams:
        on_event(Event("dream", START, f"dreaming {mix.dreams} free generation(s) from BOS"))
        examples += dream(learner, mix.dreams, cfg, seed)
        timings["dream"] = time.perf_counter() - t0
        on_event(Event("dream", END))
    n_dreams = len(examples) - n_replay
    if should_stop():
        raise Abandoned("stop requested before training")
    on_event(Event("consolidate", START, f"consolidating: {n_replay} example(s) of {len(mix.replay)} passage(s) + "
                                         f"{n_dreams} dream(s), {cfg.epochs} epoch(s)"))
    train_cfg = dataclasses.replace(learner.lora_cfg, epochs=cfg.epochs, lr=cfg.lr or learner.lora_cfg.lr, seed=seed)

    def on_step(step: int, total: int, loss: float) -> None:
        if should_stop():
            raise Abandoned(f"stop requested at training step {step}/{total}")
        on_event(Event("consolidate", ADVANCE, "consolidating", done=step, total=total, loss=loss))

    if cfg.processes > 1:
        result = _train_in_processes(learner, examples, train_cfg, cfg.processes, should_stop)
    else:
        lora.copy_adapter(learner.model, KNOWLEDGE, TRIAL)
        try:
            result = lora.train(learner.model, learner.runtime.tokenizer, examples, train_cfg, adapter=TRIAL,
                                progress=on_step)
        finally:
            learner.model.set_adapter(KNOWLEDGE)
    on_event(Event("consolidate", END, tokens=result.tokens, steps=result.steps, loss=result.final_loss))
    return result, n_replay, n_dreams


def _train_in_processes(learner, examples: list, train_cfg: lora.LoraConfig, processes: int,
                        should_stop: Callable[[], bool]) -> lora.TrainResult:
    """The consolidation as a data-parallel job of ``processes`` processes
    (``agent.cluster.train_job``: the knowledge adapter as it is now is the parent); its
    adapter is loaded into the scratch adapter, checksum checked."""
    from .cluster.train_job import JobError, train_into, write_job

    folder = write_job(learner.registry.root.parent / "jobs" / "sleep", learner.runtime.cfg, train_cfg, examples,
                       learner.model, KNOWLEDGE)
    try:
        out = train_into(folder, processes, learner.model, TRIAL, should_stop=should_stop)
    except JobError as e:
        if should_stop():
            raise Abandoned(str(e)) from None
        raise
    finally:
        learner.model.set_adapter(KNOWLEDGE)
    return lora.TrainResult(steps=out["steps"], tokens=out["tokens"], seconds=out["seconds"],
                            losses=tuple(out["losses"]), final_loss=out["final_loss"], nan=out["nan"])


def _merge_versions(learner, mix: Mix, cfg: SleepConfig, seed: int, on_event: OnEvent) -> None:
    on_event(Event("consolidate", START, f"merging {len(mix.versions)} versions ({cfg.merge_type}): "
                                         f"{', '.join(mix.versions)}"))
    states = []
    for vid in mix.versions:
        learner.registry.load_into(learner.model, TRIAL, vid)  # checks the file's sha256
        states.append(lora.snapshot(learner.model, TRIAL))
    merge_into(learner.model, TRIAL, states, mix.weights, cfg.merge_type, density=cfg.density, seed=seed)
    learner.model.set_adapter(KNOWLEDGE)
    on_event(Event("consolidate", END))


# ------------------------------------------------------------------- the phase
def record_skip(store, cfg: SleepConfig, trigger: str, reason: str, parent_id: str | None = None,
                now: float | None = None) -> SleepReport:
    """Record a sleep that had nothing to do (no model needed)."""
    at = time.time() if now is None else now
    sleep_id = store.record_sleep({"started_at": at, "trigger": trigger, "policy": cfg.policy, "outcome": "skipped",
                                   "reason": reason, "parent_adapter": parent_id, "before": {}, "timings": {}},
                                  now=at)
    log.info("sleep %s skipped: %s", sleep_id, reason)
    return SleepReport(sleep_id, "skipped", reason, None, {}, None, {}, policy=cfg.policy, parent_id=parent_id)


@dataclass
class _Sleep:
    """One sleep in progress: what it started from and what it has recorded so far."""

    learner: object
    cfg: SleepConfig
    trigger: str
    on_event: OnEvent
    should_stop: Callable[[], bool]
    now: float | None
    parent_id: str | None = None
    learned: list[int] = field(default_factory=list)
    measured: list[int] = field(default_factory=list)  # the learned passages this sleep measures (measure_budget)
    timings: dict = field(default_factory=dict)
    row: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    t_start: float = field(default_factory=time.perf_counter)

    def finished(self) -> float | None:
        return None if self.now is None else self.now + (time.perf_counter() - self.t_start)

    def report(self, sleep_id: int | None, outcome: str, reason: str, after: dict | None = None,
               adapter_id: str | None = None, **extra) -> SleepReport:
        return SleepReport(sleep_id, outcome, reason, adapter_id, self.before, after, self.timings,
                           policy=self.cfg.policy, parent_id=self.parent_id, **extra)

    def record(self, outcome: str, reason: str, **fields) -> int:
        return self.learner.store.record_sleep({**self.row, "outcome": outcome, "reason": reason,
                                                "before": self.before, "timings": self.timings, **fields},
                                               now=self.finished())


def sleep_phase(learner, cfg: SleepConfig, editor_cfg=None, trigger: str = "manual",
                on_event: OnEvent = ignore, should_stop: Callable[[], bool] = lambda: False,
                now: float | None = None) -> SleepReport:
    """One sleep. Returns what happened; the store has it all (except an abandoned
    sleep, which records nothing but an event, so that the schedule runs it again)."""
    store, registry = learner.store, learner.registry
    parent = registry.active(KNOWLEDGE)
    run = _Sleep(learner, cfg, trigger, on_event, should_stop, now, parent["id"] if parent else None,
                 store.learned_passages())
    if not run.learned:
        return record_skip(store, cfg, trigger, "no learned passage yet", run.parent_id, now=now)
    # the newest committed versions up to the active one: all a merge can combine (not the whole history)
    versions = store.committed_versions(KNOWLEDGE, parent["version"] if parent else None, max(cfg.merge_versions, 1))
    n_sleeps = store.sleep_count()
    seed = cfg.seed + 7919 * n_sleeps  # each sleep samples anew
    run.measured = consolidations.measured_sample(run.learned, cfg.measure_budget, cfg.recent, n_sleeps, cfg.seed)
    mix = consolidations.get(cfg.policy).plan(commit_order(learner, run.learned), versions, cfg, seed)
    if mix.empty:
        return record_skip(store, cfg, trigger, mix.note or "nothing to consolidate", run.parent_id, now=now)
    run.row = {"started_at": time.time() if now is None else now, "trigger": trigger, "policy": cfg.policy,
               "parent_adapter": run.parent_id, "n_examples": 0, "n_dreams": 0}
    try:
        keep, reason, after = _consolidate_and_gate(run, mix, seed)
    except Abandoned as e:
        learner.reload_active()
        store.log_event("sleep_abandoned", {"policy": cfg.policy, "trigger": trigger, "reason": str(e)})
        log.info("sleep abandoned: %s", e)
        return run.report(None, "abandoned", str(e))
    except Exception as e:  # a bug or a broken adapter file: record it, keep what was active
        log.exception("sleep failed")
        learner.reload_active()
        reason = f"{type(e).__name__}: {e}"
        return run.report(run.record("failed", reason), "failed", reason)

    on_event(Event("gate", END, ("keeping: " if keep else "rolling back: ") + reason))
    report = _commit(run, reason, after) if keep else \
        run.report(run.record("rolled_back", reason, after=after and after.summary), "rolled_back", reason,
                   after and after.summary, n_examples=run.row["n_examples"], n_dreams=run.row["n_dreams"],
                   train_loss=run.row.get("train_loss"))
    log.info("sleep %s %s%s: %s", report.sleep_id, report.outcome,
             f" -> {report.adapter_id}" if report.adapter_id else "", report.reason)

    # 5. ReST-EM on the editor: its own round, recorded on its own; never undoes the above
    if (report.outcome in ("kept", "rolled_back") and editor_cfg is not None and cfg.restem
            and getattr(editor_cfg, "enabled", True) and not should_stop()):
        report = dataclasses.replace(report, editor=_editor_round(learner, editor_cfg, report.sleep_id,
                                                                  on_event, should_stop))
    return report


def _consolidate_and_gate(run: _Sleep, mix: Mix, seed: int) -> tuple[bool, str, Measures | None]:
    """Steps 1-4: measure before, consolidate into the scratch adapter, measure after,
    gate. Returns (keep, reason, the after-measures); raises Abandoned on a stop."""
    learner, cfg, store, timings = run.learner, run.cfg, run.learner.store, run.timings
    # 1. before: every learned passage's probes, drift, memorisation (a matrix row)
    of = f" of {len(run.learned)}" if len(run.measured) < len(run.learned) else ""
    run.on_event(Event("measure", START, f"sleep ({cfg.policy}): measuring {len(run.measured)}{of} learned passage(s) before"))
    t0 = time.perf_counter()
    b = measure(learner, KNOWLEDGE, run.measured, cfg, run.should_stop)
    _write_measures(store, run.parent_id, b)
    run.before = b.summary
    timings["measure_before"] = time.perf_counter() - t0
    run.on_event(Event("measure", END))

    # 2. consolidate into the scratch adapter
    t0 = time.perf_counter()
    result = None
    if consolidations.get(cfg.policy).trains:
        result, run.row["n_examples"], run.row["n_dreams"] = _train_mix(learner, mix, cfg, seed, run.on_event,
                                                                        run.should_stop, timings)
        run.row["train_loss"] = result.final_loss
    else:
        _merge_versions(learner, mix, cfg, seed, run.on_event)
    timings["consolidate"] = time.perf_counter() - t0 - timings.get("dream", 0.0)
    if run.should_stop():
        raise Abandoned("stop requested after consolidating")
    if result is not None and result.nan:
        return False, "non-finite training loss: consolidation aborted", None

    # 3. after, on the consolidated weights; 4. the gate
    run.on_event(Event("measure", START, "measuring after"))
    t0 = time.perf_counter()
    a = measure(learner, TRIAL, run.measured, cfg, run.should_stop)
    timings["measure_after"] = time.perf_counter() - t0
    run.on_event(Event("measure", END))
    keep, reason = gate(run.before, a.summary, cfg)
    if run.should_stop():
        raise Abandoned("stop requested before the commit")
    return keep, reason, a


def _commit(run: _Sleep, reason: str, a: Measures) -> SleepReport:
    """The gate kept it: files first (atomic), then the adapter row, the active pointer,
    the sleep report and the after-measures in one transaction."""
    learner, store, model = run.learner, run.learner.store, run.learner.model
    before, after = run.before, a.summary
    sleep_ids: list[int] = []
    t0 = time.perf_counter()

    def record(new_id: str) -> None:
        run.timings["commit"] = time.perf_counter() - t0
        sleep_ids.append(run.record("kept", reason, after=after, adapter_id=new_id))
        _write_measures(store, new_id, a)

    run.on_event(Event("commit", START))
    try:
        adapter_id = learner.registry.commit(
            model, TRIAL, name=KNOWLEDGE, kind="sleep", parent_id=run.parent_id, passage_id=None,
            policy=run.cfg.policy, reward=None,
            metrics={"sleep": True, "retention_before": before["retention"], "retention_after": after["retention"],
                     "drift_kl_before": before["drift_kl"], "drift_kl_after": after["drift_kl"]},
            in_transaction=record,
        )
    except Exception as e:
        log.exception("sleep commit failed")
        learner.reload_active()
        why = f"commit failed: {type(e).__name__}: {e}"
        return run.report(run.record("failed", why, after=after), "failed", why, after)
    lora.copy_adapter(model, TRIAL, KNOWLEDGE)  # the live adapter is the committed one now
    model.set_adapter(KNOWLEDGE)
    run.on_event(Event("commit", END))
    return run.report(sleep_ids[0], "kept", reason, after, adapter_id, n_examples=run.row["n_examples"],
                      n_dreams=run.row["n_dreams"], train_loss=run.row.get("train_loss"))


def _editor_round(learner, editor_cfg, sleep_id: int | None, on_event: OnEvent,
                  should_stop: Callable[[], bool]) -> object:
    t = time.time()
    try:
        from .editor import restem_round

        return restem_round(learner, editor_cfg, sleep_id, on_event=on_event, should_stop=should_stop)
    except Exception as e:
        log.exception("ReST-EM round failed (the sleep's result stands)")
        reason = f"{type(e).__name__}: {e}"
        try:
            learner.reload_active()
            learner.load_editor()  # the live editor must equal the store's active version again
            editor = learner.registry.active(EDITOR)
            learner.store.record_editor_round({"sleep_id": sleep_id, "started_at": t, "outcome": "failed",
                                               "reason": reason, "parent_adapter": editor["id"] if editor else None})
        except Exception:
            log.exception("could not record the failed ReST-EM round")
        return {"outcome": "failed", "reason": reason}
    finally:
        learner.model.set_adapter(KNOWLEDGE)

"""Benchmarks. ``squad``: SEAL's single-passage knowledge-incorporation protocol.

For each of N passages drawn with a seed, every condition starts from the base model
with a fresh LoRA and is measured closed book on the passage's *probe* questions:

- ``base``: no update;
- ``passage``: a LoRA on the passage alone;
- one row per self-edit policy: a LoRA on passage + one sampled self-edit;
- ``best-of-N``: N self-edits of the configured policy plus the passage-only trial,
  selected on the *reward* questions exactly as the wake cycle does (with margins);
  the probe questions never take part in selection;
- ``restem-<r>``: a LoRA on passage + one self-edit written by the editor after
  ReST-EM round r (``agent.bench.editor``: trained on tune-split passages, never on
  an evaluated one);
- ``open-book``: no update, the passage in the prompt (the ceiling).

Every condition is graded per probe question (SQuAD-normalised containment and token
F1); rows give both with 95% bootstrap intervals, and the seconds and tokens (trained
+ generated) per passage. Each passage's seeds depend only on (seed, its index), so a
resumed run (``previous``) reproduces an uninterrupted one.

Passages are split by title into a *tune* split (crc32(title) % 5 == 0) and an *eval*
split. Benchmarks draw from the eval split by default; anything tuned (prompts,
margins, hyper-parameters) is tuned on the tune split only.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from adapters import lora
from adapters.names import EDITOR, KNOWLEDGE, TRIAL
from adapters.registry import AdapterRegistry
from policies import selection as selections
from policies.questions import split_roles
from policies.reward import Scores
from store import Store

from ..config import Config
from ..datasets import data_id
from ..learner import Learner
from ..runtime import Runtime
from ..trial import PASSAGE, Candidate, TrialOutcome, candidates_of, try_candidate
from .common import DEFAULT_POLICIES, bootstrap_ci, draw, load_squad, versions


def summary(condition: str, records: list[dict]) -> dict:
    """One row of the table from the per-passage records: accuracy and token F1 over all
    probe questions with 95% bootstrap intervals; median seconds and tokens per passage."""
    got = [r["conditions"][condition] for r in records if condition in r["conditions"]]
    correct = [float(c) for g in got for c in g["correct"]]
    f1 = [f for g in got for f in g["f1s"]]
    lo, hi = bootstrap_ci(correct)
    f_lo, f_hi = bootstrap_ci(f1)
    return {
        "condition": condition,
        "accuracy": sum(correct) / max(len(correct), 1),
        "ci95": [lo, hi],
        "f1": sum(f1) / max(len(f1), 1),
        "f1_ci95": [f_lo, f_hi],
        "questions": len(correct),
        "passages": len(got),
        "seconds_per_passage": statistics.median(g["seconds"] for g in got) if got else 0.0,
        "tokens_per_passage": statistics.median(g["tokens"] for g in got) if got else 0,
    }


def run_squad(
    runtime: Runtime,
    cfg: Config,
    *,
    data_path: Path,
    passages: int,
    seed: int,
    split: str = "eval",
    policies: tuple[str, ...] = DEFAULT_POLICIES,
    candidates: int | None = None,
    editors: dict[str, dict] | None = None,
    editor_info: dict | None = None,
    previous: dict | None = None,
    say: Callable[[str], None] = lambda _m: None,
    on_passage: Callable[[int, int], None] = lambda _i, _n: None,
    on_result: Callable[[dict], None] | None = None,
) -> dict:
    """Run the protocol; returns the JSON-able result (config, versions, rows, per
    passage). ``editors`` (row name -> editor weights, from ``agent.bench.editor``) add one
    row each: a LoRA on passage + one self-edit written by that editor. ``previous``
    (an interrupted run's result, same settings) is continued: its passages are kept,
    not re-run; every passage's seeds depend only on (seed, index), so a resumed run
    gives the figures of an uninterrupted one."""
    data = draw(load_squad(data_path), passages, seed, split)
    editors = editors or {}
    trained_on = set((editor_info or {}).get("passages", []))
    overlap = trained_on & {d["title"] for d in data}
    if overlap:
        raise ValueError(f"the editors were trained on evaluated passages (e.g. {sorted(overlap)[0]!r})")
    n_cand = cfg.wake.candidates if candidates is None else candidates
    pol = cfg.policies
    conds = ["base", "passage", *policies, f"best-of-{n_cand}", *editors, "open-book"]
    setup = {
        "benchmark": "squad", "data": data_id(data_path), "split": split, "seed": seed, "planned": len(data),
        "conditions": conds,
        "config": {"lora": asdict(cfg.lora), "policies": asdict(pol), "wake": asdict(cfg.wake), "model": runtime.name},
        "editors": editor_info,
    }
    setup = json.loads(json.dumps(setup))  # as it reads back from the file
    per_passage: list[dict] = []
    if previous:
        differ = [k for k in setup if previous.get(k) != setup[k]]
        if differ:
            raise ValueError(f"cannot resume: the saved run differs in {', '.join(differ)}")
        per_passage = list(previous.get("per_passage", []))
    started = time.perf_counter()

    def result() -> dict:
        return {
            **setup,
            "passages": len(per_passage),
            "rows": [summary(c, per_passage) for c in conds],
            "best_of_n_breakdown_median_s": {k: statistics.median(p["best_of_n_s"][k] for p in per_passage)
                                             for k in ("generate", "train", "score")} if per_passage else {},
            "versions": versions(),
            "seconds": (previous or {}).get("seconds", 0.0) + time.perf_counter() - started,
            "per_passage": per_passage,
        }

    if len(per_passage) < len(data):
        tmp = Path(tempfile.mkdtemp(prefix="seal-bench-"))
        store = Store(tmp / "store.db")  # a fresh home: nothing learned, nothing shared
        learner = Learner(runtime, store, AdapterRegistry(tmp / "adapters", store), cfg.lora, pol, cfg.wake)
        try:
            for i in range(len(per_passage), len(data)):
                per_passage.append(_one_passage(learner, runtime, pol, data[i], i, seed, policies, n_cand,
                                                editors, say, len(data)))
                on_passage(i + 1, len(data))
                if on_result:
                    on_result(result())  # a partial result survives an interrupted run
        finally:
            store.close()
    return result()


def _one_passage(learner: Learner, runtime: Runtime, pol, d: dict, i: int, seed: int, policies: tuple[str, ...],
                 n_cand: int, editors: dict[str, dict], say: Callable[[str], None], n_data: int) -> dict:
    """All conditions for one passage: its record (per condition: per-question grades,
    seconds, tokens). Every update is one ``try_candidate`` from a fresh LoRA; the
    best-of-N row selects among the same candidates as the wake cycle would
    (``candidates_of``), by the same rule, on the reward questions only."""
    t_passage = time.perf_counter()
    title, text = d["title"], d["context"]
    passage = {"title": title, "text": text}
    qs = [{"id": j, "question": q["question"], "answer": q["answer"]} for j, q in enumerate(d["questions"])]
    roles = split_roles([q["id"] for q in qs], pol.reward_fraction, seed=seed * 100003 + i)
    reward_qs = [q for q in qs if roles[q["id"]] == "reward"]
    probe_qs = [q for q in qs if roles[q["id"]] == "probe"]
    lora.restore(learner.model, KNOWLEDGE, learner.zero)  # every passage starts from the base model
    say(f"[{i + 1}/{n_data}] {title}: base and open-book")
    record: dict = {"index": i, "title": title, "n_reward": len(reward_qs), "n_probe": len(probe_qs), "conditions": {}}

    def add(cond: str, s: Scores, secs: float, toks: int) -> None:
        record["conditions"][cond] = {"accuracy": s.accuracy, "f1": s.f1, "logprob": s.logprob,
                                      "correct": [int(c) for c in s.correct], "f1s": list(s.f1s),
                                      "seconds": secs, "tokens": toks, "answers": list(s.answers)}

    t0 = time.perf_counter()
    base = learner.score(KNOWLEDGE, title, probe_qs)
    add("base", base, time.perf_counter() - t0, 0)
    t0 = time.perf_counter()
    add("open-book", learner.score(KNOWLEDGE, title, probe_qs, context=text), time.perf_counter() - t0, 0)
    baseline_reward = learner.score(KNOWLEDGE, title, reward_qs)

    # one batched generation: one sample per policy, plus N-1 more of the selecting policy
    say(f"[{i + 1}/{n_data}] {title}: writing self-edits")
    names = list(policies) + [pol.self_edit] * max(n_cand - (1 if pol.self_edit in policies else 0), 0)
    t0 = time.perf_counter()
    edits = [Candidate(*e) for e in learner.sample_self_edits(passage, names, seed=seed * 7919 + i)]
    per_edit_s = (time.perf_counter() - t0) / max(len(edits), 1)

    def run_trial(cand: Candidate, k: int) -> tuple[TrialOutcome, Scores | None, float]:
        """One trial and, when it trained to the end, its probe scores (and seconds)."""
        o = try_candidate(learner, passage, cand, seed + 31 * i + k, reward_qs, baseline_reward, idx=k,
                          beside_passage=True)
        if o.result is None:  # the same as passage-only: its probes, at no cost
            return o, p_pass, 0.0
        if not o.ok:  # a non-finite loss: no update to measure
            return o, None, o.result.seconds
        t1 = time.perf_counter()
        p = learner.score(TRIAL, title, probe_qs)
        return o, p, o.result.seconds + o.score_seconds + time.perf_counter() - t1

    def cost(o: TrialOutcome, secs: float) -> tuple[float, int]:
        return secs, (o.result.tokens if o.result else 0)

    say(f"[{i + 1}/{n_data}] {title}: passage-only trial")
    p_pass = None
    o_pass, p_pass, secs = run_trial(Candidate(PASSAGE), 0)
    add("passage", p_pass, *cost(o_pass, secs))
    # best-of-N: the wake cycle's candidates (passage-only, when it trains it, and N samples of its policy)
    pool = [(0, o_pass, p_pass, secs)] if candidates_of(pol, edits)[0].policy == PASSAGE else []
    first_of_policy: set[str] = set()
    texts = []
    for k, cand in enumerate(edits, start=1):
        say(f"[{i + 1}/{n_data}] {title}: trial {k}/{len(edits)} ({cand.policy})")
        o, p, secs = run_trial(cand, k)
        texts.append({"policy": cand.policy, "text": cand.text})
        if cand.policy not in first_of_policy and cand.policy in policies:
            first_of_policy.add(cand.policy)
            s_, t_ = cost(o, secs)
            add(cand.policy, p if p is not None else base, per_edit_s + s_, cand.n_tokens + t_)
        if cand.policy == pol.self_edit and sum(1 for _, c, _, _ in pool if c.candidate.policy != PASSAGE) < n_cand:
            pool.append((k, o, p, secs))
    choice, chosen, bo_time, bo_tokens = _best_of_n(pol, pool, per_edit_s)
    add(f"best-of-{n_cand}", chosen if chosen is not None else base, sum(bo_time.values()), bo_tokens)

    # the editors after ReST-EM rounds: one self-edit each, written by that editor
    for j, (cond, weights) in enumerate(editors.items()):
        say(f"[{i + 1}/{n_data}] {title}: {cond}")
        lora.restore(learner.model, EDITOR, weights)
        t0 = time.perf_counter()
        got = learner.sample_self_edits(passage, [pol.self_edit], seed=seed * 7919 + i, writer=EDITOR)
        gen_s = time.perf_counter() - t0
        cand = Candidate(*got[0]) if got else Candidate(PASSAGE)
        o, p, secs = run_trial(cand, 100 + j)
        texts.append({"policy": cand.policy, "writer": cond, "text": cand.text})
        s_, t_ = cost(o, secs)
        add(cond, p if p is not None else base, gen_s + s_, cand.n_tokens + t_)
    lora.restore(learner.model, EDITOR, learner.zero)

    record.update({
        "choice": None if choice.idx is None else next(o.candidate.policy for k, o, _, _ in pool if k == choice.idx),
        "reason": choice.reason,
        "trials": [asdict(o.as_trial(k)) for k, o, _, _ in pool],
        "best_of_n_s": bo_time,
        "self_edits": texts,
        "seconds": time.perf_counter() - t_passage,
    })
    return record


def _best_of_n(pol, pool: list[tuple[int, TrialOutcome, Scores | None, float]], per_edit_s: float):
    """Selection over the pool of (index, trial, probe scores, seconds) exactly as the
    wake cycle selects: (choice, the chosen trial's probe scores or None, seconds by
    step, tokens generated + trained)."""
    choice = selections.get(pol.selection)([o.as_trial(k) for k, o, _, _ in pool], pol.min_gain, pol.edit_margin)
    chosen = {k: p for k, _, p, _ in pool}.get(choice.idx) if choice.idx is not None else None
    n_edits = sum(1 for _, o, _, _ in pool if o.candidate.policy != PASSAGE)
    seconds = {"generate": per_edit_s * n_edits,
               "train": sum(o.result.seconds for _, o, _, _ in pool if o.result),
               "score": sum(secs - o.result.seconds for _, o, _, secs in pool if o.result)}
    tokens = sum(o.candidate.n_tokens + (o.result.tokens if o.result else 0) for _, o, _, _ in pool)
    return choice, chosen, seconds, tokens

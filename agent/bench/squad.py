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
  ReST-EM round r (``agent.bench_editor``: trained on tune-split passages, never on
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
from adapters.registry import AdapterRegistry
from policies import reward as rewards
from policies import selection as selections
from policies import self_edit as self_edits
from policies.questions import split_roles
from policies.reward import Scores
from store import Store

from ..config import Config
from ..runtime import Runtime
from ..wake import EDITOR, KNOWLEDGE, TRIAL, Learner
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
    passage). ``editors`` (row name -> editor weights, from ``bench_editor``) add one
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
        "benchmark": "squad", "data": str(data_path), "split": split, "seed": seed, "planned": len(data),
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
    seconds, tokens)."""
    t_passage = time.perf_counter()
    title, text = d["title"], d["context"]
    qs = [{"id": j, "question": q["question"], "answer": q["answer"]} for j, q in enumerate(d["questions"])]
    roles = split_roles([q["id"] for q in qs], pol.reward_fraction, seed=seed * 100003 + i)
    reward_qs = [q for q in qs if roles[q["id"]] == "reward"]
    probe_qs = [q for q in qs if roles[q["id"]] == "probe"]
    lora.restore(learner.model, KNOWLEDGE, learner._zero)  # every passage starts from the base model
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
    edits = learner.sample_self_edits({"title": title, "text": text}, names, seed=seed * 7919 + i)
    t_gen = time.perf_counter() - t0
    per_edit_s = t_gen / max(len(edits), 1)

    def run_trial(name: str, edit: str, k: int) -> tuple[Scores | None, Scores | None, float, float, int]:
        examples = self_edits.get(name).examples(title, text, edit, runtime.chat)
        if name != "passage" and self_edits.adds_nothing(examples, title, text):
            # nothing usable beyond the passage: the update would be passage-only's
            # (as in the wake cycle, not trained again, and it cannot win best-of-N)
            return None, p_pass, 0.0, 0.0, 0
        res = learner.trial(examples, seed=seed + 31 * i + k)
        t1 = time.perf_counter()
        if res.nan:
            return None, None, res.seconds, 0.0, res.tokens
        r = learner.score(TRIAL, title, reward_qs)
        p = learner.score(TRIAL, title, probe_qs)
        return r, p, res.seconds, time.perf_counter() - t1, res.tokens

    say(f"[{i + 1}/{n_data}] {title}: passage-only trial")
    p_pass = None
    r_pass, p_pass, tr_s, sc_s, tr_tok = run_trial("passage", "", 0)
    add("passage", p_pass, tr_s + sc_s, tr_tok)
    bo_trials = [selections.Trial(0, "passage", rewards.REWARDS[pol.reward](r_pass, baseline_reward),
                                  rewards.qa_accuracy(r_pass, baseline_reward))]
    bo_probe = {0: p_pass}
    bo_time = {"generate": 0.0, "train": tr_s, "score": sc_s}
    bo_tokens = tr_tok
    first_of_policy: set[str] = set()
    texts = []
    for k, (name, edit, n_tok) in enumerate(edits, start=1):
        say(f"[{i + 1}/{n_data}] {title}: trial {k}/{len(edits)} ({name})")
        r, p, tr_s, sc_s, tr_tok = run_trial(name, edit, k)
        texts.append({"policy": name, "text": edit})
        if name not in first_of_policy and name in policies:
            first_of_policy.add(name)
            add(name, p if p is not None else base,
                per_edit_s + tr_s + sc_s, n_tok + tr_tok)
        if name == pol.self_edit and len(bo_trials) <= n_cand:
            ok = r is not None
            bo_trials.append(selections.Trial(
                k, name,
                rewards.REWARDS[pol.reward](r, baseline_reward) if ok else float("-inf"),
                rewards.qa_accuracy(r, baseline_reward) if ok else float("-inf"), ok=ok))
            if ok:
                bo_probe[k] = p
            bo_time["generate"] += per_edit_s
            bo_time["train"] += tr_s
            bo_time["score"] += sc_s
            bo_tokens += n_tok + tr_tok
    choice = selections.get(pol.selection)(bo_trials, pol.min_gain, pol.edit_margin)
    chosen = bo_probe[choice.idx] if choice.idx is not None else base  # nothing committed
    add(f"best-of-{n_cand}", chosen, sum(bo_time.values()), bo_tokens)

    # the editors after ReST-EM rounds: one self-edit each, written by that editor
    for j, (cond, weights) in enumerate(editors.items()):
        say(f"[{i + 1}/{n_data}] {title}: {cond}")
        lora.restore(learner.model, EDITOR, weights)
        t0 = time.perf_counter()
        got = learner.sample_self_edits({"title": title, "text": text}, [pol.self_edit],
                                        seed=seed * 7919 + i, writer=EDITOR)
        gen_s = time.perf_counter() - t0
        name, edit, n_tok = got[0] if got else ("passage", "", 0)
        r, p, tr_s, sc_s, tr_tok = run_trial(name, edit, 100 + j)
        texts.append({"policy": name, "writer": cond, "text": edit})
        add(cond, p if p is not None else base, gen_s + tr_s + sc_s, n_tok + tr_tok)
    lora.restore(learner.model, EDITOR, learner._zero)

    record.update({
        "choice": None if choice.idx is None else bo_trials[[t.idx for t in bo_trials].index(choice.idx)].policy,
        "reason": choice.reason,
        "trials": [asdict(t) for t in bo_trials],
        "best_of_n_s": bo_time,
        "self_edits": texts,
        "seconds": time.perf_counter() - t_passage,
    })
    return record

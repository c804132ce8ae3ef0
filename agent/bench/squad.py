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

import dataclasses
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from adapters import lora
from adapters.names import EDITOR, KNOWLEDGE, TRIAL
from adapters.registry import AdapterRegistry
from policies import reward as rewards
from policies import selection as selections
from policies import self_edit as self_edits
from policies.questions import split_roles
from policies.reward import Scores, relative_to
from store import Store

from ..config import Config
from ..datasets import data_id
from ..learner import Learner
from ..runtime import Runtime
from ..tracking import continuation_match, kl_from_base
from ..trial import PASSAGE, Candidate, TrialOutcome, candidates_of, try_candidate
from .common import DEFAULT_POLICIES, bootstrap_ci, draw, load_squad, versions

DEFAULT_ROW = "default"  # exactly the wake cycle with the configuration given: its candidates, reward and selection
REWARD_NAMES = ("answer_logprob", "qa_accuracy", "teacher_agreement", "cloze_logprob", "cloze_accuracy",
                "cloze_agreement")
RULE_QUESTIONS = 10  # the reward study's questions made by rule (``self_edit.cloze``), held out from training


def margins(records: list[dict], row: str = DEFAULT_ROW) -> dict:
    """The default row's accuracy minus passage-only's and minus open-book's, paired
    per probe question, with 95% bootstrap intervals (the issue's two targets)."""
    out = {}
    for other in ("passage", "open-book"):
        diffs = [float(a) - float(b) for r in records if row in r["conditions"] and other in r["conditions"]
                 for a, b in zip(r["conditions"][row]["correct"], r["conditions"][other]["correct"], strict=True)]
        if diffs:
            lo, hi = bootstrap_ci(diffs)
            out[f"{row} - {other}"] = {"points": 100 * sum(diffs) / len(diffs), "ci95": [100 * lo, 100 * hi],
                                       "questions": len(diffs)}
    return out


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when undefined."""
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else None


def reward_correlations(records: list[dict]) -> dict:
    """Which reward predicts probe accuracy: Spearman's rho over every trial of the
    reward study, pooled, and within passages (each trial's reward and probe accuracy
    minus its passage's mean: what selection among one passage's candidates sees), and
    on the passages whose trials differ on the probes, how often the trial with the
    highest reward was the best one (``picked_best``) or the reward tied."""
    out = {}
    for name in REWARD_NAMES:
        pooled, within = ([], []), ([], [])
        right = decided = ties = 0
        for r in records:
            rows = [t for t in r.get("reward_study", []) if t.get(name) is not None and math.isfinite(t[name])]
            for t in rows:
                pooled[0].append(t[name])
                pooled[1].append(t["probe_acc"])
            if len(rows) >= 2:
                mr = sum(t[name] for t in rows) / len(rows)
                mp = sum(t["probe_acc"] for t in rows) / len(rows)
                within[0].extend(t[name] - mr for t in rows)
                within[1].extend(t["probe_acc"] - mp for t in rows)
                if len({t["probe_acc"] for t in rows}) > 1:  # the trials differ on the probes: selection matters
                    decided += 1
                    top = [t for t in rows if t[name] == max(u[name] for u in rows)]
                    ties += len(top) > 1
                    right += len(top) == 1 and top[0]["probe_acc"] == max(u["probe_acc"] for u in rows)
        if pooled[0]:
            out[name] = {"trials": len(pooled[0]), "spearman": spearman(*pooled),
                         "spearman_within_passage": spearman(*within),
                         "picked_best": right, "tied": ties, "passages_decided": decided}
    return out


def candidate_ranking(result: dict) -> dict:
    """How well the rewards on the reward questions ranked the default row's candidates
    as their probe accuracy ranks them (read from the saved per-passage records, so any
    result can be studied again): for the selecting reward and the tie-break, Spearman's
    rho within passages, and on the passages where the candidates' probe accuracies
    differ, how often the one candidate with the highest reward also had the highest
    probe accuracy, and how often the reward tied (then the other reward decides).
    Only candidates with a row of their own (passage, a fixed policy) count."""
    selecting = (result.get("config") or {}).get("policies", {}).get("reward", "answer_logprob")
    other = "qa_accuracy" if selecting == "answer_logprob" else "answer_logprob"
    out = {}
    for name, key in ((selecting, "reward"), (other, "other")):
        within: tuple[list[float], list[float]] = ([], [])
        right = decided = ties = 0
        for r in result.get("per_passage", []):
            got = [(t[key], r["conditions"][t["policy"]]["accuracy"]) for t in r.get("trials", [])
                   if t.get("ok") and t["policy"] in r["conditions"] and t[key] is not None and math.isfinite(t[key])]
            if len(got) < 2:
                continue
            mr, mp = sum(g[0] for g in got) / len(got), sum(g[1] for g in got) / len(got)
            within[0].extend(g[0] - mr for g in got)
            within[1].extend(g[1] - mp for g in got)
            if len({g[1] for g in got}) > 1:  # the candidates differ on the probes
                decided += 1
                top = [g for g in got if g[0] == max(h[0] for h in got)]
                ties += len(top) > 1  # the reward could not tell them apart
                right += len(top) == 1 and top[0][1] == max(g[1] for g in got)
        if within[0]:
            out[name] = {"trials": len(within[0]), "spearman_within_passage": spearman(*within),
                         "picked_best": right, "tied": ties, "passages_decided": decided}
    return out


def perfect_pick(result: dict) -> dict | None:
    """The ceiling of selection: the probe accuracy of the default row had it picked,
    on every passage, the candidate that answered the most probe questions (the probes
    as the reward, which no real reward sees). Over the candidates with a row of their
    own, as ``candidate_ranking``; None when no passage had two of them."""
    right = total = compared = 0
    for r in result.get("per_passage", []):
        n = r.get("n_probe") or 0
        got = [sum(r["conditions"][t["policy"]]["correct"]) for t in r.get("trials", [])
               if t.get("ok") and t["policy"] in r["conditions"]]
        if not got or not n:
            continue
        compared += len(got) > 1
        right, total = right + max(got), total + n
    if not compared or not total:
        return None
    return {"accuracy": right / total, "questions": total, "passages_compared": compared}


def _share(memos: list[dict | None]) -> float | None:
    """Share of passages whose 32-token continuation came back verbatim."""
    got = [m["exact"] for m in memos if m and m.get("exact") is not None]
    return sum(got) / len(got) if got else None


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
        "memorised": _share([g.get("memorised") for g in got]),
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
    reward_study: bool = False,
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
    conds = ["base", "passage", *policies, DEFAULT_ROW, *editors, "open-book"]
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
            "margins": margins(per_passage),
            "reward_study": reward_correlations(per_passage),
            "best_of_n_breakdown_median_s": {k: statistics.median(p["best_of_n_s"][k] for p in per_passage)
                                             for k in ("generate", "train", "score")} if per_passage else {},
            "versions": versions(),
            "seconds": (previous or {}).get("seconds", 0.0) + time.perf_counter() - started,
            "per_passage": per_passage,
        }

    if len(per_passage) < len(data):
        tmp = Path(tempfile.mkdtemp(prefix="seal-bench-"))
        store = Store(tmp / "store.db")  # a fresh home: nothing learned, nothing shared
        learner = Learner(runtime, store, AdapterRegistry(tmp / "adapters", store), cfg.lora, pol, cfg.wake,
                          distill=cfg.distill)
        try:
            for i in range(len(per_passage), len(data)):
                per_passage.append(_one_passage(learner, runtime, pol, data[i], i, seed, policies, n_cand,
                                                editors, say, len(data), reward_study))
                on_passage(i + 1, len(data))
                if on_result:
                    on_result(result())  # a partial result survives an interrupted run
        finally:
            store.close()
            shutil.rmtree(tmp, ignore_errors=True)  # the scratch home is the run's own
    return result()


def _one_passage(learner: Learner, runtime: Runtime, pol, d: dict, i: int, seed: int, policies: tuple[str, ...],
                 n_cand: int, editors: dict[str, dict], say: Callable[[str], None], n_data: int,
                 reward_study: bool = False) -> dict:
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
    # the label-free reward's questions: the model's own, verified, never trained on
    label_free = relative_to(pol.reward) == "teacher"
    own_qs, own_base, own_teacher = [], None, None
    if label_free or reward_study:
        say(f"[{i + 1}/{n_data}] {title}: writing its own questions")
        own_qs = [{"id": j, "question": q.question, "answer": q.answer}
                  for j, q in enumerate(learner.write_questions({**passage, "id": i}))]
        own_base = learner.score(KNOWLEDGE, title, own_qs)
        own_teacher = learner.score(KNOWLEDGE, title, own_qs, context=text)
    sel_qs, sel_base = (own_qs, own_base) if label_free else (reward_qs, baseline_reward)
    # the reward study's label-free questions that every passage has: made by rule from
    # the passage (its names and numbers asked for), answered by their span
    rule_qs, rule_base, rule_teacher = [], None, None
    if reward_study:
        rule_qs = [{"id": j, "question": q, "answer": span}
                   for j, (q, span, _s) in enumerate(self_edits.cloze(title, text, RULE_QUESTIONS))]
        rule_base = learner.score(KNOWLEDGE, title, rule_qs)
        rule_teacher = learner.score(KNOWLEDGE, title, rule_qs, context=text)
    study: list[dict] = []
    memorised: dict[int, dict] = {}  # trial index -> verbatim continuation of the passage after it

    # one batched generation: one sample per policy row, then the wake cycle's N samples
    # (pol.sampled(N)); a row's sample is reused as the default's first of that policy
    say(f"[{i + 1}/{n_data}] {title}: writing self-edits")
    writes = [n for n in policies if self_edits.writes(n)]
    row_of = {n: k for k, n in enumerate(writes, start=1)}  # a row's edit: its index in edits, from 1
    wake_edits, extra = [], []
    for n in pol.sampled(n_cand):  # the policies that write
        if n in row_of:
            wake_edits.append(row_of.pop(n))
        else:
            extra.append(n)
            wake_edits.append(len(writes) + len(extra))
    t0 = time.perf_counter()
    edits = [Candidate(*e) for e in learner.sample_self_edits(passage, writes + extra, seed=seed * 7919 + i)]
    per_edit_s = (time.perf_counter() - t0) / max(len(edits), 1)

    def run_trial(cand: Candidate, k: int) -> tuple[TrialOutcome, Scores | None, float]:
        """One trial and, when it trained to the end, its probe scores (and seconds)."""
        o = try_candidate(learner, passage, cand, seed + 31 * i + k, sel_qs, sel_base, idx=k,
                          beside_passage=True, teacher_scores=own_teacher)
        if o.result is None:  # the same as passage-only: its probes, at no cost
            return o, p_pass, 0.0
        if not o.ok:  # a non-finite loss: no update to measure
            return o, None, o.result.seconds
        t1 = time.perf_counter()
        p = learner.score(TRIAL, title, probe_qs)
        (memo,) = continuation_match(learner, TRIAL, {0: (title, text)}) or [{"exact": None, "token_match": None}]
        memorised[k] = {"exact": memo["exact"], "token_match": memo["token_match"]}
        if reward_study or own_qs:  # every reward of this trial beside its probe accuracy (the reward study)
            kl = kl_from_base(learner, TRIAL)[0]
            row = {"policy": cand.policy, "k": k, "probe_acc": p.accuracy, "answer_logprob": o.reward_logprob,
                   "qa_accuracy": o.reward_acc if not label_free else None, "kl": kl}
            if own_qs:
                mine = dataclasses.replace(learner.score(TRIAL, title, own_qs), kl=kl)
                row["teacher_agreement"] = rewards.teacher_agreement(mine, own_teacher)
            if rule_qs and not self_edits.asks_by_rule(cand.policy):  # held out: this trial never saw them
                ruled = dataclasses.replace(learner.score(TRIAL, title, rule_qs), kl=kl)
                row |= {"cloze_logprob": rewards.answer_logprob(ruled, rule_base),
                        "cloze_accuracy": rewards.qa_accuracy(ruled, rule_base),
                        "cloze_agreement": rewards.teacher_agreement(ruled, rule_teacher)}
            study.append(row)
        return o, p, o.result.seconds + o.score_seconds + time.perf_counter() - t1

    def cost(o: TrialOutcome, secs: float) -> tuple[float, int]:
        return secs, (o.result.tokens if o.result else 0)

    say(f"[{i + 1}/{n_data}] {title}: passage-only trial")
    p_pass = None
    o_pass, p_pass, secs = run_trial(Candidate(PASSAGE), 0)
    add("passage", p_pass, *cost(o_pass, secs))
    record["conditions"]["passage"]["memorised"] = memorised.get(0)
    done: dict[int, tuple[TrialOutcome, Scores | None, float]] = {0: (o_pass, p_pass, secs)}
    texts = []
    for k, cand in enumerate(edits, start=1):
        if k > len(writes) and k not in wake_edits:
            continue
        say(f"[{i + 1}/{n_data}] {title}: trial {k}/{len(edits)} ({cand.policy})")
        done[k] = run_trial(cand, k)
        texts.append({"policy": cand.policy, "text": cand.text})
        if k <= len(writes):
            o, p, secs = done[k]
            s_, t_ = cost(o, secs)
            add(cand.policy, p if p is not None else base, per_edit_s + s_, cand.n_tokens + t_)
            record["conditions"][cand.policy]["memorised"] = memorised.get(k if o.result else 0)
    by_text = {(edits[k - 1].policy, edits[k - 1].text): k for k in wake_edits}
    # the rows of policies that write nothing (passage_chat): one fixed candidate each
    for n in (n for n in policies if self_edits.fixed(n)):
        k = max(done) + 1
        say(f"[{i + 1}/{n_data}] {title}: trial {k} ({n})")
        done[k] = run_trial(Candidate(n), k)
        by_text[(n, "")] = k
        o, p, secs = done[k]
        add(n, p if p is not None else base, *cost(o, secs))
        record["conditions"][n]["memorised"] = memorised.get(k if o.result else 0)
    # the default row: the wake cycle's candidates (candidates_of), trained as it trains them
    pool = []
    for cand in candidates_of(pol, [edits[k - 1] for k in wake_edits]):
        k = 0 if cand.policy == PASSAGE else by_text.get((cand.policy, cand.text))
        if k is None:  # not a row's: all the default's self-edits together, or a fixed one
            k = by_text[(cand.policy, cand.text)] = max(done) + 1
            say(f"[{i + 1}/{n_data}] {title}: trial {k} ({cand.policy})")
            done[k] = run_trial(cand, k)
        pool.append((k, *done[k]))
    choice, chosen, bo_time, bo_tokens = _best_of_n(pol, pool, per_edit_s)
    bo_time["generate"] = per_edit_s * len(wake_edits)  # the self-edits it wrote (an augmented one writes none)
    add(DEFAULT_ROW, chosen if chosen is not None else base, sum(bo_time.values()), bo_tokens)
    record["conditions"][DEFAULT_ROW]["memorised"] = memorised.get(choice.idx) if choice.idx is not None else None

    # the editors after ReST-EM rounds: one self-edit each, written by that editor
    for j, (cond, weights) in enumerate(editors.items()):
        say(f"[{i + 1}/{n_data}] {title}: {cond}")
        lora.restore(learner.model, EDITOR, weights)
        t0 = time.perf_counter()
        got = learner.sample_self_edits(passage, [pol.self_edits[0]], seed=seed * 7919 + i, writer=EDITOR)
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
        "n_own_questions": len(own_qs),
        "n_rule_questions": len(rule_qs),
        "reward_study": study,
        "seconds": time.perf_counter() - t_passage,
    })
    return record


def _best_of_n(pol, pool: list[tuple[int, TrialOutcome, Scores | None, float]], per_edit_s: float):
    """Selection over the pool of (index, trial, probe scores, seconds) exactly as the
    wake cycle selects: (choice, the chosen trial's probe scores or None, seconds by
    step, tokens generated + trained)."""
    choice = selections.get(pol.selection)([o.as_trial(k) for k, o, _, _ in pool], pol.min_gain, pol.edit_margin)
    chosen = {k: p for k, _, p, _ in pool}.get(choice.idx) if choice.idx is not None else None
    n_edits = sum(1 for _, o, _, _ in pool if o.candidate.policy not in (PASSAGE, self_edits.AUGMENTED))
    seconds = {"generate": per_edit_s * n_edits,
               "train": sum(o.result.seconds for _, o, _, _ in pool if o.result),
               "score": sum(secs - o.result.seconds for _, o, _, secs in pool if o.result)}
    tokens = sum((0 if o.candidate.policy == self_edits.AUGMENTED else o.candidate.n_tokens)
                 + (o.result.tokens if o.result else 0) for _, o, _, _ in pool)
    return choice, chosen, seconds, tokens

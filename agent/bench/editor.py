"""Benchmark ``editor``: ReST-EM on the self-edit writer, SEAL's protocol, on passages
that are never evaluated.

A round (Singh et al.'s ReST-EM, as SEAL runs it):

1. for each training passage, the current editor writes one self-edit per entry of
   ``names`` (sampled); each gets one trial LoRA from the base model on passage +
   self-edit, and so does the passage alone; every trial is graded closed book on
   *all* the passage's questions (training passages are never evaluated, so all their
   questions may serve as reward);
2. E-step: a self-edit becomes a training pair when its closed-book accuracy beats the
   passage-only trial's (strictly: at least one more question right; SEAL kept the
   best even when it did not beat the baseline, and its gain came from a 7B model);
   at most ``editor.per_passage`` pairs per passage, best first;
3. M-step: SFT of a fresh LoRA from the base model on the pairs of every round so far
   (``agent.editor.sft``: trl's SFTTrainer, loss on the self-edit only). With fewer
   than ``editor.min_pairs`` pairs the round keeps the previous editor.

Training passages come from the *tune* split minus any title the caller evaluates, so
an editor is never trained on an evaluated passage. Every trial is recorded with its
per-question grades, so ``selection_study`` can replay selection rules on the round-1
data (the tuning evidence for the wake cycle's selection defaults).

The result is a directory: ``editor.json`` (config, versions, rounds, per-passage
trials) and ``round-<r>.safetensors`` (the editor after round r). A round is the unit
of ``resume``: finished rounds are read back, not re-run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from adapters import lora
from adapters.names import EDITOR, KNOWLEDGE, TRIAL
from adapters.registry import AdapterRegistry
from policies import reward as rewards
from policies import selection as selections
from policies.questions import split_roles
from policies.reward import Scores
from store import Store

from ..config import Config
from ..datasets import data_id
from ..editor import sft, sft_examples
from ..events import log_lines
from ..learner import Learner
from ..runtime import Runtime
from ..trial import PASSAGE, Candidate, rewards_of, try_candidate
from .common import draw, load_squad, versions

RESULT = "editor.json"
GENERATING = ("implications", "rewrite", "self_qa", "qa_chat")


def weights_file(out_dir: Path, r: int) -> Path:
    return Path(out_dir) / f"round-{r}.safetensors"


def _graded(s: Scores) -> dict:
    return {"correct": [int(c) for c in s.correct], "f1s": list(s.f1s), "logprobs": list(s.logprobs),
            "answers": list(s.answers)}


def _scores(g: dict) -> Scores:
    """Scores of the questions with the given per-question grades."""
    n = len(g["correct"])
    return Scores(accuracy=sum(g["correct"]) / max(n, 1), f1=sum(g["f1s"]) / max(n, 1),
                  logprob=sum(g["logprobs"]) / max(n, 1), n=n, correct=tuple(bool(c) for c in g["correct"]),
                  f1s=tuple(g["f1s"]), logprobs=tuple(g["logprobs"]))


def _subset(g: dict, keep: list[int]) -> Scores:
    return _scores({k: [g[k][i] for i in keep] for k in ("correct", "f1s", "logprobs")})


def _passage_round(learner: Learner, d: dict, names: list[str], writer: str | None, seed: int,
                   passage_trial: dict | None, say: Callable[[str], None]) -> dict:
    """One training passage of a round: baseline, passage-only (unless given), one
    trial per sampled self-edit, all graded on all the passage's questions."""
    title, text = d["title"], d["context"]
    passage = {"title": title, "text": text}
    qs = [{"question": q["question"], "answer": q["answer"]} for q in d["questions"]]
    t0 = time.perf_counter()
    if passage_trial is None:
        baseline = learner.score(KNOWLEDGE, title, qs)
        o = try_candidate(learner, passage, Candidate(PASSAGE), seed, qs, baseline)
        passage_trial = {"baseline": _graded(baseline),
                         "passage": {**_graded(o.scores), "tokens": o.result.tokens, "seconds": o.result.seconds}}
    baseline = _scores(passage_trial["baseline"])
    edits = learner.sample_self_edits(passage, names, seed=seed + 1, writer=writer)
    cands = []
    for k, (name, edit, n_tok) in enumerate(edits):
        say(f"{title}: trial {k + 1}/{len(edits)} ({name})")
        o = try_candidate(learner, passage, Candidate(name, edit, n_tok), seed + 2 + k, qs, baseline,
                          beside_passage=True)
        row = {"policy": name, "text": edit, "gen_tokens": n_tok}
        if o.result is None:  # the same as passage-only: its grades
            row.update(passage_trial["passage"], same_as_passage=True, tokens=0, seconds=0.0)
        elif not o.ok:
            row.update(nan=True, tokens=o.result.tokens, seconds=o.result.seconds)
        else:
            row.update(_graded(o.scores), tokens=o.result.tokens, seconds=o.result.seconds)
        cands.append(row)
    return {"title": title, "n_questions": len(qs), **passage_trial, "candidates": cands,
            "seconds": time.perf_counter() - t0}


def pairs_of(rec: dict, per_passage: int) -> list[int]:
    """E-step: indices of the candidates that beat passage-only on accuracy, best first."""
    p = sum(rec["passage"]["correct"])
    better = [(sum(c["correct"]), sum(c["logprobs"]), k) for k, c in enumerate(rec["candidates"])
              if not c.get("nan") and not c.get("same_as_passage") and sum(c["correct"]) > p]
    return [k for *_, k in sorted(better, reverse=True)[:per_passage]]


def train_editors(
    runtime: Runtime,
    cfg: Config,
    *,
    data_path: Path,
    passages: int,
    seed: int,
    rounds: int,
    out_dir: Path,
    names: tuple[str, ...] | None = None,
    exclude_titles: set[str] = frozenset(),
    say: Callable[[str], None] = lambda _m: None,
    on_passage: Callable[[int, int], None] = lambda _i, _n: None,
) -> dict:
    """Run ``rounds`` ReST-EM rounds; writes and returns the result (see the module
    docstring). Finished rounds found in ``out_dir`` are reused (resume)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pol, ecfg = cfg.policies, cfg.editor
    names = list(names or pol.sampled(cfg.wake.candidates))
    pool = [d for d in load_squad(data_path) if d["title"] not in exclude_titles]
    data = draw(pool, passages, seed, "tune")
    setup = {"data": data_id(data_path), "seed": seed, "passages": [d["title"] for d in data], "names": names,
             "lora": dataclasses.asdict(cfg.lora), "editor": dataclasses.asdict(ecfg),
             "policies": dataclasses.asdict(pol), "wake": dataclasses.asdict(cfg.wake), "model": runtime.name}
    result = {"benchmark": "editor", **setup, "versions": versions(), "rounds": []}
    previous = out_dir / RESULT
    if previous.is_file():
        old = json.loads(previous.read_text(encoding="utf-8"))
        if _what_trains(old) != _what_trains(json.loads(json.dumps(setup))):
            raise ValueError(f"{out_dir} holds editors trained with other settings; use another directory")
        kept = [r for r in old["rounds"] if weights_file(out_dir, r["round"]).is_file()]
        result = {**old, "rounds": kept[: next((i for i, r in enumerate(kept) if r["round"] != i + 1), len(kept))]}
        if len(result["rounds"]) >= rounds:
            return result  # nothing to run: read back as recorded

    tmp = Path(tempfile.mkdtemp(prefix="seal-bench-editor-"))
    store = Store(tmp / "store.db")
    learner = Learner(runtime, store, AdapterRegistry(tmp / "adapters", store), cfg.lora, pol, cfg.wake, distill=cfg.distill)
    passage_trials: dict[str, dict] = {}
    for done in result["rounds"]:
        for rec in done["per_passage"]:
            passage_trials.setdefault(rec["title"], {"baseline": rec["baseline"], "passage": rec["passage"]})
    all_pairs: list[dict] = [p for r in result["rounds"] for p in r["pairs"]]
    try:
        for r in range(len(result["rounds"]) + 1, rounds + 1):
            t_round = time.perf_counter()
            writer = None
            if r > 1:
                lora.restore(learner.model, EDITOR, _load(weights_file(out_dir, r - 1)))
                writer = EDITOR
            per_passage, new_pairs = [], []
            for i, d in enumerate(data):
                say(f"round {r}: {d['title']}")
                rec = _passage_round(learner, d, names, writer, seed * 1000 + 100 * r + 10 * i,
                                     passage_trials.get(d["title"]), say)
                passage_trials.setdefault(d["title"], {"baseline": rec["baseline"], "passage": rec["passage"]})
                rec["pairs"] = pairs_of(rec, ecfg.per_passage)
                for k in rec["pairs"]:
                    c = rec["candidates"][k]
                    new_pairs.append({"candidate_id": f"r{r}:{i}:{k}", "policy": c["policy"], "title": d["title"],
                                      "passage_text": d["context"], "text": c["text"]})
                per_passage.append(rec)
                on_passage(i + 1, len(data))
            all_pairs += new_pairs
            rows = [row for _, row in sft_examples(learner, all_pairs[: ecfg.max_pairs], ecfg.max_length)]
            lora.restore(learner.model, TRIAL, learner.zero)  # ReST-EM: each round's editor starts from the base
            if len(rows) >= ecfg.min_pairs:
                say(f"round {r}: SFT of the editor on {len(rows)} pairs")
                fit = sft(learner, rows, dataclasses.replace(ecfg, seed=ecfg.seed + r), adapter=TRIAL,
                          on_event=log_lines(say))
                state, outcome, loss, sft_s = lora.snapshot(learner.model, TRIAL), "trained", fit.train_loss, fit.seconds
            else:
                state = _load(weights_file(out_dir, r - 1)) if r > 1 else lora.snapshot(learner.model, TRIAL)
                outcome, loss, sft_s = f"kept the previous editor: {len(rows)} pairs < min_pairs {ecfg.min_pairs}", None, 0.0
            _save(state, weights_file(out_dir, r))
            result["rounds"].append({"round": r, "outcome": outcome, "n_pairs": len(rows), "new_pairs": len(new_pairs),
                                     "pairs": new_pairs, "sft_loss": loss, "sft_seconds": sft_s,
                                     "seconds": time.perf_counter() - t_round, "per_passage": per_passage})
            _write(out_dir / RESULT, result)
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)  # the scratch home is the run's own
    _write(out_dir / RESULT, result)
    return result


def _what_trains(setup: dict) -> dict:
    """The settings an editor depends on (not, e.g., the wake cycle's selection rule)."""
    pol = setup.get("policies") or {}
    wake = setup.get("wake") or {}
    return {**{k: setup.get(k) for k in ("data", "seed", "passages", "names", "lora", "editor", "model")},
            "policies": {k: pol.get(k) for k in ("self_edit", "temperature", "top_p")},
            "wake": {k: wake.get(k) for k in ("self_edit_tokens", "answer_tokens")}}


def load_editors(out_dir: Path, rounds: int) -> dict[str, dict]:
    """``restem-<r>`` -> the editor's weights after round r, for r = 1..rounds."""
    missing = [r for r in range(1, rounds + 1) if not weights_file(out_dir, r).is_file()]
    if missing:
        raise ValueError(f"{out_dir}: no editor of round {missing[0]} (run `seal bench editor` first)")
    return {f"restem-{r}": _load(weights_file(out_dir, r)) for r in range(1, rounds + 1)}


def _save(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(path)


# ------------------------------------------------------------- selection study
def selection_study(result: dict, fraction: float, rules: dict[str, tuple[str, str, float, float]],
                    seed: int = 0, splits: int = 1) -> list[dict]:
    """Replay selection rules on round 1's trials: each passage's questions are split
    into reward and probe questions as the wake cycle splits them; a rule picks among
    passage-only and the self-edits on the reward questions; its row is the probe
    accuracy of what it picked (the base model's when it commits nothing). Rows also
    give passage-only, each policy's single sample, and the oracle (best on probes).
    With ``splits`` > 1 the replay is repeated over that many random splits and
    averaged (the trials are the same; only which questions select changes)."""
    rec_list = result["rounds"][0]["per_passage"] if result.get("rounds") else []
    tallies: dict[str, list[float]] = {}

    def add(name: str, correct: list[float]) -> None:
        tallies.setdefault(name, []).extend(correct)

    for split in range(splits):
        for i, rec in enumerate(rec_list):
            n = rec["n_questions"]
            roles = split_roles(list(range(n)), fraction, seed=(seed + split) * 100003 + i)
            rq = [q for q in range(n) if roles[q] == "reward"]
            pq = [q for q in range(n) if roles[q] == "probe"]
            cands = [c for c in rec["candidates"] if not c.get("nan")]
            probe = {"base": [rec["baseline"]["correct"][q] for q in pq],
                     "passage": [rec["passage"]["correct"][q] for q in pq]}
            add("base", probe["base"])
            add("passage", probe["passage"])
            seen: set[str] = set()
            for c in cands:
                if c["policy"] not in seen:
                    seen.add(c["policy"])
                    add(f"{c['policy']} (one sample)", [c["correct"][q] for q in pq])
            if cands:
                add("oracle (best on probes)", max(([c["correct"][q] for q in pq] for c in [rec["passage"], *cands]), key=sum))
            base_r = _subset(rec["baseline"], rq)
            for rule, (selection, reward, min_gain, margin) in rules.items():
                trials, probes = [], {}
                for idx, (name, c) in enumerate([("passage", rec["passage"])] + [(c["policy"], c) for c in cands]):
                    s = _subset(c, rq)
                    trials.append(selections.Trial(idx, name, *rewards_of(s, base_r, reward)))
                    probes[idx] = [c["correct"][q] for q in pq]
                choice = selections.get(selection)(trials, min_gain, margin)
                add(rule, probes[choice.idx] if choice.idx is not None else probe["base"])
    return [{"rule": k, "accuracy": sum(v) / len(v) if v else math.nan, "questions": len(v) // splits}
            for k, v in tallies.items()]


def study_rules(pol) -> dict[str, tuple[str, str, float, float]]:
    """The rules ``selection_study`` compares: the configured one, and each selection
    policy under each reward at two margins."""
    rules = {f"configured ({pol.selection}, {pol.reward}, margin {pol.edit_margin:g})":
             (pol.selection, pol.reward, pol.min_gain, pol.edit_margin)}
    for reward in (r for r in rewards.REWARDS if rewards.relative_to(r) == "baseline"):  # the study has no teacher scores
        for selection in selections.SELECTIONS:
            for margin in (0.0, 0.05):
                rules[f"{selection}, {reward}, margin {margin:g}"] = (selection, reward, pol.min_gain, margin)
    return rules

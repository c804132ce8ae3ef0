"""Benchmark ``continual``: learn passages one after another and measure forgetting.

SEAL's continual-learning experiment, run through seal's own machinery (a store, the
adapter registry, ``wake_cycle`` for each passage and ``sleep_phase`` between them):

1. draw ``passages`` passages (eval split by default) with a seed and ingest them, with
   their questions, into a fresh temporary home;
2. learn them in order, one wake cycle each; after every update, measure closed-book
   accuracy on the probe questions of *every passage seen so far*: one row of the
   forgetting matrix (rows: after each update; columns: passages);
3. do this under several conditions that share everything but the sleep: ``no-sleep``;
   ``sleep`` (replay every ``sleep_every`` updates); ``sleep+dreams`` (replay with free
   generations of the base model mixed in). The conditions are identical up to the
   first sleep, so that prefix is run once and the home is copied at the branch point.

Reported per condition: mean accuracy over seen passages after each step, the mean
at-learning accuracy (each passage measured right after its own update), the final mean
after the last step (and its sleep), retention = final / at-learning, the same for the
answer log-likelihood gain over the base model (a denser signal than accuracy on a few
probe questions), and verbatim memorisation of the learned passages at the end.
Selection uses reward questions only; probe questions are never seen by any update.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from adapters.names import KNOWLEDGE
from adapters.registry import AdapterRegistry
from store import NewDocument, NewPassage, NewQuestion, Store

from ..config import Config
from ..datasets import data_id
from ..learner import Learner
from ..runtime import Runtime
from ..wake import wake_cycle
from .common import draw, load_squad

CONDITIONS = {
    "no-sleep": None,  # condition -> consolidation policy of its sleeps
    "sleep": "replay",
    "sleep+dreams": "dream",
}


def _ingest(store: Store, data: list[dict]) -> list[int]:
    """One document per passage, in order; returns the passage ids."""
    docs = []
    for d in data:
        text = d["context"]
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        qs = tuple(NewQuestion(q["question"], q["answer"]) for q in d["questions"])
        passage = NewPassage(d["title"], text, sha, n_tokens=len(text.split()), questions=qs)
        docs.append(NewDocument(f"bench:{d['title']}:{sha[:8]}", d["title"], "json", sha, len(text.encode()), (passage,)))
    store.ingest(docs)
    return [p["id"] for p in store.passages()]


def _open(learner: Learner, home: Path) -> None:
    """Point the resident learner at another home (store + adapters) and load its
    active adapter: conditions share one base model in memory."""
    if getattr(learner, "store", None) is not None:
        learner.store.close()
    learner.store = Store(home / "store.db")
    learner.registry = AdapterRegistry(home / "adapters", learner.store)
    learner.reload_active()


def _branch(learner: Learner, src: Path, dst: Path) -> None:
    """Copy a home at the branch point (store closed first, so the copy is consistent)."""
    learner.store.close()
    learner.store = None
    shutil.copytree(src, dst)
    _open(learner, src)


def _measure(learner: Learner, seen: list[int]) -> dict[str, dict]:
    """Probe scores of each seen passage, keyed by str(passage id) (as in the JSON)."""
    out = {}
    for pid in seen:
        p = learner.store.passage(pid)
        s = learner.score(KNOWLEDGE, p["title"], learner.store.questions(pid, role="probe"))
        out[str(pid)] = {"accuracy": s.accuracy, "logprob": s.logprob, "n": s.n}
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run_continual(
    runtime: Runtime,
    cfg: Config,
    *,
    data_path: Path,
    passages: int = 8,
    sleep_every: int = 4,
    seed: int = 0,
    sequences: int = 1,
    split: str = "eval",
    conditions: tuple[str, ...] = tuple(CONDITIONS),
    say: Callable[[str], None] = lambda _m: None,
    on_step: Callable[[], None] = lambda: None,
    on_result: Callable[[dict], None] | None = None,
    previous: dict | None = None,
) -> dict:
    """Run every condition on ``sequences`` sequences of passages; returns the JSON-able
    result. ``previous``: a saved result of the same settings (an interrupted run): its
    sequences that have every condition are kept, not run again (each sequence has its
    own seed, so the rest are what they would have been)."""
    import peft
    import torch
    import transformers

    from ..sleep import sleep_phase
    from ..tracking import memorisation

    wake_cfg = dataclasses.replace(cfg.wake, forgetting_sample=0, seed=seed)
    if any(f.name == "track" for f in dataclasses.fields(wake_cfg)):
        wake_cfg = dataclasses.replace(wake_cfg, track=False)  # the benchmark measures everything itself
    runs: list[dict] = _resumable(previous, data_id(data_path), passages, sleep_every, seed, split, conditions)
    finished = finished_sequences(runs, conditions)
    runs = [r for r in runs if r["sequence"] in finished]
    root = Path(tempfile.mkdtemp(prefix="seal-continual-"))
    learner: Learner | None = None
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads()}

    def result() -> dict:
        return {
            "benchmark": "continual", "data": data_id(data_path), "split": split, "seed": seed,
            "passages": passages, "sleep_every": sleep_every, "sequences": sequences,
            "conditions": list(conditions), "runs": runs, "summary": summarise(runs, conditions),
            "config": {"lora": dataclasses.asdict(cfg.lora), "policies": dataclasses.asdict(cfg.policies),
                       "wake": dataclasses.asdict(wake_cfg), "sleep": dataclasses.asdict(cfg.sleep),
                       "model": runtime.name},
            "versions": versions,
        }

    for k in range(sequences):
        if k in finished:
            say(f"seq {k + 1}: kept from the previous run")
            continue
        data = draw(load_squad(data_path), passages, seed + k, split, min_questions=4)
        base_home = root / f"seq{k}-base"
        (base_home / "adapters").mkdir(parents=True)
        store = Store(base_home / "store.db")
        ids = _ingest(store, data)
        if learner is None:
            learner = Learner(runtime, store, AdapterRegistry(base_home / "adapters", store),
                              cfg.lora, cfg.policies, wake_cfg, distill=cfg.distill)
        else:
            store.close()
            _open(learner, base_home)
        for pid in ids:  # split reward/probe roles now (as each wake cycle would), so the base is measured
            learner.question_set(learner.store.passage(pid))
        base = _measure(learner, ids)  # the no-update reference of every passage
        # conditions are identical until the first sleep: run that prefix once
        shared_steps = min(sleep_every, passages) if any(CONDITIONS[c] for c in conditions) else passages
        prefix = [_step(learner, ids, i, say, f"seq {k + 1}: ") for i in range(shared_steps)]
        for _ in prefix:
            on_step()
        for cond in conditions:
            home = root / f"seq{k}-{cond}"
            _branch(learner, base_home, home)
            _open(learner, home)
            policy = CONDITIONS[cond]
            rows = list(prefix)
            t0 = time.perf_counter()
            for i in range(len(rows), passages + 1):
                if policy and i % sleep_every == 0 and i > 0:
                    say(f"seq {k + 1} {cond}: sleep ({policy}) after update {i}")
                    report = sleep_phase(learner, dataclasses.replace(cfg.sleep, policy=policy, restem=False),
                                         None, trigger="bench")
                    rows.append({"kind": "sleep", "step": i, "title": f"sleep ({policy}): {report.outcome}",
                                 "outcome": report.outcome, "reason": report.reason,
                                 "scores": _measure(learner, ids[:i]), "seconds": sum(report.timings.values())})
                if i == passages:
                    break
                rows.append(_step(learner, ids, i, say, f"seq {k + 1} {cond}: "))
                on_step()
            learned = learner.store.learned_passages()
            mem = memorisation(learner, KNOWLEDGE, learned) if learned else []
            runs.append({
                "sequence": k, "condition": cond, "passages": [{"id": pid, "title": d["title"]} for pid, d in zip(ids, data, strict=True)],
                "base": base, "rows": rows,
                "memorisation": {"exact": _mean([m["exact"] for m in mem]), "token_match": _mean([m["token_match"] for m in mem]),
                                 "n": len(mem)},
                "seconds": time.perf_counter() - t0,
            })
            if on_result:
                on_result(result())
        learner.store.close()
        learner.store = None
    shutil.rmtree(root, ignore_errors=True)
    return result()


def finished_sequences(runs: list[dict], conditions) -> set[int]:
    """The sequences of ``runs`` that have every one of ``conditions``."""
    return {k for k in {r["sequence"] for r in runs}
            if {r["condition"] for r in runs if r["sequence"] == k} >= set(conditions)}


def _resumable(previous: dict | None, data: str, passages: int, sleep_every: int, seed: int, split: str,
               conditions: tuple[str, ...]) -> list[dict]:
    """The runs of ``previous`` when it was made with the same settings (else a
    ValueError that says which differs)."""
    if not previous:
        return []
    want = {"data": data, "passages": passages, "sleep_every": sleep_every, "seed": seed, "split": split}
    for key, value in want.items():
        if previous.get(key) != value:
            raise ValueError(f"cannot resume: the saved result has {key} {previous.get(key)!r}, not {value!r}")
    return [r for r in previous.get("runs", []) if r["condition"] in conditions]


def _step(learner: Learner, ids: list[int], i: int, say: Callable[[str], None], where: str) -> dict:
    """Learn passage ``i`` (the next job in the queue) and measure every seen passage."""
    job = learner.store.claim_next(learner.worker)
    assert job is not None and job.passage_id == ids[i], "the queue holds the passages in order"
    title = learner.store.passage(job.passage_id)["title"]
    say(f"{where}update {i + 1}: {title}")
    t0 = time.perf_counter()
    report = wake_cycle(learner, job)
    return {"kind": "wake", "step": i + 1, "title": title, "outcome": report.outcome,
            "policy": (report.candidates[report.chosen]["policy"] if report.chosen is not None else None),
            "scores": _measure(learner, ids[: i + 1]), "seconds": time.perf_counter() - t0}


def summarise(runs: list[dict], conditions: tuple[str, ...]) -> list[dict]:
    """Per condition (averaged over sequences): at-learning and final mean accuracy over
    the seen passages, retention, log-likelihood-gain retention, memorisation; each
    with its range (``_spread``) and standard deviation (``_sd``) over sequences."""
    out = []
    for cond in conditions:
        rs = [r for r in runs if r["condition"] == cond]
        if not rs:
            continue
        per = []
        for r in rs:
            ids = [p["id"] for p in r["passages"]]
            at_learning = {}
            for row in r["rows"]:
                if row["kind"] == "wake":
                    pid = ids[row["step"] - 1]
                    at_learning[str(pid)] = row["scores"][str(pid)]
            final, base = r["rows"][-1]["scores"], r["base"]
            acc_learn = _mean([v["accuracy"] for v in at_learning.values()])
            acc_final = _mean([final[p]["accuracy"] for p in at_learning])
            gain_learn = _mean([at_learning[p]["logprob"] - base[p]["logprob"] for p in at_learning])
            gain_final = _mean([final[p]["logprob"] - base[p]["logprob"] for p in at_learning])
            per.append({
                "at_learning": acc_learn, "final": acc_final,
                "retention": acc_final / acc_learn if acc_learn > 0 else float("nan"),
                "logprob_gain_at_learning": gain_learn, "logprob_gain_final": gain_final,
                "logprob_retention": gain_final / gain_learn if gain_learn > 0 else float("nan"),
                "memorisation_exact": r["memorisation"]["exact"], "memorisation_token_match": r["memorisation"]["token_match"],
                "mean_curve": [_mean([v["accuracy"] for v in row["scores"].values()]) for row in r["rows"]],
            })
        agg = {"condition": cond, "sequences": len(per)}
        for key in ("at_learning", "final", "retention", "logprob_gain_at_learning", "logprob_gain_final",
                    "logprob_retention", "memorisation_exact", "memorisation_token_match"):
            vals = [p[key] for p in per]
            agg[key] = _mean(vals)
            agg[key + "_spread"] = (max(vals) - min(vals)) if len(vals) > 1 else 0.0
            finite = [v for v in vals if v == v]
            agg[key + "_sd"] = statistics.stdev(finite) if len(finite) > 1 else 0.0  # over sequences
        agg["per_sequence"] = per
        out.append(agg)
    return out


def dumps(result: dict) -> str:
    return json.dumps(result, indent=1, default=float)


def plot(result: dict, path: Path) -> Path | None:
    """A PNG beside the JSON: mean accuracy over seen passages after each step, per
    condition, and the forgetting matrix of each condition (first sequence). None when
    matplotlib (the `plot` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in result["runs"] if r["sequence"] == 0]
    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(4.2 * (1 + len(runs)), 3.8))
    ax = axes[0]
    for r in runs:
        curve = [_mean([v["accuracy"] for v in row["scores"].values()]) for row in r["rows"]]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=r["condition"])
    ax.set_xlabel("row (update or sleep)")
    ax.set_ylabel("mean probe accuracy, seen passages")
    ax.legend(fontsize=8)
    n = result["passages"]
    for ax, r in zip(axes[1:], runs, strict=True):
        ids = [str(p["id"]) for p in r["passages"]]
        grid = [[row["scores"][p]["accuracy"] if p in row["scores"] else float("nan") for p in ids] for row in r["rows"]]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(r["condition"], fontsize=9)
        ax.set_xticks(range(n), [f"p{i + 1}" for i in range(n)], fontsize=7)
        ax.set_yticks(range(len(r["rows"])), [("S" if row["kind"] == "sleep" else str(row["step"])) for row in r["rows"]], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""`seal bench views`: how long the dashboard takes to read and draw a long history.

A synthetic store is built with the Store's own methods (no model): wake cycles with
candidates and evaluations, sleeps every few commits, an occasional rollback, drift
and memorisation rows, and a daemon log. The numbers in it are made up (seeded) and
only stand for the *size* of a long-running home; the benchmark times reading a
snapshot and rendering every panel and static view at 80x24 and 160x48.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from adapters.names import KNOWLEDGE
from policies.consolidation import measured_sample
from store import NewDocument, NewPassage, NewQuestion, Store

from ..home import Home
from ..sleep import SleepConfig

log = logging.getLogger(__name__)

POLICIES = ("implications", "rewrite", "self_qa", "qa_chat")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sample_store(store: Store, versions: int | None, passages: int | None = None, *, learned: int | None = None,
                 sleep_every: int = 8, rollback_every: int = 0, candidates: int = 4, forgetting_sample: int = 4,
                 measure_budget: int = 32, sha256: str | None = None, seed: int = 0, start: float = 1.7e9) -> dict:
    """Fill an empty store with ``versions`` knowledge versions, or as many as it takes
    to learn ``learned`` passages (wake commits, a sleep every ``sleep_every`` commits
    that measures ``measure_budget`` learned passages as a real sleep does, a rollback
    every ``rollback_every`` versions that leaves a rolled-back branch) from
    ``passages`` passages (default: enough, plus 5 left queued). Every version gets
    the checksum ``sha256`` (default: one of its id). Returns counts. Numbers are
    seeded, not measured."""
    rng = random.Random(seed)
    if (versions is None) == (learned is None):
        raise ValueError("give versions or learned, not both")
    n_pass = passages if passages is not None else (versions if learned is None else learned * 5 // 4) + 5
    sha = (lambda _aid: sha256) if sha256 else _sha
    docs = []
    for i in range(1, n_pass + 1):
        text = f"Passage {i} of the sample says that the value of item {i} is {i * 7} and its colour is hue {i % 11}."
        qs = tuple(NewQuestion(f"What is the value of item {i}?" if k == 0 else f"What colour is item {i}?",
                               str(i * 7) if k == 0 else f"hue {i % 11}") for k in range(4))
        docs.append(NewDocument(f"sample-{i}.json", f"Sample {i}", "json", _sha(f"doc{i}"), len(text),
                                (NewPassage(f"Sample topic {i}", text, _sha(text), len(text.split()), qs),)))
    store.ingest(docs, now=start)
    jobs = {j["passage_id"]: j["id"] for j in store.jobs(("pending",), limit=-1)}
    t = start
    learned_ids: list[int] = []
    next_pid = 1
    parent: str | None = None
    version = 0
    commits = 0
    while (version < versions if learned is None else len(learned_ids) < learned) and next_pid <= n_pass:
        t += 60.0
        pid = next_pid
        next_pid += 1
        base = -2.0 + rng.random()
        rows = []
        for idx in range(candidates):
            r = rng.gauss(0.15, 0.2)
            rows.append({"policy": "passage" if idx == 0 else POLICIES[idx % len(POLICIES)], "idx": idx,
                         "text": "" if idx == 0 else f"Self-edit {idx} for passage {pid}: item {pid} is {pid * 7}.",
                         "prompt": "", "n_tokens": 0 if idx == 0 else 40 + idx, "n_examples": 2,
                         "reward_logprob": r, "reward_acc": round(r * 2, 2), "reward_f1": r, "train_loss": 0.5,
                         "gen_seconds": 1.0, "train_seconds": 2.0, "score_seconds": 0.5, "chosen": 0, "note": None})
        best = max(range(candidates), key=lambda k: rows[k]["reward_logprob"])
        cycle = {"passage_id": pid, "job_id": jobs.get(pid), "started_at": t - 50, "parent_adapter": parent,
                 "baseline_logprob": base, "baseline_acc": 0.0, "n_reward": 2, "n_probe": 2,
                 "timings": '{"train": 8.0}', "tokens": '{"train": 4000}'}
        if rows[best]["reward_logprob"] < 0.02:  # rejected: nothing clears the margin
            store.record_cycle({**cycle, "outcome": "rejected", "reason": "no candidate clears the margin"}, rows, [],
                               job_id=jobs.get(pid), now=t)
            continue
        rows[best]["chosen"] = 1
        version += 1
        commits += 1
        aid = f"{KNOWLEDGE}-{version:04d}"
        at_learning = rng.choice((0.5, 1.0, 1.0, 0.5, 0.0))
        evals = [{"adapter_id": parent, "passage_id": pid, "kind": "probe", "accuracy": 0.0, "f1": 0.0,
                  "logprob": base, "n": 2},
                 {"adapter_id": aid, "passage_id": pid, "kind": "probe", "accuracy": at_learning,
                  "f1": at_learning, "logprob": base + 1, "n": 2}]
        for k in range(min(forgetting_sample, len(learned_ids))):
            old = learned_ids[(commits * forgetting_sample + k) % len(learned_ids)]
            acc = rng.choice((0.0, 0.5, 0.5, 1.0))
            evals.append({"adapter_id": aid, "passage_id": old, "kind": "probe", "accuracy": acc, "f1": acc,
                          "logprob": -1.5 + acc, "n": 2})

        def record(cy=cycle, rs=rows, ev=evals, p=pid, a=aid, when=t):
            store.record_cycle({**cy, "outcome": "committed", "adapter_id": a, "reason": "best clears the margin"},
                               rs, ev, job_id=jobs.get(p), now=when)

        store.add_adapter({"id": aid, "name": KNOWLEDGE, "version": version, "parent_id": parent, "kind": "wake",
                           "passage_id": pid, "path": aid, "sha256": sha(aid), "policy": rows[best]["policy"],
                           "reward": rows[best]["reward_logprob"], "metrics": {"probe_acc": at_learning}},
                          activate=True, also=record, now=t)
        store.add_drift({"adapter_id": aid, "kl": 0.002 * version ** 0.5, "reading_acc": 0.6, "n_prompts": 16,
                         "n_reading": 18}, now=t)
        store.add_memorisation([{"adapter_id": aid, "passage_id": p, "exact": int(rng.random() < 0.1),
                                 "token_match": rng.random() * 0.4, "prefix_tokens": 32, "n_tokens": 32}
                                for p in [pid, *learned_ids[-3:]]], now=t)
        learned_ids.append(pid)
        parent = aid
        if rollback_every and version % rollback_every == 0 and version >= 2:
            # a bad version, rolled back: the branch stays, marked
            back = f"{KNOWLEDGE}-{version - 1:04d}"
            store.rollback(KNOWLEDGE, back, now=t + 1)
            parent = back
        if sleep_every and commits % sleep_every == 0 and (learned is not None or version < versions):
            t += 120.0
            version += 1
            parent = _sample_sleep(store, rng, learned_ids, parent, version, t, commits // sleep_every - 1,
                                   measure_budget, sha)
    roles = {}  # as a wake cycle splits them: half reward, half probe (what sleeps and tracking measure)
    for pid in learned_ids:
        qs = store.questions(pid)
        roles |= {q["id"]: "reward" if k < len(qs) // 2 else "probe" for k, q in enumerate(qs)}
    store.set_question_roles(roles)
    return {"versions": version, "passages": n_pass, "learned": len(learned_ids)}


def _sample_sleep(store: Store, rng: random.Random, learned: list[int], parent: str | None, version: int,
                  t: float, round_: int, budget: int, sha) -> str:
    """A kept sleep of the sample store: its version, report and the evaluations of
    the passages a real sleep would measure (``measured_sample``)."""
    sid = f"{KNOWLEDGE}-{version:04d}"
    cfg = SleepConfig()
    scores = {p: rng.choice((0.5, 1.0, 1.0)) for p in measured_sample(learned, budget, cfg.recent, round_, cfg.seed)}
    before = {"retention": 0.6, "logprob": -1.2, "drift_kl": 0.01, "reading_acc": 0.6, "memorisation": 0.05,
              "n_passages": len(learned)}
    after = {**before, "retention": sum(scores.values()) / len(scores), "logprob": -1.0}
    sleep_row = {"started_at": t - 100, "trigger": "commits", "policy": "replay", "outcome": "kept",
                 "reason": "no worse", "parent_adapter": parent, "before": before, "after": after,
                 "n_examples": 16, "n_dreams": 0, "train_loss": 0.4, "timings": {"consolidate": 60.0}}

    def record_sleep() -> None:
        store.record_sleep({**sleep_row, "adapter_id": sid}, now=t)
        store.add_evaluations([{"adapter_id": sid, "passage_id": p, "kind": "probe", "accuracy": acc,
                                "f1": acc, "logprob": -1.0, "n": 2} for p, acc in scores.items()], now=t)

    store.add_adapter({"id": sid, "name": KNOWLEDGE, "version": version, "parent_id": parent,
                       "kind": "sleep", "passage_id": None, "path": sid, "sha256": sha(sid),
                       "policy": "replay", "reward": None,
                       "metrics": {"sleep": True, "retention_before": 0.6, "retention_after": after["retention"]}},
                      activate=True, also=record_sleep, now=t)
    return sid


def sample_log(path: Path, lines: int, start: float = 1.7e9) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start + i))
            level = "WARNING" if i % 97 == 0 else "INFO"
            f.write(f"{stamp},000 {level} agent.wake [model] trial {i % 5 + 1}/5: implications, passage {i // 5}\n")


def _time(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times)


def _render_row(view: str, width: int, height: int, build, repeat: int) -> dict:
    """Time building and drawing a renderable into a ``width`` x ``height`` region."""
    console = Console(width=width, height=height, file=io.StringIO(), color_system="truecolor", force_terminal=True)
    opts = console.options.update_dimensions(width, height)
    med, mx = _time(lambda: console.render_lines(build(), opts), repeat)
    return {"view": view, "size": f"{width}x{height}", "median_ms": 1e3 * med, "max_ms": 1e3 * mx}


def run_views_bench(versions: int = 300, passages: int | None = None, repeat: int = 5,
                    sizes: tuple[tuple[int, int], ...] = ((80, 24), (160, 48)),
                    say=lambda _msg: None) -> dict:
    """Build a synthetic home and time: building it, one snapshot, and rendering each
    panel (at each size), the dashboard, and the static views (unbounded height)."""
    from ..ui.dashboard import Dashboard
    from ..ui.panels import PANELS, panel
    from ..ui.snapshot import take_snapshot
    from ..ui.views import (
        adapter_details,
        adapter_view,
        candidates_view,
        forgetting_view,
        history_table,
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="seal-bench-views-") as tmp:
        home = Home(Path(tmp) / "home").ensure()
        say(f"building a store with {versions} versions")
        t0 = time.perf_counter()
        with Store(home.store_file) as store:
            counts = sample_store(store, versions, passages, rollback_every=50)
            sample_log(home.logs / "daemon.log", 20000)
            build_s = time.perf_counter() - t0
            snap_med, snap_max = _time(lambda: take_snapshot(home, store), repeat)
            rows.append({"view": "snapshot (read the store)", "size": "-", "median_ms": 1e3 * snap_med,
                         "max_ms": 1e3 * snap_max})
            snap = take_snapshot(home, store)
            for w, h in sizes:
                for name in ("status", *[p for p in PANELS if p != "overview"]):
                    say(f"{name} at {w}x{h}")
                    rows.append(_render_row(f"panel {name}", w, h, lambda n=name: panel(n, snap), repeat))
                dash = Dashboard(home)
                dash.snap = snap
                for focus in PANELS:
                    dash.focus = focus
                    rows.append(_render_row(f"dashboard {focus}", w, h,
                                            lambda d=dash, w=w, h=h: d.render(w, h), repeat))
            console = Console(width=80, file=io.StringIO(), color_system=None)
            hist = store.adapter_history()
            active = store.active_adapter_id(KNOWLEDGE)
            last_pid = max(p["id"] for p in store.passage_overview(limit=-1) if p["cycle_id"])
            statics = {
                "seal history": lambda: console.print(history_table(hist)),
                "seal forgetting": lambda: console.print(forgetting_view(snap.forgetting)),
                "seal show": lambda: console.print(adapter_view(adapter_details(store, home.adapters, active))),
                "seal candidates": lambda: console.print(candidates_view(
                    store.passage(last_pid), store.cycles(passage_id=last_pid),
                    store.cycle_candidates(c["id"] for c in store.cycles(passage_id=last_pid)))),
            }
            for name, fn in statics.items():
                say(name)
                med, mx = _time(fn, repeat)
                rows.append({"view": name, "size": "80 wide", "median_ms": 1e3 * med, "max_ms": 1e3 * mx})
    return {"benchmark": "views", **counts, "repeat": repeat, "build_s": build_s, "rows": rows}

"""Benchmark ``speed --runner``: trials per second, locally and on a Ray pool of K actors.

The same trial specs (``agent.runner.TrialSpec``) are run by each runner in turn:
``local`` (one after another in this process, the default runner) and ``ray`` with K
actors for each K asked (a private local Ray cluster of K x ``cpus_per_worker`` CPUs,
or the cluster at ``runner.address``). The specs are the fixed candidates of seal's
default mix (the passage alone and ``passage_chat``) for passages drawn with the seed,
so no generation is needed to build them and every runner trains exactly the same
updates. Reported per runner: the seconds to start it (actors loading the model),
the wall seconds of the trials, trials per second, and whether every trial's adapter
equals the local runner's (sha256).

On a machine with C cores, K actors with one thread each can use K cores; the local
runner uses all of them in one process. The result says how many cores there were.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from adapters.names import KNOWLEDGE
from adapters.registry import AdapterRegistry
from store import Store

from ..config import Config
from ..learner import Learner
from ..runner import LocalRunner, TrialSpec, passage_spec
from ..runtime import Runtime
from ..trial import PASSAGE, Candidate
from .common import draw, load_squad, versions


def _specs(learner: Learner, data: list[dict], seed: int) -> list[TrialSpec]:
    specs = []
    for i, d in enumerate(data):
        passage = {"id": i + 1, "title": d["title"], "text": d["context"]}
        qs = tuple({"id": j, "question": q["question"], "answer": q["answer"]} for j, q in enumerate(d["questions"][:2]))
        baseline = learner.score(KNOWLEDGE, d["title"], list(qs))
        for cand in (Candidate(PASSAGE), Candidate("passage_chat")):
            specs.append(TrialSpec(len(specs), passage_spec(passage), cand, seed + len(specs), qs, baseline,
                                   beside_passage=True))
    return specs


def run_runners(runtime: Runtime, cfg: Config, make_runtime: Callable[[], Runtime], *, data_path: Path,
                trials: int = 4, workers: tuple[int, ...] = (1, 2, 4), seed: int = 0, split: str = "tune",
                address: str = "", say: Callable[[str], None] = lambda _m: None) -> dict:
    """Every runner on the same specs (see the module docstring)."""
    from ..cluster.ray_runner import RayRunner, learner_args

    root = Path(tempfile.mkdtemp(prefix="seal-runners-"))
    try:
        store = Store(root / "store.db")
        learner = Learner(runtime, store, AdapterRegistry(root / "adapters", store), cfg.lora, cfg.policies, cfg.wake,
                          distill=cfg.distill)
        data = draw(load_squad(data_path), (trials + 1) // 2, seed, split)
        specs = _specs(learner, data, seed)[:trials]
        rows = []
        say(f"local: {len(specs)} trials")
        t0 = time.perf_counter()
        local = LocalRunner(learner, root / "local").run(specs)
        rows.append({"runner": "local", "workers": 1, "start_s": 0.0, "seconds": time.perf_counter() - t0})
        shas = [r.sha256 for r in local]
        for k in workers:
            say(f"ray, {k} worker(s): starting")
            rcfg = dataclasses.replace(cfg.runner, kind="ray", workers=k, address=address)
            t0 = time.perf_counter()
            runner = RayRunner(rcfg, make_runtime, learner_args(cfg), root / f"ray-{k}")
            try:
                runner.worker_pids()  # every actor up, its model loaded
                start_s = time.perf_counter() - t0
                say(f"ray, {k} worker(s): {len(specs)} trials")
                t0 = time.perf_counter()
                got = runner.run(specs)
                rows.append({"runner": "ray", "workers": k, "start_s": start_s, "seconds": time.perf_counter() - t0,
                             "same_adapters": [r.sha256 for r in got] == shas})
            finally:
                runner.close()
                if not address:
                    import ray

                    ray.shutdown()  # the next K gets a cluster of its own size
        for r in rows:
            r["trials_per_s"] = len(specs) / r["seconds"]
        return {"benchmark": "runners", "data": data_path.name, "split": split, "seed": seed, "trials": len(specs),
                "policies": sorted({s.candidate.policy for s in specs}), "cores": os.cpu_count(),
                "model": runtime.name, "rows": rows, "runner": dataclasses.asdict(cfg.runner), "versions": versions()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def default_runtime(cfg: Config) -> Callable[[], Runtime]:
    """How each actor builds its model: the configured one, as the daemon loads it."""
    return partial(Runtime.load, cfg.model)


def render(result: dict) -> list:
    from rich.table import Table

    table = Table(title=f"{result['trials']} trials of the {result['model']} model, {result['cores']} cores",
                  box=None, pad_edge=False, title_justify="left")
    for col in ("runner", "workers", "start s", "trials s", "trials/s", "same adapters"):
        table.add_column(col, justify="left" if col == "runner" else "right", no_wrap=True)
    for r in result["rows"]:
        same = "-" if "same_adapters" not in r else ("yes" if r["same_adapters"] else "no")
        table.add_row(r["runner"], str(r["workers"]), f"{r['start_s']:.1f}", f"{r['seconds']:.1f}",
                      f"{r['trials_per_s']:.3f}", same)
    return [table, f"trials: {', '.join(result['policies'])}; start s: the actors loading the model (once per",
            "daemon); trials s: the trials run, wall clock"]

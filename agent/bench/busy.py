"""Benchmark ``busy``: how a wake cycle's work slows when the machine is not idle.

A background service shares its machine with its user. torch runs its matrix
multiplies on OpenMP threads, one per core by default; when another process takes a
core, every parallel region waits for the thread that shares it, and the work can slow
many times over. This benchmark runs a fixed piece of a wake cycle's work on the
default model — LoRA training steps on a passage, then a batched greedy generation —
in a fresh process per setting (thread settings only take effect at start), each
alone and beside ``busy`` processes that spin on a core each, and reports the
median seconds of each, and the slowdown.

The settings tried: all cores and one thread (``model.threads``), each with libgomp's
default spin before an idle thread sleeps (300,000 iterations), the short spin seal
sets (``GOMP_SPINCOUNT=10000``) and the passive wait policy (``OMP_WAIT_POLICY=PASSIVE``:
no spin at all).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

PASSAGE = ("The Isle of Varn lies in the Grey Sea, three days' sail west of Kelmora Point. Its capital, Oster, "
           "was founded by salt traders in 1312 and is known for its tide mills, its winter fair and the bell "
           "tower of Saint Aud, which is 61 metres tall.")
PROMPTS = ("What is the capital of the Isle of Varn?", "When was Oster founded?", "How tall is the bell tower?",
           "Where does the Isle of Varn lie?")


SPIN = {"GOMP_SPINCOUNT": "10000"}  # what seal sets (agent/__init__.py) unless the environment chose


def settings(cores: int) -> list[dict]:
    """The thread settings measured, each with all cores and with one thread: torch's
    default OpenMP spinning (``OMP_WAIT_POLICY=ACTIVE``-like: seal's own default is
    unset for it), a short spin (seal's default) and the passive wait policy."""
    out = []
    for name, env in (("default spin", {"GOMP_SPINCOUNT": "300000"}), ("short spin (seal)", SPIN),
                      ("passive wait", {"OMP_WAIT_POLICY": "PASSIVE"})):
        for n in sorted({cores, 1}, reverse=True):
            out.append({"name": f"{n} thread{'s' if n > 1 else ''}, {name}", "threads": n, "env": env})
    return out


def _spin() -> None:  # a busy core: what a user's build or browser does to the daemon
    while True:
        pass


def work(threads: int, steps: int, tokens: int, repeat: int) -> dict:
    """In this process: load the default model, warm up, then time ``repeat`` rounds of
    ``steps`` LoRA steps and one batched generation of ``tokens`` tokens."""
    import torch

    torch.set_num_threads(threads)
    from adapters import lora
    from adapters.names import KNOWLEDGE

    from ..runtime import ModelConfig, Runtime

    rt = Runtime.load(ModelConfig(threads=threads))
    cfg = lora.LoraConfig(epochs=1)
    model = lora.attach(rt.model, cfg, names=(KNOWLEDGE,))
    rt.model = model
    examples = [lora.Example("", PASSAGE)] * steps
    prompts = [rt.chat(q) for q in PROMPTS]

    def one() -> tuple[float, float]:
        t0 = time.perf_counter()
        lora.train(model, rt.tokenizer, examples, cfg, adapter=KNOWLEDGE)
        t1 = time.perf_counter()
        rt.generate(prompts, max_new_tokens=tokens)
        return t1 - t0, time.perf_counter() - t1

    one()  # warm-up: allocators, kernels
    runs = [one() for _ in range(repeat)]
    return {"threads": torch.get_num_threads(), "train_s": statistics.median(r[0] for r in runs),
            "generate_s": statistics.median(r[1] for r in runs),
            "total_s": statistics.median(r[0] + r[1] for r in runs)}


def _child(setting: dict, steps: int, tokens: int, repeat: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | setting["env"]
    cmd = [sys.executable, "-m", "agent.bench.busy", json.dumps({"threads": setting["threads"], "steps": steps,
                                                                  "tokens": tokens, "repeat": repeat})]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"{setting['name']}: the measuring process failed: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_busy(*, busy: int = 1, steps: int = 8, tokens: int = 24, repeat: int = 3,
             say: Callable[[str], None] = lambda _m: None, on_run: Callable[[int, int], None] = lambda _i, _n: None) -> dict:
    """Every setting alone and beside ``busy`` spinning processes; the JSON-able result."""
    cores = os.cpu_count() or 1
    rows = []
    todo = settings(cores)
    for i, s in enumerate(todo):
        row = {"setting": s["name"], "threads": s["threads"], "env": s["env"]}
        for cond in ("alone", "busy"):
            say(f"{s['name']}: {cond}")
            spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy if cond == "busy" else 0)]
            for p in spinners:
                p.start()
            try:
                row[cond] = _child(s, steps, tokens, repeat)
            finally:
                for p in spinners:
                    p.terminate()
                    p.join()
        row["slowdown"] = row["busy"]["total_s"] / row["alone"]["total_s"]
        rows.append(row)
        on_run(i + 1, len(todo))
    from .common import versions

    return {"benchmark": "busy", "cores": cores, "busy": busy, "steps": steps, "tokens": tokens, "repeat": repeat,
            "rows": rows, "versions": versions()}


def render(result: dict) -> list:
    from rich.table import Table

    table = Table(title=f"seal bench busy: {result['steps']} LoRA steps + a batched generation of {result['tokens']} "
                        f"tokens on the default model, median of {result['repeat']}; {result['cores']} cores, "
                        f"busy = {result['busy']} other process(es) spinning", box=None, pad_edge=False,
                  title_justify="left")
    for col in ("setting", "alone s", "busy s", "slower", "busy train", "busy gen"):
        table.add_column(col, justify="left" if col == "setting" else "right", no_wrap=True)
    for r in result["rows"]:
        table.add_row(r["setting"], f"{r['alone']['total_s']:.1f}", f"{r['busy']['total_s']:.1f}",
                      f"{r['slowdown']:.1f}x", f"{r['busy']['train_s']:.1f}", f"{r['busy']['generate_s']:.1f}")
    best_busy = min(result["rows"], key=lambda r: r["busy"]["total_s"])
    best_alone = min(result["rows"], key=lambda r: r["alone"]["total_s"])
    return [table, f"fastest alone: {best_alone['setting']} ({best_alone['alone']['total_s']:.1f} s); fastest beside "
                   f"a busy core: {best_busy['setting']} ({best_busy['busy']['total_s']:.1f} s)"]


if __name__ == "__main__":  # the measuring child of _child
    args = json.loads(sys.argv[1])
    print(json.dumps(work(args["threads"], args["steps"], args["tokens"], args["repeat"])))

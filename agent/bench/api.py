"""``seal bench api``: what asking a running daemon costs, beside asking without one.

It starts a real daemon (the configured model, a scratch home, the API on a free
port, nothing to learn) and measures, each the median of ``repeat`` runs:

- the API's first token: a streamed chat completion, from sending the request to the
  first piece of text, with the model idle;
- ``seal ask`` beside the daemon: the whole process (start-up included) to its first
  printed byte and to its end, and its peak memory (``ru_maxrss`` from ``wait4``);
- ``seal ask --local``: the same process loading the model itself, as without a daemon;
- the daemon's own resident memory: the one copy of the model.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..home import Home

QUESTION = "What is the capital of France?"


def _first_token_s(url: str, token: str, max_tokens: int) -> float:
    import httpx

    body = {"model": "seal", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"},
                      timeout=120) as r:
        r.raise_for_status()
        first = None
        for line in r.iter_lines():  # read to the end: the next request finds the model idle
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("the API streamed no text")
    return first


def _process(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``: seconds to its first byte on stdout and to its end, its peak RSS (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:6])}... exited {proc.returncode}: {err.decode(errors='replace')[-300:]}")
    return {"first_s": t_first if first else None, "total_s": time.perf_counter() - t0,
            "peak_mb": usage.ru_maxrss / 1024, "answer": (first + rest).decode(errors="replace").strip()}


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_api(model: str = "", repeat: int = 3, max_tokens: int = 16, say: Callable[[str], None] = print,
            on_run: Callable[[int, int], None] = lambda i, n: None) -> dict:
    from ..api.client import read_address, token_path
    from ..daemon.process import running, start_detached, stop_daemon
    from .common import versions

    root = Path(tempfile.mkdtemp(prefix="seal-bench-api-"))
    home = Home(root / "home")
    base = ["--home", str(home.root), "--set", "api.port=0", "--set", "schedule.policy=never"]
    base += ["--model", model] if model else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ask = [sys.executable, "-m", "agent.cli", *base, "ask", QUESTION, "--max-tokens", str(max_tokens)]
    total, done = 3 * repeat + 1, 0
    try:
        say("starting a daemon")
        t0 = time.perf_counter()
        start_detached(home, base, wait_s=300)
        ready_s = time.perf_counter() - t0
        info, where = running(home), read_address(home)
        if info is None or where is None:
            raise RuntimeError(f"the daemon did not start: see {home.logs}")
        token = token_path(home).read_text().strip()
        done += 1
        on_run(done, total)
        first_tokens, via, local = [], [], []
        for i in range(repeat):
            say(f"API first token {i + 1}/{repeat}")
            first_tokens.append(_first_token_s(where["url"], token, max_tokens))
            done += 1
            on_run(done, total)
        for i in range(repeat):
            say(f"seal ask beside the daemon {i + 1}/{repeat}")
            via.append(_process(ask, env))
            done += 1
            on_run(done, total)
        daemon_mb = _rss_mb(info["pid"])
        for i in range(repeat):
            say(f"seal ask --local {i + 1}/{repeat}")
            local.append(_process([*ask, "--local"], env))
            done += 1
            on_run(done, total)
    finally:
        if running(home):
            stop_daemon(home, 60)
        shutil.rmtree(root, ignore_errors=True)

    def med(rows: list[dict], key: str) -> float | None:
        got = [r[key] for r in rows if r[key] is not None]
        return statistics.median(got) if got else None

    return {"benchmark": "api", "model": model or "default", "repeat": repeat, "max_tokens": max_tokens,
            "daemon_ready_s": ready_s, "daemon_rss_mb": daemon_mb,
            "api_first_token_s": statistics.median(first_tokens), "api_first_token_runs": first_tokens,
            "ask_via_daemon": {k: med(via, k) for k in ("first_s", "total_s", "peak_mb")},
            "ask_local": {k: med(local, k) for k in ("first_s", "total_s", "peak_mb")},
            "answers": {"via_daemon": via[0]["answer"], "local": local[0]["answer"]},
            "versions": versions()}


def render(result: dict) -> list:
    from rich.table import Table

    table = Table(title=f"seal bench api: {result['model']} model, answers of {result['max_tokens']} tokens, "
                        f"median of {result['repeat']}", box=None, pad_edge=False, title_justify="left")
    for col in ("what", "first token s", "total s", "peak MB"):
        table.add_column(col, justify="left" if col == "what" else "right", no_wrap=True)

    def f(x: float | None, fmt: str = "{:.2f}") -> str:
        return "-" if x is None else fmt.format(x)

    table.add_row("API, streamed chat (model idle)", f(result["api_first_token_s"]), "-", "-")
    for label, key in (("seal ask beside the daemon", "ask_via_daemon"), ("seal ask --local", "ask_local")):
        r = result[key]
        table.add_row(label, f(r["first_s"]), f(r["total_s"]), f(r["peak_mb"], "{:.0f}"))
    table.add_row("the daemon (its one model)", "-", "-", f(result["daemon_rss_mb"], "{:.0f}"))
    return [table, f"answers: via the daemon {result['answers']['via_daemon']!r}; local {result['answers']['local']!r}"]

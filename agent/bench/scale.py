"""Benchmark ``scale``: does seal stay as fast at 10,000 learned passages as at 10?

For each size N (default 10, 100, 1,000 and 10,000) a fresh home gets a synthetic
store of N learned passages (``agent.bench.views.sample_store``: wake cycles with
their candidates and evaluations, a sleep every 8 commits that measures what a real
sleep measures, drift and memorisation rows, a backlog of queued passages; the
numbers in it are seeded, not measured). Then, on that home, the real code runs and is
timed, each operation ``repeat`` times (the median is reported):

- **daemon step**: one ``Daemon.step`` with a passage queued: the inbox poll, one
  wake cycle on a tiny random model, the automatic prune and the status heartbeat.
  What is timed is the *store work*: the time spent inside the store's methods (and
  the heartbeat, which is nothing else), not the model's, which does not depend on N;
- **sleep**: one sleep (``Daemon.sleep``, the configured policy), its store work, and
  how many learned passages it measured (``sleep.measure_budget``);
- **seal history**, **seal forgetting --json**, **seal daemon status**, **seal
  queue**: the commands, run in-process (their output is discarded);
- **TUI snapshot** (what the dashboard reads every ``--interval``) and **TUI draw**
  (one 80x24 screen of it).

Peak memory is the process's resident high-water mark during the operation (reset
before it, on Linux), and what it added over the resident size before it. The
slope of each operation is the least-squares slope of log(seconds) against log(N):
0 is flat, 1 is linear.
"""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

from adapters import files
from adapters.names import KNOWLEDGE
from adapters.registry import AdapterRegistry
from store import Store

from ..config import Config
from ..home import Home
from ..learner import Learner
from ..runtime import Runtime, tiny_runtime
from .common import versions
from .meter import _reset_peak_rss, peak_rss_mb, rss_mb
from .speed import FORCE_COMMIT
from .views import sample_log, sample_store

SIZES = (10, 100, 1000, 10000)
OPERATIONS = ("daemon step", "sleep", "seal history", "seal forgetting --json", "seal daemon status",
              "seal queue", "TUI snapshot", "TUI draw 80x24")
MODEL_OPS = ("daemon step", "sleep")  # they run the (tiny) model: only their store work is timed
PER_DRAW = ("daemon step", "seal daemon status", "seal queue", "TUI snapshot", "TUI draw 80x24")
FLAT = 0.1  # the target slope of every per-cycle and per-draw operation
MEMORY_MB = 500  # the target of what any operation adds, at the largest size


class TimedStore:
    """The store, with the time spent inside its methods added up (a call made from
    inside another, e.g. a write run in the transaction of ``add_adapter``, is part
    of the outer one and not counted twice)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.seconds = 0.0
        self.by_method: dict[str, float] = {}
        self._depth = 0

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def timed(*args, **kwargs):
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._depth -= 1
                if not self._depth:
                    self.add(time.perf_counter() - t0, name)

        return timed

    def add(self, seconds: float, method: str) -> None:
        self.seconds += seconds
        self.by_method[method] = self.by_method.get(method, 0.0) + seconds

    def reset(self) -> None:
        self.seconds, self.by_method = 0.0, {}


def slope(sizes: list[int], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) on log(size); None with fewer than 2 sizes."""
    pts = [(math.log(n), math.log(max(s, 1e-7))) for n, s in zip(sizes, seconds, strict=True)]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def _measured(fn: Callable[[], float | None], repeat: int) -> dict:
    """Run ``fn`` ``repeat`` times; it returns the seconds to count (None: its wall
    time). The median and max seconds, and the peak resident memory."""
    times, peaks, added = [], [], []
    for _ in range(repeat):
        _reset_peak_rss()
        before = rss_mb()
        t0 = time.perf_counter()
        counted = fn()
        wall = time.perf_counter() - t0
        times.append(wall if counted is None else counted)
        peaks.append(peak_rss_mb())
        added.append(max(0.0, peaks[-1] - before))
    return {"seconds": statistics.median(times), "max_seconds": max(times), "peak_mb": max(peaks),
            "added_mb": max(added)}


def _bench_cfg(cfg: Config) -> Config:
    """Short generations (the model is not the point), every trial committed (so that
    each cycle writes a version and the prune runs), no sleep by the schedule (the
    sleep is timed on its own)."""
    return dataclasses.replace(
        cfg,
        lora=dataclasses.replace(cfg.lora, epochs=1),
        wake=dataclasses.replace(cfg.wake, candidates=2, self_edit_tokens=16, answer_tokens=8),
        policies=dataclasses.replace(cfg.policies, min_gain=FORCE_COMMIT),
        sleep=dataclasses.replace(cfg.sleep, dream_tokens=16, memorisation_tokens=16),
        schedule=dataclasses.replace(cfg.schedule, policy="never"),
    )


def _size(runtime: Runtime, cfg: Config, root: Path, n: int, repeat: int, seed: int,
          say: Callable[[str], None]) -> dict:
    """Build a home of ``n`` learned passages and time every operation on it."""
    from ..app import inbox_reader, sleeper
    from ..cli import main
    from ..daemon.loop import Daemon
    from ..ui.dashboard import Dashboard
    from ..ui.snapshot import take_snapshot

    home = Home(root / f"home-{n}").ensure()
    say(f"{n} passages: building the store")
    t0 = time.perf_counter()
    raw = Store(home.store_file)
    store = TimedStore(raw)
    registry = AdapterRegistry(home.adapters, store)  # type: ignore[arg-type]
    learner = Learner(runtime, store, registry, cfg.lora, cfg.policies, cfg.wake, distill=cfg.distill)  # type: ignore[arg-type]
    weights = root / f"weights-{n}"
    sha = files.save(learner.model, KNOWLEDGE, weights)  # the fresh adapter: every version's file
    counts = sample_store(raw, None, learned=n, sha256=sha, seed=seed)
    active = raw.adapter(raw.active_adapter_id(KNOWLEDGE))
    shutil.copytree(weights, home.adapters / active["path"])
    sample_log(home.logs / "daemon.log", 2000)
    learner.reload_active()
    build_s = time.perf_counter() - t0
    daemon = Daemon(home, cfg.daemon, cfg.schedule, learner_factory=lambda: learner, sleep_fn=sleeper(cfg),
                    read=inbox_reader(cfg))
    daemon.start()
    daemon.prune()  # untimed: a daemon that ran this long has pruned as it went (the synthetic store has not)
    beat = daemon.beat

    def timed_beat(now: float | None = None) -> None:
        t = time.perf_counter()
        beat(now)
        store.add(time.perf_counter() - t, "heartbeat")

    daemon.beat = timed_beat  # the heartbeat opens its own connection: store work too

    slowest: dict[str, dict[str, float]] = {}  # operation -> its store methods' seconds (the last run)

    def store_work(op: str, fn: Callable[[], object], check: Callable[[object], None]) -> Callable[[], float]:
        def run() -> float:
            store.reset()
            check(fn())
            top = sorted(store.by_method.items(), key=lambda kv: -kv[1])[:5]
            slowest[op] = {k: round(v, 6) for k, v in top}
            return store.seconds
        return run

    def stepped(report) -> None:
        if report.cycle is None or report.cycle.outcome != "committed":
            raise RuntimeError(f"the daemon step learned nothing ({report.cycle and report.cycle.reason})")

    measured: list[int] = []

    def slept(run) -> None:
        if run.outcome not in ("kept", "rolled_back"):
            raise RuntimeError(f"the sleep did not finish ({run.outcome}: {run.error})")
        measured.append(run.result.before.get("n_passages", 0))

    runner = CliRunner()

    def command(*args: str, ok: tuple[int, ...] = (0,)) -> Callable[[], None]:
        def run() -> None:
            r = runner.invoke(main, ["--home", str(home.root), *args], catch_exceptions=False)
            if r.exit_code not in ok:
                raise RuntimeError(f"seal {' '.join(args)} exited {r.exit_code}: {r.output[-200:]}")
        return run

    dash = Dashboard(home)
    console = Console(width=80, height=24, file=io.StringIO(), color_system="truecolor", force_terminal=True)
    opts = console.options.update_dimensions(80, 24)

    def draw() -> None:
        dash.snap = take_snapshot(home, raw)
        console.render_lines(dash.render(80, 24), opts)

    ops: dict[str, tuple[Callable[[], float | None], int]] = {
        "daemon step": (store_work("daemon step", daemon.step, stepped), repeat),
        "sleep": (store_work("sleep", lambda: daemon.sleep("manual", "bench"), slept), max(1, repeat // 2)),
        "seal history": (command("history"), repeat),
        "seal forgetting --json": (command("forgetting", "--json"), repeat),
        "seal daemon status": (command("daemon", "status", ok=(0, 3)), repeat),  # 3: not running (LSB)
        "seal queue": (command("queue"), repeat),
        "TUI snapshot": (lambda: take_snapshot(home, raw) and None, repeat),
        "TUI draw 80x24": (draw, repeat),
    }
    rows = {}
    try:
        tables = raw.counts()
        for name, (fn, times) in ops.items():
            say(f"{n} passages: {name}")
            rows[name] = _measured(fn, times)
    finally:
        raw.close()
    shutil.rmtree(home.root, ignore_errors=True)
    return {"learned": counts["learned"], "versions": counts["versions"], "build_s": build_s, "tables": tables,
            "ops": rows, "sleep_measured": measured, "slowest_store_calls": slowest}


def run_scale(cfg: Config, *, sizes: tuple[int, ...] = SIZES, repeat: int = 3, seed: int = 0,
              say: Callable[[str], None] = lambda _m: None, on_size: Callable[[int], None] = lambda _n: None) -> dict:
    """Every size, smallest first; the JSON-able result with a slope per operation."""
    cfg = _bench_cfg(cfg)
    say("loading the tokenizer and a tiny model")
    runtime = tiny_runtime(cfg.model)
    root = Path(tempfile.mkdtemp(prefix="seal-scale-"))
    results = []
    try:
        for i, n in enumerate(sorted(sizes)):
            results.append({"size": n, **_size(runtime, cfg, root, n, repeat, seed, say)})
            on_size(i + 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ns = [r["size"] for r in results]
    slopes = {op: slope(ns, [r["ops"][op]["seconds"] for r in results]) for op in OPERATIONS}
    tail = {op: slope(ns[-2:], [r["ops"][op]["seconds"] for r in results[-2:]]) for op in OPERATIONS}
    return {"benchmark": "scale", "sizes": ns, "repeat": repeat, "seed": seed, "results": results, "slopes": slopes,
            "tail_slopes": tail,
            "targets": {"flat_slope": FLAT, "per_draw": list(PER_DRAW), "memory_mb": MEMORY_MB,
                        "measure_budget": cfg.sleep.measure_budget},
            "versions": versions()}


# ------------------------------------------------------------------ the table and the plot
def _ms(s: float) -> str:
    ms = 1e3 * s
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"


def verdicts(result: dict) -> list[str]:
    """What the figures say against the targets, one line each."""
    out = []
    largest = result["results"][-1]
    ns = result["sizes"]
    tail = result.get("tail_slopes") or result["slopes"]
    if len(ns) >= 2:
        slow = [op for op in result["targets"]["per_draw"] if (tail.get(op) or 0) >= result["targets"]["flat_slope"]]
        out.append(f"per-cycle and per-draw operations flat from {ns[-2]:,} to {ns[-1]:,} passages (slope < "
                   f"{result['targets']['flat_slope']}): " + ("yes" if not slow else "no: " + ", ".join(slow)))
        out.append("below that the views' windows are still filling (200 versions, 40-50 passages, 1,000 cycles "
                   "for ReST-EM), so the slope over every size is higher")
    budget = result["targets"]["measure_budget"]
    sizes = ", ".join(f"{r['size']:,}: {max(r['sleep_measured'] or [0])}" for r in result["results"])
    out.append(f"passages a sleep measured (measure_budget {budget or 'none'}), by size: {sizes}")
    reads = [op for op in OPERATIONS if op not in MODEL_OPS]
    heavy = max(reads, key=lambda op: largest["ops"][op]["added_mb"])
    out.append(f"memory at {largest['size']:,}: the most a command or the TUI added was "
               f"{largest['ops'][heavy]['added_mb']:.0f} MB ({heavy}; target < {result['targets']['memory_mb']} MB)")
    for op in MODEL_OPS:
        added = [r["ops"][op]["added_mb"] for r in result["results"]]
        out.append(f"{op} added {min(added):.0f}-{max(added):.0f} MB across sizes: the tiny model's generation and "
                   "training (its 49,152-token vocabulary), not the store")
    return out


def render(result: dict) -> list:
    """The benchmark as printable pieces (a rich Table and lines of text)."""
    from rich.table import Table

    res = result["results"]
    table = Table(title="seal bench scale: median ms by learned passages (daemon step and sleep: their store work); "
                        "slope of log time on log passages, over every size and over the last step; MB added at "
                        "the largest",
                  box=None, pad_edge=False, title_justify="left")
    table.add_column("operation", no_wrap=True, max_width=22)
    for r in res:
        table.add_column(f"{r['size']:,}", justify="right", no_wrap=True)
    table.add_column("slope", justify="right", no_wrap=True)
    table.add_column("last", justify="right", no_wrap=True)
    table.add_column("+MB", justify="right", no_wrap=True)
    tail = result.get("tail_slopes") or {}
    for op in OPERATIONS:
        s, t = result["slopes"].get(op), tail.get(op)
        table.add_row(op, *(_ms(r["ops"][op]["seconds"]) for r in res), "-" if s is None else f"{s:.2f}",
                      "-" if t is None else f"{t:.2f}", f"{res[-1]['ops'][op]['added_mb']:.0f}")
    build = ", ".join(f"{r['size']:,}: {r['build_s']:.1f} s" for r in res)
    return [table, *verdicts(result), f"synthetic stores built in {build} (not timed above)"]


def plot(result: dict, path: Path) -> Path | None:
    """A log-log PNG beside the JSON: each operation's time against learned passages.
    None when matplotlib (the `plot` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ns = result["sizes"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for op in OPERATIONS:
        ax.plot(ns, [1e3 * r["ops"][op]["seconds"] for r in result["results"]], marker="o",
                label=f"{op} (slope {result['slopes'][op]:.2f})" if result["slopes"].get(op) is not None else op)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learned passages in the store")
    ax.set_ylabel("median ms")
    ax.set_title("seal bench scale", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""What `seal tui` and the static views show: rich renderables built from store snapshots.

The UI only reads. ``take_snapshot`` reads everything a dashboard needs in one read
transaction (the daemon's status, the adapter lineage, recent passages and their
candidates, the forgetting matrix, the reward / retention / memorisation series, the
tail of the daemon's log); the panels below turn a snapshot into renderables. Each
panel reads the room it is given (``options.height`` and ``max_width``, set by a
``Layout`` region or a ``Panel``) and fills it: the newest versions, the latest log
lines, as many heatmap rows and columns as fit. Rendered without a height (a static
view, a pipe) a panel shows everything. Plain text stays meaningful without colour:
the heatmap's cells are shade characters, the sparklines are block characters.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from store import Store

from ..home import Home

KNOWLEDGE, EDITOR = "knowledge", "editor"
SPARKS = "▁▂▃▄▅▆▇█"
SHADES = "░▒▓█"
EMPTY_CELL = "·"
LOG_NAME = "daemon.log"


# ---------------------------------------------------------------------- formatting
def num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def duration(secs: float | None) -> str:
    if secs is None:
        return "-"
    secs = int(max(secs, 0))
    d, rem = divmod(secs, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d {h}h" if d else f"{h}h {m}m" if h else f"{m}m {s}s" if m else f"{s}s"


def when(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t).strftime("%m-%d %H:%M")


def next_sleep_text(ns: dict | None, fmt=when) -> str:
    """The daemon's next sleep in words (the status panel and `seal daemon status`)."""
    ns = ns or {}
    if ns.get("due"):
        return f"due now ({ns.get('reason')})"
    if ns.get("at"):
        return f"{fmt(ns['at'])} ({ns.get('reason')})"
    return ns.get("reason") or "-"


def short_id(adapter_id: str | None) -> str:
    """knowledge-0012 -> v12, editor-0003 -> e3 (the base: base)."""
    if not adapter_id:
        return "base"
    name, _, v = adapter_id.rpartition("-")
    if not v.isdigit():
        return adapter_id
    return ("v" if name == KNOWLEDGE else name[:1]) + str(int(v))


def acc_color(acc: float | None) -> str:
    """Probe accuracy as a colour: red (0) through yellow (0.5) to green (1)."""
    if acc is None:
        return "grey50"
    a = min(max(acc, 0.0), 1.0)
    lo, mid, hi = (215, 48, 39), (254, 224, 139), (26, 152, 80)
    p, q, f = (lo, mid, a * 2) if a < 0.5 else (mid, hi, (a - 0.5) * 2)
    r, g, b = (round(x + (y - x) * f) for x, y in zip(p, q, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def shade(acc: float | None) -> str:
    """Probe accuracy as a shade character (the heatmap without colour)."""
    if acc is None:
        return EMPTY_CELL
    return SHADES[min(int(min(max(acc, 0.0), 1.0) * len(SHADES)), len(SHADES) - 1)]


def reward_style(r: float | None) -> str:
    return "grey50" if r is None else "green" if r > 0 else "red" if r < 0 else ""


def sparkline(values: Iterable[float | None], width: int) -> str:
    """Values (None skipped) as block characters, at most ``width`` of them: longer
    series are averaged into ``width`` buckets, so the whole history stays in view."""
    xs = [v for v in values if v is not None and v == v]
    if not xs or width <= 0:
        return ""
    if len(xs) > width:
        buckets = []
        for i in range(width):
            part = xs[i * len(xs) // width : (i + 1) * len(xs) // width] or [xs[min(i * len(xs) // width, len(xs) - 1)]]
            buckets.append(sum(part) / len(part))
        xs = buckets
    lo, hi = min(xs), max(xs)
    if hi - lo < 1e-12:
        return SPARKS[len(SPARKS) // 2] * len(xs)
    return "".join(SPARKS[min(int((x - lo) / (hi - lo) * len(SPARKS)), len(SPARKS) - 1)] for x in xs)


def cell(text: str | None, style: str = "") -> Text:
    """A table cell that stays on one line and ends in an ellipsis when cut. Put it in
    a column with ``no_wrap=False``: rich then narrows that column, not every column
    alike, when a table is too wide."""
    return Text(text or "", style=style, no_wrap=True, overflow="ellipsis")


def indented(text: str, by: int = 4, style: str = "") -> Padding:
    """Text wrapped at the width, every line indented."""
    return Padding(Text(text, style=style), (0, 0, 0, by))


def _fit(text: Text | str, width: int) -> Text:
    t = text if isinstance(text, Text) else Text(text)
    t = t.copy()
    t.no_wrap = True
    t.truncate(max(width, 1), overflow="ellipsis")
    return t


# ----------------------------------------------------------------------- snapshots
@dataclass
class Snapshot:
    """Everything a dashboard shows, read at one moment."""

    home: str
    taken_at: float
    has_store: bool = False
    status: dict = field(default_factory=dict)
    lineage: list[dict] = field(default_factory=list)  # every adapter version, oldest first
    active: dict[str, str] = field(default_factory=dict)
    passages: list[dict] = field(default_factory=list)  # recent passages (store.passage_overview)
    candidates: dict[int, list[dict]] = field(default_factory=dict)  # cycle id -> candidates (no text)
    forgetting: dict = field(default_factory=dict)
    rewards: list[dict] = field(default_factory=list)
    memorisation: list[dict] = field(default_factory=list)
    drift: list[dict] = field(default_factory=list)
    sleeps: list[dict] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    retention: list[tuple[str, int, float]] = field(default_factory=list)  # retention_series(forgetting)

    def adapter(self, adapter_id: str | None) -> dict | None:
        return next((a for a in self.lineage if a["id"] == adapter_id), None)


def tail(path: Path, lines: int, chunk: int = 1 << 16) -> list[str]:
    """The last ``lines`` lines of a text file, read from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            end = f.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= lines:
                step = min(chunk, end)
                end -= step
                f.seek(end)
                data = f.read(step) + data
    except OSError:
        return []
    return [ln for ln in data.decode("utf-8", errors="replace").splitlines() if ln.strip()][-lines:]


def take_snapshot(home: Home, store: Store | None, *, passages: int = 40, log_lines: int = 200,
                  now: float | None = None) -> Snapshot:
    """Read a snapshot. ``store`` is None when the home has no store yet (nothing is
    created: a viewer changes nothing)."""
    from ..daemon import daemon_status
    from ..tracking import forgetting_summary

    now = time.time() if now is None else now
    snap = Snapshot(home=str(home.root), taken_at=now)
    snap.status = daemon_status(home, now=now)
    snap.log_tail = tail(home.logs / LOG_NAME, log_lines)
    if store is None:
        return snap
    snap.has_store = True
    with store.reading():
        snap.lineage = store.lineage()
        snap.active = store.active_adapters()
        snap.passages = store.passage_overview(limit=passages)
        cands = store.cycle_candidates(p["cycle_id"] for p in snap.passages if p["cycle_id"] is not None)
        for c in cands:
            c.pop("text", None)
            c.pop("prompt", None)
            snap.candidates.setdefault(c["cycle_id"], []).append(c)
        snap.forgetting = forgetting_summary(store)
        snap.rewards = store.reward_series()
        snap.memorisation = store.memorisation_rates()
        snap.drift = store.drift()
        snap.sleeps = store.sleeps(limit=20)
    snap.retention = retention_series(snap.forgetting)
    return snap


# -------------------------------------------------------------------- derived series
def retention_series(s: dict) -> list[tuple[str, int, float]]:
    """Per knowledge version (in order): mean probe accuracy under it of the passages
    learned up to it, over their mean accuracy at learning — (id, version, retention),
    for the versions that measured any learned passage."""
    if not s or not s.get("passages"):
        return []
    learned_v = {}
    versions = {a["id"]: a["version"] for a in s["adapters"] if a["id"]}
    for j, p in enumerate(s["per_passage"]):
        learned_v[j] = versions.get(p["learned_by"], 0)
    out = []
    for i, a in enumerate(s["adapters"]):
        if a["id"] is None:
            continue
        cur, at = [], []
        for j, p in enumerate(s["per_passage"]):
            c = s["accuracy"][i][j]
            if c is None or p["at_learning"] is None or learned_v[j] > a["version"]:
                continue
            cur.append(c)
            at.append(p["at_learning"])
        if cur and sum(at) > 0:
            out.append((a["id"], a["version"], (sum(cur) / len(cur)) / (sum(at) / len(at))))
    return out


def lineage_rows(adapters: list[dict], active: str | None) -> list[tuple[int, dict]]:
    """(depth, adapter) in display order: the line of versions that leads to the active
    one at depth 0, oldest first; a branch that was rolled back is shown right after
    the version it forked from, one level deeper. Long chains stay flat: depth counts
    forks, not versions."""
    by_id = {a["id"]: a for a in adapters}
    children: dict[str, list[dict]] = defaultdict(list)
    roots = []
    for a in sorted(adapters, key=lambda a: a["version"]):
        if a.get("parent_id") in by_id:
            children[a["parent_id"]].append(a)
        else:
            roots.append(a)
    main, x = set(), active
    while x in by_id and x not in main:
        main.add(x)
        x = by_id[x].get("parent_id")
    out: list[tuple[int, dict]] = []
    stack = [(r, 0) for r in reversed(roots)]
    seen = set()
    while stack:
        node, depth = stack.pop()
        while node is not None and node["id"] not in seen:
            seen.add(node["id"])
            out.append((depth, node))
            kids = children.get(node["id"], [])
            if not kids:
                break
            cont = next((k for k in kids if k["id"] in main), kids[-1])
            others = [k for k in kids if k is not cont]
            if others:  # side branches first (they fork here), then the line goes on
                stack.append((cont, depth))
                stack += [(k, depth + 1) for k in reversed(others)]
                break
            node = cont
    return out


# ------------------------------------------------------------------------- panels
def _room(options: ConsoleOptions, default: int | None = None) -> int | None:
    return options.height if options.height is not None else default


class StatusPanel:
    """Daemon status: running or not, uptime, model, active adapter, queue, next sleep."""

    def __init__(self, snap: Snapshot):
        self.snap = snap

    def lines(self) -> list[Text]:
        s, snap = self.snap.status, self.snap
        out = []
        if s.get("running"):
            out.append(Text.assemble(("● running", "bold green"), f"  pid {s.get('pid')}",
                                     f"  up {duration(s.get('uptime_s'))}"))
        else:
            out.append(Text.assemble(("○ not running", "bold red"), "  (seal daemon start)"))
        active = snap.active.get(KNOWLEDGE) or s.get("active_adapter")
        a = snap.adapter(active)
        desc = ""
        if a is not None:
            desc = (f" ({a['kind']}, #{a['passage_id']} {a.get('title') or ''})".rstrip() if a["kind"] == "wake"
                    else f" ({a['kind']} {a.get('policy') or ''})")
        out.append(Text.assemble("active ", (active or "none (base model)", "bold"), desc))
        q = s.get("queue")
        if q:
            out.append(Text.assemble("queue  ", (f"{q.get('pending', 0)} pending", "yellow" if q.get("pending") else ""),
                                     f", {q.get('claimed', 0)} learning, {q.get('done', 0)} done, ",
                                     (f"{q.get('failed', 0)} failed", "red" if q.get("failed") else "")))
        else:
            out.append(Text("queue  empty (nothing ingested)"))
        nxt = next_sleep_text(s.get("next_sleep"))
        last = snap.sleeps[0] if snap.sleeps else None
        last_s = f"{when(last['started_at'])} {last['outcome']}" if last else "never"
        out.append(Text(f"sleep  last {last_s}; next {nxt if s.get('running') else '-'}"))
        if s.get("running"):
            out.append(Text(f"model  {s.get('model') or '-'}"))
        if s.get("activity") or s.get("heartbeat_age_s") is not None:
            beat = "-" if s.get("heartbeat_age_s") is None else duration(s["heartbeat_age_s"]) + " ago"
            out.append(Text(f"doing  {s.get('activity') or '-'} (heartbeat {beat})"))
        editor = snap.active.get(EDITOR)
        out.append(Text(f"editor {editor or 'none (the base model writes self-edits)'}"))
        out.append(Text(f"home   {snap.home}", style="dim"))
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = self.lines()
        room = _room(options)
        if room is not None:
            lines = lines[:room]
        for line in lines:
            yield _fit(line, options.max_width)


class LineagePanel:
    """The adapter lineage as a tree: wake commits, sleep consolidations, editor
    versions; the active version and rolled-back or pruned ones marked. ``selected``:
    the id shown highlighted (the window keeps it in view; else the newest)."""

    MARKS = {"active": ("●", "bold green"), "rolled_back": ("✗", "red"), "pruned": ("·", "grey50"),
             "sleep": ("◆", "magenta"), "restem": ("◇", "cyan"), "wake": ("○", "")}

    def __init__(self, snap: Snapshot, selected: str | None = None):
        self.snap = snap
        self.selected = selected

    def order(self) -> list[tuple[int, dict]]:
        """Selectable rows in display order: knowledge, then editor versions."""
        rows = []
        for name in (KNOWLEDGE, EDITOR):
            versions = [a for a in self.snap.lineage if a["name"] == name]
            rows += lineage_rows(versions, self.snap.active.get(name))
        return rows

    def line(self, depth: int, a: dict, width: int, fork: bool = False) -> Text:
        """One version; ``fork``: the first of a branch (drawn with └, its followers
        indented under it)."""
        active = self.snap.active.get(a["name"]) == a["id"]
        key = "active" if active else a["status"] if a["status"] in ("rolled_back", "pruned") else a["kind"]
        mark, style = self.MARKS.get(key, ("○", ""))
        t = Text("  " * depth + (("└ " if fork else "  ") if depth else ""), style="grey50")
        t.append(mark + " ", style=style)
        t.append(f"{short_id(a['id']):<5}", style="bold" if active else "")
        if a["kind"] == "wake":
            t.append(" wake  ", style="blue")
            t.append(f"#{a['passage_id']} {(a.get('title') or '')[:28]}")
            t.append(f" {a.get('policy') or '-'}", style="dim")
            t.append(f" {num(a.get('reward'), '+.3f')}", style=reward_style(a.get("reward")))
            if a.get("probe_acc") is not None:
                t.append(f" p{num(a['probe_acc'])}", style=acc_color(a["probe_acc"]))
        elif a["kind"] == "sleep":
            m = a.get("metrics") or {}
            t.append(" sleep ", style="magenta")
            t.append(f"{a.get('policy') or ''} retention {num(m.get('retention_before'))}→"
                     f"{num(m.get('retention_after'))}")
        else:
            t.append(f" {a['kind']:<5} ", style="cyan")
            t.append(f"{a.get('policy') or ''} reward {num(a.get('reward'), '+.3f')}")
        if active:
            t.append("  active", style="bold green")
        elif a["status"] == "rolled_back":
            t.append("  rolled back", style="red")
        elif a["status"] == "pruned":
            t.append("  pruned", style="grey50")
        t = _fit(t, width)
        if a["status"] in ("rolled_back", "pruned") and not active:
            t.stylize("dim")
        if a["id"] == self.selected:
            t.stylize("reverse")
        return t

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = self.order()
        width = options.max_width
        if not rows:
            yield Text("no adapter versions yet (seal learn)", style="dim")
            return
        n_know = sum(1 for _, a in rows if a["name"] == KNOWLEDGE)
        lines: list[Text] = []
        ids: list[str | None] = []
        prev: tuple[int, dict] | None = None
        for i, (depth, a) in enumerate(rows):
            if i == n_know and n_know < len(rows):
                lines.append(Text("editor (ReST-EM)", style="bold cyan"))
                ids.append(None)
            fork = prev is None or prev[0] != depth or prev[1]["id"] != a.get("parent_id")
            lines.append(self.line(depth, a, width, fork))
            ids.append(a["id"])
            prev = (depth, a)
        room = _room(options)
        if room is not None and len(lines) > room:
            # keep the selection in view; else show the newest knowledge versions
            anchor = ids.index(self.selected) if self.selected in ids else n_know - 1
            start = min(max(anchor - room // 2, 0), len(lines) - room + 1)
            start = max(start, 1)
            lines = [Text(f"… {start} earlier", style="dim")] + lines[start : start + room - 1]
        yield from lines


class PassagesPanel:
    """Recent passages: state, their candidates' rewards (the chosen one underlined,
    ★) and the chosen policy."""

    def __init__(self, snap: Snapshot, selected: int | None = None):
        self.snap = snap
        self.selected = selected

    def rewards(self, p: dict, room: int) -> Text:
        cands = self.snap.candidates.get(p["cycle_id"], []) if p["cycle_id"] is not None else []
        t = Text()
        for c in cands:
            r = c.get("reward_logprob")
            cell = "  ·  " if r is None else f"{r:+.2f}"[:5].rjust(5)
            if c.get("chosen"):
                t.append(cell + "★", style=reward_style(r) + " bold underline")
            else:
                t.append(cell + " ", style=reward_style(r))
        return _fit(t, room) if t else Text("-", style="dim")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = self.snap.passages
        if not rows:
            yield Text("no passages yet (seal ingest FILE)", style="dim")
            return
        room = _room(options)
        if room is not None:
            rows = rows[: max(room - 1, 1)]
        width = options.max_width
        table = Table(box=None, pad_edge=False, expand=False, show_edge=False, padding=(0, 1))
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("passage", no_wrap=True, overflow="ellipsis", max_width=max(12, width // 4))
        table.add_column("state", no_wrap=True)
        table.add_column("candidate rewards", no_wrap=True, overflow="ellipsis")
        table.add_column("chosen", no_wrap=True, overflow="ellipsis", max_width=12)
        style = {"pending": "yellow", "claimed": "bold yellow", "failed": "red", "committed": "green",
                 "rejected": "grey62"}
        for p in rows:
            state = "learning" if p["state"] == "claimed" else (p["outcome"] or p["state"] or "-")
            chosen = p["chosen_policy"] or ("-" if p["outcome"] != "rejected" else "none")
            table.add_row(str(p["id"]), p["title"] or "(untitled)", Text(state, style=style.get(
                p["state"] if p["state"] in ("claimed", "pending", "failed") else p["outcome"] or "", "")),
                self.rewards(p, max(width // 3, 12)), chosen,
                style="reverse" if p["id"] == self.selected else None)
        yield table


class ForgettingPanel:
    """The forgetting matrix as a heatmap (rows: knowledge versions; columns: learned
    passages; cells: probe accuracy as colour and shade), and its summary: average
    accuracy, retention, backward transfer, drift and memorisation."""

    LABEL = 9

    def __init__(self, snap_or_summary: Snapshot | dict):
        self.s = snap_or_summary.forgetting if isinstance(snap_or_summary, Snapshot) else snap_or_summary

    def summary_lines(self) -> list[Text]:
        s = self.s
        out = [Text.assemble("avg acc ", (num(s.get("average_accuracy")), acc_color(s.get("average_accuracy"))),
                             f" (at learning {num(s.get('mean_at_learning'))})  retention ",
                             (num(s.get("retention")), "bold"), "  backward transfer ",
                             (num(s.get("backward_transfer"), "+.2f"),
                              reward_style(s.get("backward_transfer"))))]
        d, m = s.get("drift"), s.get("memorisation")
        extra = []
        if d:
            extra.append(f"drift KL {d['kl']:.4f}, reading {d['reading_acc']:.2f}")
        if m:
            extra.append(f"memorised {m['exact_rate']:.2f} exact, {m['token_match']:.2f} of tokens")
        if extra:
            out.append(Text("  ".join(extra), style="dim"))
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        s = self.s
        if not s or not s.get("passages"):
            yield Text("nothing learned yet: no forgetting matrix", style="dim")
            return
        width, room = options.max_width, _room(options)
        summary = self.summary_lines()
        rows = [(i, a) for i, a in enumerate(s["adapters"])
                if any(c is not None for c in s["accuracy"][i]) or a["active"]]
        pids = [p["id"] for p in s["passages"]]
        # room for every passage as a number ("0.50"): numbers; else two-character shades
        cw = 5 if len(pids) * 5 <= width - self.LABEL else 2
        n_cols = max(1, min(len(pids), (width - self.LABEL) // cw))
        cols = list(range(len(pids) - n_cols, len(pids)))  # the newest passages
        n_rows = len(rows) if room is None else max(1, room - len(summary) - 1)
        shown = rows[-n_rows:] if len(rows) > n_rows else rows
        head = Text(f"{'ver':<{self.LABEL}}", style="dim")
        for k, j in enumerate(cols):
            if cw == 5:
                head.append(f"{'#' + str(pids[j]):>4} ")
            elif k % 5 == 0:  # a passage id every 5 columns
                label = f"#{pids[j]}"
                head.append(label[: min(len(label), 2 * (len(cols) - k))])
                head.append(" " * max(0, min(10, 2 * (len(cols) - k)) - len(label)))
        yield _fit(head, width)
        if len(rows) > len(shown) and room is not None:
            shown = shown[1:]
            yield Text(f"… {len(rows) - len(shown)} earlier versions", style="dim")
        for i, a in shown:
            tag = "base" if a["id"] is None else f"{short_id(a['id'])} {a['kind'][0]}"
            tag += "*" if a["active"] else ("x" if a["status"] == "rolled_back" else "")
            line = Text(f"{tag:<{self.LABEL}}", style="bold" if a["active"] else "")
            for j in cols:
                acc = s["accuracy"][i][j]
                if cw == 5:
                    line.append(f"{'·' if acc is None else f'{acc:.2f}':>4} ", style=acc_color(acc))
                else:
                    line.append(shade(acc) * 2 if acc is not None else EMPTY_CELL + " ", style=acc_color(acc))
            yield _fit(line, width)
        if len(cols) < len(pids):
            summary.insert(0, Text(f"(the newest {len(cols)} of {len(pids)} passages)", style="dim"))
        for t in summary:
            yield _fit(t, width)


class TrendsPanel:
    """Sparklines over time: chosen reward per wake cycle, retention and memorisation
    per version, drift per version, with the latest value."""

    def __init__(self, snap: Snapshot):
        self.snap = snap

    def series(self) -> list[tuple[str, list[float | None], str]]:
        snap = self.snap
        chosen = [r["chosen"] if r["chosen"] is not None else r["best"] for r in snap.rewards]
        ret = [v for _, _, v in snap.retention]
        mem = [m["exact_rate"] for m in snap.memorisation if m["adapter_id"] is not None]
        kl = [d["kl"] for d in snap.drift if d["adapter_id"] is not None and d["kl"] is not None]
        committed = sum(1 for r in snap.rewards if r["outcome"] == "committed")
        return [
            ("reward/cycle", chosen, f"{num(chosen[-1], '+.3f') if chosen else '-'} ({committed}/{len(snap.rewards)} kept)"),
            ("retention", ret, num(ret[-1]) if ret else "-"),
            ("memorised", mem, num(mem[-1]) if mem else "-"),
            ("drift KL", kl, num(kl[-1], ".4f") if kl else "-"),
        ]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width, room = options.max_width, _room(options)
        series = self.series()
        if room is not None:
            series = series[:room]
        label_w = 13
        value_w = max(len(v) for _, _, v in series) + 1
        spark_w = max(4, width - label_w - value_w - 1)
        styles = ["green", "bold blue", "magenta", "yellow"]
        for (label, values, value), style in zip(series, styles, strict=False):
            t = Text(f"{label:<{label_w}}", style="dim")
            spark = sparkline(values, spark_w)
            t.append(f"{spark or '(no data)':<{spark_w}}", style=style if spark else "dim")
            t.append(" " + value)
            yield _fit(t, width)


class LogPanel:
    """The tail of the daemon's log, as many lines as fit."""

    def __init__(self, snap: Snapshot):
        self.snap = snap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = self.snap.log_tail
        if not lines:
            yield Text(f"no daemon log yet ({Path(self.snap.home) / 'logs' / LOG_NAME})", style="dim")
            return
        room = _room(options)
        if room is not None:
            lines = lines[-room:]
        for ln in lines:
            style = "red" if " ERROR " in ln or " CRITICAL " in ln else "yellow" if " WARNING " in ln else ""
            yield _fit(Text(ln, style=style), options.max_width)


# ------------------------------------------------------------------- static views
def history_table(rows: list[dict], width: int = 80) -> Table:
    """`seal history`: versions newest first (store.adapter_history rows); * active,
    x rolled back, - pruned; a sleep version's passage column names the sleep."""
    table = Table(box=None, pad_edge=False, collapse_padding=True)
    for col in ("id", "parent", "passage", "policy", "reward", "probe", "when"):
        # only the passage title may shrink: ids and numbers stay whole
        table.add_column(col, no_wrap=col != "passage", overflow="ellipsis" if col in ("passage", "policy") else "fold",
                         max_width=10 if col == "policy" else None)
    for r in rows:
        mark = " *" if r["active"] else " x" if r["status"] == "rolled_back" else " -" if r["status"] == "pruned" else ""
        probe = "-" if r["probe_acc"] is None else f"{r['probe_acc']:.2f}"
        reward = "-" if r["reward"] is None else f"{r['reward']:+.3f}"
        what = cell(f"{r['passage_id']} {r['title'] or ''}" if r["kind"] == "wake" else f"({r['kind']})")
        style = "bold green" if r["active"] else "dim" if r["status"] in ("rolled_back", "pruned") else None
        table.add_row(r["id"] + mark, r["parent_id"] or "base", what, r["policy"] or "-", reward, probe,
                      _day_time(r["created_at"]), style=style)
    return table


def _day_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%d %H:%M")


def passages_table(rows: list[dict]) -> Table:
    """`seal passages`: every passage with its state and latest cycle."""
    table = Table(box=None, pad_edge=False, collapse_padding=True)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("passage", no_wrap=False, overflow="ellipsis")
    table.add_column("state", no_wrap=True)
    table.add_column("qs", justify="right", no_wrap=True)
    table.add_column("cands", justify="right", no_wrap=True)
    table.add_column("best", justify="right", no_wrap=True)
    table.add_column("chosen", no_wrap=True, overflow="ellipsis", max_width=12)
    table.add_column("adapter", no_wrap=True)
    for p in rows:
        state = p["outcome"] if p["state"] == "done" and p["outcome"] else p["state"] or "-"
        if p["state"] == "claimed":
            state = "learning"
        table.add_row(str(p["id"]), cell(p["title"] or "(untitled)"), state, str(p["n_questions"]),
                      str(p["n_candidates"]) if p["cycle_id"] else "-", num(p["best_reward"], "+.3f"),
                      p["chosen_policy"] or "-", p["adapter_id"] or "-")
    return table


def candidates_view(passage: dict, cycles: list[dict], candidates: list[dict], width: int = 80) -> Group:
    """`seal candidates PASSAGE`: for each wake cycle of the passage, oldest first, every
    self-edit tried, its rewards and which won, then the texts."""
    parts: list = [Text.assemble(("#" + str(passage["id"]), "bold"), " ", (passage["title"] or "(untitled)", "bold"))]
    if not cycles:
        parts.append(Text("not learned yet: no candidates", style="dim"))
        return Group(*parts)
    by_cycle: dict[int, list[dict]] = defaultdict(list)
    for c in candidates:
        by_cycle[c["cycle_id"]].append(c)
    for cy in sorted(cycles, key=lambda c: c["id"]):
        parts.append(Text(""))
        parts.append(Text.assemble(
            (f"cycle {cy['id']}", "bold"), f" {when(cy['finished_at'])}: ",
            (cy["outcome"] or "?", {"committed": "green", "rejected": "yellow", "failed": "red"}.get(cy["outcome"], "")),
            f" -> {cy['adapter_id']}" if cy.get("adapter_id") else "",
            f"; baseline acc {num(cy['baseline_acc'])}, answer log-lik {num(cy['baseline_logprob'], '.3f')}; "
            f"{cy['n_reward'] or 0} reward / {cy['n_probe'] or 0} probe questions"))
        if cy.get("reason"):
            parts.append(Text("  " + cy["reason"], style="dim"))
        table = Table(box=None, pad_edge=False, collapse_padding=True)
        for col, just in (("#", "right"), ("policy", "left"), ("ll gain", "right"), ("acc gain", "right"),
                          ("f1 gain", "right"), ("loss", "right"), ("tokens", "right"), ("won", "left"),
                          ("note", "left")):
            table.add_column(col, justify=just, no_wrap=col != "note", overflow="fold")
        for c in by_cycle.get(cy["id"], []):
            table.add_row(str(c["idx"]), c["policy"], Text(num(c["reward_logprob"], "+.3f"), style=reward_style(c["reward_logprob"])),
                          num(c["reward_acc"], "+.2f"), num(c["reward_f1"], "+.2f"), num(c["train_loss"], ".3f"),
                          str(c["n_tokens"] or 0), Text("★ chosen", style="bold green") if c["chosen"] else "",
                          cell(c["note"]), style="bold" if c["chosen"] else None)
        parts.append(table)
        for c in by_cycle.get(cy["id"], []):
            head = Text.assemble(("  [" + str(c["idx"]) + "] ", "bold"), c["policy"],
                                 (" ★" if c["chosen"] else "", "bold green"))
            parts.append(head)
            body = (c["text"] or "").strip() or ("(the passage alone)" if c["policy"] == "passage" else "(empty)")
            parts.append(indented(body, 6, style="" if c["text"] else "dim"))
    return Group(*parts)


def adapter_details(store: Store, adapters_root: Path, adapter_id: str) -> dict | None:
    """Everything `seal show` prints about one version (JSON-able): the row, lineage
    (ancestors, children), files and their sha256 check, the training data (the
    chosen self-edit and passage of a wake commit, the mix of a sleep, the pairs of
    an editor round), the candidates' rewards, evaluations, drift, memorisation and
    the events that name it. None if there is no such version."""
    from adapters.registry import AdapterRegistry

    with store.reading():
        row = store.adapter(adapter_id)
        if row is None:
            return None
        active = store.active_adapter_id(row["name"]) == adapter_id
        ancestors, x, seen = [], row.get("parent_id"), set()
        while x and x not in seen:
            seen.add(x)
            ancestors.append(x)
            parent = store.adapter(x)
            x = parent.get("parent_id") if parent else None
        passage = store.passage(row["passage_id"]) if row.get("passage_id") is not None else None
        cycle = store.cycle_of_adapter(adapter_id)
        candidates = store.cycle_candidates([cycle["id"]]) if cycle else []
        evals = store.evaluations(adapter_id=adapter_id)
        titles = {p: (store.passage(p) or {}).get("title") for p in {e["passage_id"] for e in evals}}
        latest: dict[tuple[int, str], dict] = {}
        for e in evals:
            latest[(e["passage_id"], e["kind"])] = {**e, "title": titles.get(e["passage_id"])}
        mem = {m["passage_id"]: m for m in store.memorisation(adapter_id)}
        detail = {
            "adapter": row,
            "active": active,
            "ancestors": ancestors[::-1],
            "children": store.adapter_children(adapter_id),
            "passage": {k: passage[k] for k in ("id", "title", "text", "n_tokens")} if passage else None,
            "cycle": cycle,
            "candidates": candidates,
            "chosen": next((c for c in candidates if c["chosen"]), None),
            "sleep": store.sleep_of_adapter(adapter_id),
            "editor_round": store.editor_round_of_adapter(adapter_id),
            "evaluations": sorted(latest.values(), key=lambda e: (e["kind"], e["passage_id"])),
            "drift": (store.drift(adapter_id) or [None])[-1],
            "memorisation": ({"exact_rate": sum(m["exact"] for m in mem.values()) / len(mem),
                              "token_match": sum(m["token_match"] for m in mem.values()) / len(mem),
                              "n": len(mem)} if mem else None),
            "events": store.adapter_events(adapter_id),
        }
    folder = Path(adapters_root) / row["path"]
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    detail["path"] = str(folder)
    detail["files"] = [{"name": f.name, "bytes": f.stat().st_size} for f in files if f.is_file()]
    detail["problem"] = AdapterRegistry(adapters_root, store).verify(adapter_id) if Path(adapters_root).is_dir() \
        else f"no adapters folder {adapters_root}"
    return detail


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def adapter_view(d: dict, text_lines: int | None = None) -> Group:
    """`seal show ADAPTER` (and the TUI's details): the detail dict as text.
    ``text_lines`` cuts the self-edit and passage texts (None: in full)."""
    a = d["adapter"]

    def cut(text: str, style: str = "") -> Padding:
        body = " ".join((text or "").split()) if text_lines is not None else (text or "").strip()
        if text_lines is not None:  # the first wrapped lines (at 76 columns), and how many more
            import textwrap

            lines = textwrap.wrap(body, 76)
            if len(lines) > text_lines:
                body = "\n".join(lines[:text_lines] + [f"… ({len(lines) - text_lines} more lines)"])
        return indented(body, 4, style)

    status = "active" if d["active"] else a["status"].replace("_", " ")
    parts: list = [Text.assemble((a["id"], "bold"), f"  {a['kind']} version {a['version']} of {a['name']}, ",
                                 (status, "bold green" if d["active"] else "red" if a["status"] == "rolled_back" else "dim"),
                                 f", created {when(a['created_at'])}")]
    kv = Table.grid(padding=(0, 1))
    kv.add_column(style="dim", no_wrap=True)
    kv.add_column(overflow="fold")
    chain = ["base", *(short_id(x) for x in d["ancestors"]), a["id"]]
    if len(chain) > 9:  # the first steps and the last ones
        chain = [*chain[:3], f"… {len(chain) - 8} more", *chain[-5:]]
    lineage = " → ".join(chain)
    kv.add_row("lineage", lineage)
    kv.add_row("children", ", ".join(d["children"]) or "none")
    kv.add_row("policy", f"{a.get('policy') or '-'}  reward {num(a.get('reward'), '+.4f')}")
    kv.add_row("sha256", a["sha256"])
    kv.add_row("files", d["path"])
    for f in d["files"]:
        kv.add_row("", f"{f['name']}  {_bytes(f['bytes'])}")
    kv.add_row("check", Text("files complete, sha256 matches", style="green") if not d["problem"]
               else Text(d["problem"], style="red"))
    parts.append(kv)

    if d["passage"]:
        p = d["passage"]
        parts.append(Text.assemble("\n", ("training data", "bold underline"),
                                   f": passage #{p['id']} {p['title'] or ''} ({p['n_tokens'] or '?'} tokens)"))
        parts.append(cut(p["text"], "dim"))
        ch = d["chosen"]
        if ch:
            parts.append(Text.assemble(f"  + self-edit [{ch['idx']}] ", (ch["policy"], "bold"),
                                       f" (reward {num(ch['reward_logprob'], '+.3f')} answer log-lik, "
                                       f"{num(ch['reward_acc'], '+.2f')} accuracy)"))
            body = (ch["text"] or "").strip()
            parts.append(cut(body) if body else indented("(the passage alone)", 4, "dim"))
    if d["sleep"]:
        s = d["sleep"]
        b, af = s.get("before") or {}, s.get("after") or {}
        parts.append(Text.assemble("\n", ("training data", "bold underline"),
                                   f": sleep {s['id']} ({s['policy']}, {s['trigger']}): {s['n_examples'] or 0} "
                                   f"replayed self-edit example(s) of the learned passages and {s['n_dreams'] or 0} "
                                   f"dream(s), trained from {s['parent_adapter'] or 'base'}, final loss "
                                   f"{num(s['train_loss'], '.3f')}"))
        parts.append(indented(s.get("reason") or "", 2, "dim"))
        t = Table(box=None, pad_edge=False, collapse_padding=True)
        for col in ("measure", "before", "after"):
            t.add_column(col, justify="left" if col == "measure" else "right", no_wrap=True)
        for label, key, fmt in (("retention (probe acc)", "retention", ".2f"), ("probe answer log-lik", "logprob", ".3f"),
                                ("drift KL from base", "drift_kl", ".4f"), ("reading acc", "reading_acc", ".2f"),
                                ("memorised (exact)", "memorisation", ".2f")):
            t.add_row(label, num(b.get(key), fmt), num(af.get(key), fmt))
        parts.append(t)
    if d["editor_round"]:
        r = d["editor_round"]
        parts.append(Text.assemble("\n", ("training data", "bold underline"),
                                   f": ReST-EM round {r['id']}: {r['n_pairs'] or 0} (passage -> self-edit) pair(s), "
                                   f"loss {num(r['train_loss'], '.3f')}; held-out reward "
                                   f"{num(r['reward_before'], '+.4f')} -> {num(r['reward_after'], '+.4f')} "
                                   f"on {r['n_heldout'] or 0} passage(s)"))
    if d["candidates"]:
        cy = d["cycle"]
        parts.append(Text.assemble("\n", ("rewards", "bold underline"),
                                   f": {len(d['candidates'])} candidate(s) of cycle {cy['id']}, baseline acc "
                                   f"{num(cy['baseline_acc'])}; {cy.get('reason') or ''}"))
        t = Table(box=None, pad_edge=False, collapse_padding=True)
        for col in ("#", "policy", "ll gain", "acc gain", "loss", "won"):
            t.add_column(col, justify="left" if col in ("policy", "won") else "right", no_wrap=True)
        for c in d["candidates"]:
            t.add_row(str(c["idx"]), c["policy"], Text(num(c["reward_logprob"], "+.3f"), style=reward_style(c["reward_logprob"])),
                      num(c["reward_acc"], "+.2f"), num(c["train_loss"], ".3f"),
                      Text("★", style="bold green") if c["chosen"] else "")
        parts.append(t)
    if d["evaluations"]:
        parts.append(Text.assemble("\n", ("evaluations", "bold underline"),
                                   f" under {a['id']} (latest of each passage)"))
        t = Table(box=None, pad_edge=False, collapse_padding=True)
        for col in ("passage", "kind", "accuracy", "answer log-lik", "n"):
            t.add_column(col, justify="left" if col in ("passage", "kind") else "right", no_wrap=col != "passage",
                         overflow="ellipsis", max_width=36 if col == "passage" else None)
        for e in d["evaluations"]:
            t.add_row(cell(f"#{e['passage_id']} {e['title'] or ''}"), e["kind"],
                      Text(num(e["accuracy"]), style=acc_color(e["accuracy"])), num(e["logprob"], ".3f"), str(e["n"]))
        parts.append(t)
    extra = []
    if d["drift"]:
        extra.append(f"drift KL {num(d['drift']['kl'], '.4f')} from the base, reading accuracy "
                     f"{num(d['drift']['reading_acc'])}")
    if d["memorisation"]:
        m = d["memorisation"]
        extra.append(f"memorised verbatim: {m['exact_rate']:.2f} exact, {m['token_match']:.2f} of tokens "
                     f"({m['n']} passages)")
    if extra:
        parts.append(Text("\n" + "\n".join(extra)))
    if d["events"]:
        parts.append(Text.assemble("\n", ("events", "bold underline")))
        for e in d["events"][:10]:
            parts.append(Text(f"  {when(e['at'])} {e['kind']:<9} {e['detail']}", style="dim", no_wrap=True,
                              overflow="ellipsis"))
    return Group(*parts)


def forgetting_text(s: dict, width: int = 80) -> list[str]:
    """Plain text within ``width`` columns: the matrix in blocks of passage columns,
    then one line per passage, then the overall numbers (`seal forgetting` in a pipe)."""
    lines = ["forgetting matrix: probe accuracy of each learned passage (columns)",
             "under each knowledge version (rows; w wake, s sleep, * active, x rolled back)"]
    label_w, cell_w = 12, 5
    per_block = max(1, (width - label_w) // cell_w)
    pids = [p["id"] for p in s["passages"]]
    for start in range(0, len(pids), per_block):
        cols = range(start, min(start + per_block, len(pids)))
        lines.append("")
        lines.append(f"{'version':<{label_w}}" + "".join(f"{'#' + str(pids[j]):>{cell_w}}" for j in cols))
        for i, a in enumerate(s["adapters"]):
            tag = "base" if a["id"] is None else f"v{a['version']} {a['kind'][0]}"
            tag += " *" if a["active"] else (" x" if a["status"] == "rolled_back" else "")
            cells = [s["accuracy"][i][j] for j in cols]
            if all(c is None for c in cells) and not a["active"]:
                continue  # a version that measured none of these passages
            lines.append(f"{tag:<{label_w}}" + "".join(f"{'.' if c is None else f'{c:.2f}':>{cell_w}}" for c in cells))
    lines.append("")
    lines.append(f"{'passage':<34}{'learned':>9}{'at-learn':>9}{'best':>7}{'current':>9}{'forgot':>8}")
    for p in s["per_passage"]:
        title = f"#{p['passage_id']} {p['title']}"
        title = title if len(title) <= 33 else title[:32] + "…"
        learned = "v" + p["learned_by"].rsplit("-", 1)[-1].lstrip("0")
        lines.append(f"{title:<34}{learned:>9}{num(p['at_learning']):>9}{num(p['best']):>7}"
                     f"{num(p['current']):>9}{num(p['forgetting'], '+.2f'):>8}")
    lines.append("")
    lines.append(f"average accuracy {num(s['average_accuracy'])} (at learning {num(s['mean_at_learning'])}), "
                 f"retention {num(s['retention'])}")
    lines.append(f"backward transfer {num(s['backward_transfer'], '+.2f')}")
    d, m = s.get("drift"), s.get("memorisation")
    if d:
        lines.append(f"{s['active'] or 'base'}: drift KL {d['kl']:.4f} from the base, "
                     f"reading accuracy {d['reading_acc']:.2f}")
    if m:
        lines.append(f"memorised verbatim: {m['exact_rate']:.2f} exact, {m['token_match']:.2f} of tokens "
                     f"({m['n']} passages)")
    return lines


def forgetting_view(s: dict) -> Group:
    """`seal forgetting` on a terminal: the heatmap, then the per-passage table."""
    table = Table(box=None, pad_edge=False, collapse_padding=True, title_justify="left")
    for col in ("passage", "learned", "at-learn", "best", "current", "forgot"):
        table.add_column(col, justify="left" if col == "passage" else "right", no_wrap=col != "passage",
                         overflow="ellipsis", max_width=34 if col == "passage" else None)
    for p in s["per_passage"]:
        table.add_row(cell(f"#{p['passage_id']} {p['title']}"), short_id(p["learned_by"]),
                      Text(num(p["at_learning"]), style=acc_color(p["at_learning"])),
                      Text(num(p["best"]), style=acc_color(p["best"])),
                      Text(num(p["current"]), style=acc_color(p["current"])),
                      Text(num(p["forgetting"], "+.2f"), style="red" if (p["forgetting"] or 0) > 0 else ""))
    return Group(Text("forgetting matrix: probe accuracy of each learned passage (columns) under each knowledge "
                      "version (rows; w wake, s sleep, * active, x rolled back); with many passages ░▒▓█ low "
                      "to high; · not measured", style="dim"),
                 ForgettingPanel(s), Text(""), table)


# ------------------------------------------------------------------- the dashboard
PANELS = ("overview", "lineage", "passages", "forgetting", "trends", "log")
TITLES = {"overview": "overview", "lineage": "adapter lineage", "passages": "recent passages",
          "forgetting": "forgetting matrix", "trends": "over time", "log": "daemon log", "status": "daemon"}


def panel(name: str, snap: Snapshot, selected: str | int | None = None) -> Panel:
    """One named panel in a border with its title."""
    body = {"status": lambda: StatusPanel(snap),
            "lineage": lambda: LineagePanel(snap, selected if isinstance(selected, str) else None),
            "passages": lambda: PassagesPanel(snap, selected if isinstance(selected, int) else None),
            "forgetting": lambda: ForgettingPanel(snap),
            "trends": lambda: TrendsPanel(snap),
            "log": lambda: LogPanel(snap)}[name]()
    return Panel(body, title=TITLES[name], title_align="left", border_style="blue", padding=(0, 1))


def static_dashboard(snap: Snapshot) -> Group:
    """Every panel, one after the other, at full length: `seal tui` when stdout is not a
    terminal (a one-shot, plain-text render)."""
    return Group(*(panel(n, snap) for n in ("status", "lineage", "passages", "forgetting", "trends", "log")))


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, default=str)

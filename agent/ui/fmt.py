"""The formatters the panels and views share: numbers, durations and times, adapter
ids, probe accuracy as a colour or a shade, sparklines, one-line cells, indented
text, lines cut to a width. Plain text stays meaningful without colour: the
heatmap's cells are shade characters, the sparklines are block characters."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable

from rich.console import ConsoleOptions
from rich.padding import Padding
from rich.text import Text

from adapters.names import KNOWLEDGE

SPARKS = "▁▂▃▄▅▆▇█"
SHADES = "░▒▓█"
EMPTY_CELL = "·"


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


def fit(text: Text | str, width: int) -> Text:
    """One line of at most ``width`` columns, cut with an ellipsis."""
    t = text if isinstance(text, Text) else Text(text)
    t = t.copy()
    t.no_wrap = True
    t.truncate(max(width, 1), overflow="ellipsis")
    return t


def room_of(options: ConsoleOptions, default: int | None = None) -> int | None:
    """The lines a renderable is given (None: no height, show everything)."""
    return options.height if options.height is not None else default


def day_time(t: float) -> str:
    """A time as day of the month and hour (`seal history`)."""
    return dt.datetime.fromtimestamp(t).strftime("%d %H:%M")


def file_size(n: int) -> str:
    """A number of bytes in B, KB, MB or GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def to_json(obj) -> str:
    """A view's data as JSON (`--json`)."""
    return json.dumps(obj, indent=1, default=str)

"""`seal tui`: a live dashboard of a seal home, refreshed from the store.

The dashboard only reads (agent/ui/panels builds every panel from a snapshot). It
fills the terminal it is given: at 80x24 the overview shows the daemon's status, the
newest adapter versions and the sparklines; with more room it shows every panel at
once (lineage, passages, forgetting heatmap, trends, log). Keys are read from the
terminal with the standard library (termios/tty in cbreak mode, ``select``), so no
extra dependency is needed; the terminal's mode and the main screen are restored on
every way out (q, Ctrl-C, SIGTERM, an exception).

Keys: 1-6 or Tab / Shift-Tab switch panels; ↑/↓ (or k/j) select an adapter version
(lineage, overview) or a passage (passages); Enter shows its details (an adapter's
lineage, training data, rewards, evaluations, files; a passage's candidates); ↑/↓
PgUp/PgDn scroll the details; Esc (or Backspace, ←) goes back; r reloads now; q quits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

from rich.console import Console, ConsoleOptions, RenderResult
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.segment import Segment
from rich.text import Text

from adapters.names import KNOWLEDGE
from store import Store

from ..home import Home
from .fmt import duration
from .panels import PANELS, panel
from .panels.lineage import LineagePanel
from .snapshot import Snapshot, take_snapshot
from .views import adapter_details, adapter_view, candidates_view

log = logging.getLogger(__name__)

KEYS = {
    "\x1b[A": "up", "\x1bOA": "up", "\x1b[B": "down", "\x1bOB": "down",
    "\x1b[C": "right", "\x1bOC": "right", "\x1b[D": "left", "\x1bOD": "left",
    "\x1b[5~": "pgup", "\x1b[6~": "pgdn", "\x1b[H": "home", "\x1b[F": "end", "\x1b[1~": "home", "\x1b[4~": "end",
    "\x1b[Z": "shift-tab", "\t": "tab", "\r": "enter", "\n": "enter", "\x7f": "backspace", "\x08": "backspace",
    "\x1b": "esc",
}


def parse_keys(data: str) -> list[str]:
    """Split what the terminal sent into key names (escape sequences, or characters)."""
    out, i = [], 0
    while i < len(data):
        for n in (4, 3, 2, 1):  # longest escape sequence first
            if data[i : i + n] in KEYS and (n > 1 or data[i] != "\x1b" or i + 1 == len(data) or data[i + 1] == "\x1b"):
                out.append(KEYS[data[i : i + n]])
                i += n
                break
        else:
            if data[i] == "\x1b":  # an unknown escape sequence: skip it whole
                j = i + 2
                while j < len(data) and not data[j].isalpha() and data[j] != "~":
                    j += 1
                i = j + 1
            else:
                out.append(data[i])
                i += 1
    return out


class KeyReader:
    """Keys from a terminal in cbreak mode (no echo, no line buffering; Ctrl-C still
    interrupts). The saved mode is put back on exit, whatever the exit. Without a
    terminal on stdin, ``read`` only waits."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin
        try:
            self.fd = self.stream.fileno()
        except (AttributeError, ValueError, OSError):
            self.fd = -1
        self.tty = self.fd >= 0 and os.isatty(self.fd)
        self._saved = None

    def __enter__(self) -> KeyReader:
        if self.tty:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def read(self, timeout: float) -> list[str]:
        if not self.tty:
            time.sleep(max(timeout, 0.0))
            return []
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
        if not ready:
            return []
        data = os.read(self.fd, 256)
        if data.endswith(b"\x1b"):  # the rest of an escape sequence may be on its way
            more, _, _ = select.select([self.fd], [], [], 0.03)
            if more:
                data += os.read(self.fd, 256)
        return parse_keys(data.decode("utf-8", errors="ignore"))


class Scroll:
    """A long renderable shown ``offset`` lines down, as many lines as fit."""

    def __init__(self, renderable, offset: int, on_lines: Callable[[int], None] | None = None):
        self.renderable, self.offset, self.on_lines = renderable, offset, on_lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options.update(height=None), pad=False)
        if self.on_lines:
            self.on_lines(len(lines))
        room = options.height or len(lines)
        start = min(self.offset, max(len(lines) - room, 0))
        for line in lines[start : start + room]:
            yield from line
            yield Segment.line()


def read_snapshot(home: Home, store: Store | None, clock: Callable[[], float]) -> tuple[Snapshot | None, str | None]:
    """A snapshot, or None and why not (a busy or half-migrated store: the dashboard
    keeps showing the last one)."""
    try:
        return take_snapshot(home, store, now=clock()), None
    except Exception as e:
        log.debug("snapshot failed", exc_info=True)
        return None, f"{type(e).__name__}: {e}"


class SnapshotReader:
    """Reads snapshots off the drawing thread: every ``interval`` seconds, and at once
    when woken (``r``), in a thread of its own with its own store connection.
    ``latest()`` hands each new read over once (else None), without waiting, so a slow
    read of a big store never freezes the keys or the screen."""

    def __init__(self, home: Home, interval: float, clock: Callable[[], float] = time.time):
        self.home, self.interval, self.clock = home, interval, clock
        self._lock = threading.Lock()
        self._new: tuple[Snapshot | None, str | None] | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="seal-tui-reader", daemon=True)
        self.reads = 0

    def start(self) -> SnapshotReader:
        self._thread.start()
        return self

    def _run(self) -> None:
        store = None
        try:
            while not self._stop.is_set():
                if store is None and self.home.store_file.exists():
                    store = Store(self.home.store_file)
                read = read_snapshot(self.home, store, self.clock)
                with self._lock:
                    self._new = read
                    self.reads += 1
                self._wake.wait(self.interval)
                self._wake.clear()
        finally:
            if store is not None:
                store.close()

    def wake(self) -> None:
        self._wake.set()

    def latest(self) -> tuple[Snapshot | None, str | None] | None:
        with self._lock:
            out, self._new = self._new, None
        return out

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)


class Dashboard:
    """The dashboard's state (focused panel, selection, open details) and its layout
    for a given terminal size. ``reload`` reads a new snapshot; ``handle`` takes a key
    and returns False to quit; ``render(width, height)`` is the screen."""

    def __init__(self, home: Home, clock: Callable[[], float] = time.time):
        self.home = home
        self.clock = clock
        self.focus = "overview"
        self.selected_adapter: str | None = None
        self.selected_passage: int | None = None
        self.detail: tuple[str, object] | None = None  # ("adapter", id) | ("passage", id)
        self.detail_body = None
        self.scroll = 0
        self._detail_lines = 0
        self.snap: Snapshot | None = None
        self.error: str | None = None
        self._store: Store | None = None
        self.reader: SnapshotReader | None = None  # the live dashboard's: reads off the drawing thread

    # ------------------------------------------------------------------ data
    def store(self) -> Store | None:
        """The home's store, opened once it exists (a viewer never creates it)."""
        if self._store is None and self.home.store_file.exists():
            self._store = Store(self.home.store_file)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def reload(self) -> None:
        """Read a new snapshot now, on this thread (the live dashboard leaves it to its
        ``SnapshotReader``; ``r`` then only wakes the reader)."""
        if self.reader is not None:
            self.reader.wake()
            return
        self.show(*read_snapshot(self.home, self.store(), self.clock))

    def show(self, snap: Snapshot | None, error: str | None) -> None:
        """Take a snapshot read elsewhere (None: the read failed; keep the last one)."""
        self.error = error
        if snap is not None:
            self.snap = snap
        elif self.snap is None:
            self.snap = Snapshot(home=str(self.home.root), taken_at=self.clock())

    def open_detail(self, kind: str, key: object) -> None:
        store = self.store()
        if store is None:
            return
        if kind == "adapter":
            d = adapter_details(store, self.home.adapters, key)
            if d is None:
                return
            self.detail_body = adapter_view(d)
        else:
            p = store.passage(key)
            if p is None:
                return
            cycles = store.cycles(passage_id=key)
            self.detail_body = candidates_view(p, cycles, store.cycle_candidates(c["id"] for c in cycles))
        self.detail, self.scroll = (kind, key), 0

    # ------------------------------------------------------------------ keys
    def _move(self, ids: list, current, step: int, default):
        if not ids:
            return None
        if current not in ids:
            return default if default in ids else ids[-1]
        return ids[min(max(ids.index(current) + step, 0), len(ids) - 1)]

    def handle(self, key: str) -> bool:
        if key in ("q", "Q"):
            return False
        if key == "r":
            self.reload()
            return True
        if self.detail is not None:
            page = 10
            step = {"up": -1, "k": -1, "down": 1, "j": 1, "pgup": -page, "pgdn": page, " ": page,
                    "home": -10**9, "g": -10**9, "end": 10**9, "G": 10**9}.get(key)
            if step is not None:
                self.scroll = min(max(self.scroll + step, 0), max(self._detail_lines - 1, 0))
            elif key in ("esc", "backspace", "left", "h"):
                self.detail, self.detail_body = None, None
            elif (len(key) == 1 and key in "123456") or key in ("tab", "shift-tab"):
                self.detail, self.detail_body = None, None
                return self.handle(key)
            return True
        if len(key) == 1 and key in "123456":
            self.focus = PANELS[int(key) - 1]
        elif key in ("tab", "shift-tab", "right", "left"):
            step = 1 if key in ("tab", "right") else -1
            self.focus = PANELS[(PANELS.index(self.focus) + step) % len(PANELS)]
        elif key in ("up", "down", "k", "j", "pgup", "pgdn", "home", "end", "g", "G") and self.snap:
            step = {"up": -1, "k": -1, "down": 1, "j": 1, "pgup": -10, "pgdn": 10,
                    "home": -10**9, "g": -10**9, "end": 10**9, "G": 10**9}[key]
            if self.focus == "passages":
                ids = [p["id"] for p in self.snap.passages]
                self.selected_passage = self._move(ids, self.selected_passage, step, ids[0] if ids else None)
            else:
                if self.focus not in ("overview", "lineage"):
                    self.focus = "lineage"
                ids = [a["id"] for _, a in LineagePanel(self.snap).order()]
                self.selected_adapter = self._move(ids, self.selected_adapter, step,
                                                   self.snap.active.get(KNOWLEDGE))
        elif key == "enter" and self.snap:
            if self.focus == "passages":
                pid = self.selected_passage or (self.snap.passages[0]["id"] if self.snap.passages else None)
                if pid is not None:
                    self.open_detail("passage", pid)
            else:
                aid = self.selected_adapter or self.snap.active.get(KNOWLEDGE)
                if aid:
                    self.open_detail("adapter", aid)
        return True

    # ---------------------------------------------------------------- screen
    def header(self, width: int) -> Text:
        snap = self.snap
        t = Text(" seal ", style="bold white on blue")
        if snap is None:
            return t
        s = snap.status
        if s.get("running"):
            t.append(f" ● running, up {duration(s.get('uptime_s'))}", style="green")
        else:
            t.append(" ○ daemon not running", style="red")
        t.append(f" │ {snap.active.get(KNOWLEDGE) or 'base model'}")
        q = s.get("queue") or {}
        t.append(f" │ {q.get('pending', 0)} pending")
        if self.error:
            t.append(f" │ {self.error}", style="bold red")
        clock = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
        room = width - len(t.plain) - len(clock) - 1
        if room > 0:
            t.append(" " * room)
        t.append(clock + " ", style="dim")
        t.truncate(width, overflow="ellipsis")
        return t

    def footer(self, width: int) -> Text:
        t = Text()
        for i, name in enumerate(PANELS, 1):
            t.append(f"{i}", style="bold")
            t.append(f" {name} ", style="reverse bold" if name == self.focus and self.detail is None else "")
        t.append(" ")
        if width >= 100:
            hint = "↑↓ scroll  esc back  q quit" if self.detail else "↑↓ select  ⏎ details  q quit"
        else:
            hint = "↑↓ esc q" if self.detail else "↑↓⏎ q"
        t.append(hint, style="dim")
        t.truncate(width, overflow="ellipsis")
        return t

    def body(self, width: int, height: int) -> Layout:
        snap = self.snap or Snapshot(home=str(self.home.root), taken_at=self.clock())
        if self.detail is not None:
            kind, key = self.detail
            title = f"{key}" if kind == "adapter" else f"passage #{key}: candidates"
            return Layout(Panel(Scroll(self.detail_body, self.scroll, self._count), title=title, title_align="left",
                                border_style="cyan", padding=(0, 1)))
        sel = self.selected_passage if self.focus == "passages" else self.selected_adapter
        if self.focus != "overview":
            return Layout(panel(self.focus, snap, sel))
        lay = Layout()
        if width >= 120 and height >= 30:  # every panel
            left, right = Layout(name="left"), Layout(name="right")
            left.split_column(Layout(panel("status", snap), size=10), Layout(panel("lineage", snap, sel), ratio=3),
                              Layout(panel("passages", snap), ratio=2))
            right.split_column(Layout(panel("forgetting", snap), ratio=3), Layout(panel("trends", snap), size=6),
                               Layout(panel("log", snap), ratio=2))
            lay.split_row(left, right)
        elif width >= 120:  # wide but short
            left, right = Layout(), Layout()
            left.split_column(Layout(panel("status", snap), size=min(10, max(height // 2, 4))),
                              Layout(panel("lineage", snap, sel)))
            right.split_column(Layout(panel("forgetting", snap)), Layout(panel("trends", snap), size=6))
            lay.split_row(left, right)
        else:  # 80x24 and the like: status, lineage, trends
            status = min(7, max(height // 3, 3))
            trends = 6 if height - status >= 12 else 0
            parts = [Layout(panel("status", snap), size=status), Layout(panel("lineage", snap, sel))]
            if trends:
                parts.append(Layout(panel("trends", snap), size=trends))
            if height >= 40:
                parts.insert(2, Layout(panel("passages", snap), ratio=1))
                parts.append(Layout(panel("forgetting", snap), ratio=1))
            lay.split_column(*parts)
        return lay

    def _count(self, n: int) -> None:
        self._detail_lines = n

    def render(self, width: int, height: int) -> Layout:
        root = Layout()
        root.split_column(Layout(self.header(width), size=1), Layout(self.body(width, max(height - 2, 1))),
                          Layout(self.footer(width), size=1))
        return root


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM raises SystemExit (so the terminal gets restored), as Ctrl-C raises
    KeyboardInterrupt."""
    def on_term(_signum, _frame):
        raise SystemExit(143)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(home: Home, *, interval: float = 2.0, console: Console | None = None, stdin=None) -> None:
    """The live dashboard until q (or Ctrl-C). The store is re-read every ``interval``
    seconds and at once on r, by a ``SnapshotReader`` thread; the screen is redrawn on
    every new snapshot, key and resize."""
    console = console or Console()
    dash = Dashboard(home)
    dash.reload()  # the first screen has data; later reads are the reader's
    dash.reader = SnapshotReader(home, interval).start()
    muted = logging.root.manager.disable
    logging.disable(logging.WARNING)  # a log line would draw over the screen
    try:
        with _sigterm_exits(), KeyReader(stdin) as keys, Live(
            console=console, screen=True, auto_refresh=False, redirect_stdout=False, redirect_stderr=False
        ) as live:
            size = None
            dirty = True
            while True:
                fresh = dash.reader.latest()
                if fresh is not None:
                    dash.show(*fresh)
                    dirty = True
                if console.size != size:
                    size, dirty = console.size, True
                if dirty:
                    live.update(dash.render(size.width, size.height), refresh=True)
                    dirty = False
                for key in keys.read(0.1):
                    if not dash.handle(key):
                        return
                    dirty = True
    except KeyboardInterrupt:
        return
    finally:
        logging.disable(muted)
        dash.reader.stop()
        dash.close()

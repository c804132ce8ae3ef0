"""The panels and static views (agent/ui), rendered with capture consoles at 80
and 160 columns on a home without a store, an empty store, a store with one adapter
and a store with hundreds of versions (built with Store methods: no model). Asserts
on content: the right adapters, numbers and colours."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from agent.bench.views import sample_log, sample_store
from agent.home import Home
from agent.tracking import forgetting_summary
from agent.ui.dashboard import Dashboard, parse_keys
from agent.ui.fmt import SHADES, acc_color, shade, sparkline
from agent.ui.panels import PANELS, panel
from agent.ui.panels.lineage import LineagePanel, lineage_rows
from agent.ui.snapshot import take_snapshot
from store import Store
from tests.helpers import one_adapter

SIZES = [(80, 24), (160, 48)]
ALL_PANELS = ("status", "lineage", "passages", "forgetting", "trends", "log")


def ansi(hex_colour: str) -> str:
    """The truecolor escape of a foreground colour, as rich writes it."""
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"38;2;{r};{g};{b}"


def screen(dash: Dashboard, width: int, height: int, color: bool = False) -> tuple[list[str], str]:
    """The dashboard drawn on a width x height screen: its lines, and the raw output."""
    c = Console(width=width, height=height, record=True, file=io.StringIO(),
                color_system="truecolor" if color else None, force_terminal=color)
    c.print(dash.render(width, height))
    raw = c.file.getvalue()
    return c.export_text().splitlines(), raw


def draw(renderable, width: int, height: int | None = None, color: bool = False) -> tuple[str, str]:
    """A renderable in a width x height region (height None: unbounded): text, raw."""
    c = Console(width=width, record=True, file=io.StringIO(), color_system="truecolor" if color else None,
                force_terminal=color)
    opts = c.options.update_dimensions(width, height) if height else c.options.update_width(width)
    lines = c.render_lines(renderable, opts, pad=False)
    c.print(*[_join(line) for line in lines], sep="\n", soft_wrap=True)
    return c.export_text(), c.file.getvalue()


def _join(segments):
    from rich.text import Text

    t = Text()
    for s in segments:
        t.append(s.text, style=s.style)
    return t


def dashboard(home: Home, store: Store | None) -> Dashboard:
    d = Dashboard(home)
    d._store = store
    d.reload()
    return d


# ------------------------------------------------------------------ the stores
@pytest.fixture
def empty_home(tmp_path) -> Home:
    return Home(tmp_path / "home")


@pytest.fixture
def one(home):
    home = Home(home).ensure()
    store = Store(home.store_file)
    one_adapter(store)
    yield home, store
    store.close()


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """300 knowledge versions: wake commits, a sleep every 8 commits, a rollback every
    50 versions (a rolled-back branch each time), and a long daemon log."""
    home = Home(tmp_path_factory.mktemp("many") / "home").ensure()
    store = Store(home.store_file)
    store.db.execute("PRAGMA synchronous = OFF")  # a test fixture: no need to survive power loss
    counts = sample_store(store, 300, rollback_every=50)
    sample_log(home.logs / "daemon.log", 3000)
    yield home, store, counts
    store.close()


# ------------------------------------------------------------------ primitives
def test_colours_shades_and_sparklines():
    assert acc_color(0.0) == "#d73027" and acc_color(0.5) == "#fee08b" and acc_color(1.0) == "#1a9850"
    assert acc_color(None) == "grey50"
    assert [shade(a) for a in (0.0, 0.3, 0.6, 1.0)] == list(SHADES) and shade(None) == "·"
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([1.0, None, 1.0], 10) == "▅▅"  # flat: the middle block; None skipped
    long = sparkline(list(range(1000)), 20)
    assert len(long) == 20 and long[0] == "▁" and long[-1] == "█"  # the whole history, bucketed
    assert sparkline([], 10) == ""


def test_lineage_rows_put_rolled_back_branches_under_their_fork():
    def a(v, parent, status="committed", kind="wake"):
        return {"id": f"knowledge-{v:04d}", "version": v, "parent_id": parent and f"knowledge-{parent:04d}",
                "status": status, "kind": kind, "name": "knowledge"}

    rows = [a(1, None), a(2, 1), a(3, 2, "rolled_back"), a(4, 3, "rolled_back"), a(5, 2), a(6, 5, kind="sleep")]
    got = [(d, r["version"]) for d, r in lineage_rows(rows, "knowledge-0006")]
    assert got == [(0, 1), (0, 2), (1, 3), (1, 4), (0, 5), (0, 6)]
    chain = [a(1, None)] + [a(v, v - 1) for v in range(2, 3001)]
    got = lineage_rows(chain, "knowledge-3000")
    assert len(got) == 3000 and {d for d, _ in got} == {0}  # a long chain stays flat (and no recursion)


def test_parse_keys():
    assert parse_keys("\x1b[A\x1b[Bq") == ["up", "down", "q"]
    assert parse_keys("2\t\x1b[Z\r\x1b") == ["2", "tab", "shift-tab", "enter", "esc"]
    assert parse_keys("\x1b[5~j\x1b[99;5Xk") == ["pgup", "j", "k"]  # an unknown sequence is skipped whole


# ------------------------------------------------------------------ empty homes
@pytest.mark.parametrize("width,height", SIZES)
def test_every_panel_on_a_home_without_a_store(empty_home, width, height):
    snap = take_snapshot(empty_home, None)
    assert not snap.has_store and not empty_home.store_file.exists()
    dash = dashboard(empty_home, None)
    texts = {}
    for focus in PANELS:
        dash.focus = focus
        lines, _ = screen(dash, width, height)
        assert len(lines) == height and max(len(line) for line in lines) <= width
        texts[focus] = "\n".join(lines)
    assert "not running" in texts["overview"] and "none (base model)" in texts["overview"]
    assert "no adapter versions yet" in texts["lineage"]
    assert "no passages yet" in texts["passages"]
    assert "nothing learned yet" in texts["forgetting"]
    assert "(no data)" in texts["trends"]
    assert "no daemon log yet" in texts["log"]
    assert not empty_home.store_file.exists()  # looking created nothing


@pytest.mark.parametrize("width,height", SIZES)
def test_every_panel_on_an_empty_store(tmp_path, width, height):
    home = Home(tmp_path / "home").ensure()
    with Store(home.store_file) as store:
        dash = dashboard(home, store)
        for focus in PANELS:
            dash.focus = focus
            lines, _ = screen(dash, width, height)
            assert len(lines) == height and max(len(line) for line in lines) <= width
        dash.focus = "overview"
        text = "\n".join(screen(dash, width, height)[0])
        assert "no adapter versions yet" in text and "0 pending" in text


# ------------------------------------------------------------------ one adapter
@pytest.mark.parametrize("width", [80, 160])
def test_one_adapter_every_panel(one, width):
    home, store = one
    snap = take_snapshot(home, store)
    status, _ = draw(panel("status", snap), width)
    assert "active knowledge-0001 (wake, #1 Isle of Varn)" in status
    assert "0 pending, 0 learning, 1 done, 0 failed" in status

    lineage, raw = draw(panel("lineage", snap), width, color=True)
    line = next(ln for ln in lineage.splitlines() if "v1" in ln)
    assert "●" in line and "#1 Isle of Varn" in line and "implications" in line and "+0.420" in line
    assert "p1.00" in line and "active" in line
    assert ansi(acc_color(1.0)) in raw  # the probe accuracy at commit, coloured

    passages, raw = draw(panel("passages", snap), width, color=True)
    row = next(ln for ln in passages.splitlines() if "Isle of Varn" in ln)
    assert "committed" in row and "+0.05" in row and "+0.42★" in row and "-0.13" in row and "implications" in row
    assert "\x1b[1;4;32m" in raw or "1;4;32" in raw  # the chosen reward: green, bold, underlined

    forgetting, raw = draw(panel("forgetting", snap), width, color=True)
    # one passage: room for its numbers, coloured by accuracy
    assert re.search(r"ver\s+#1", forgetting) and re.search(r"base\s+0\.00", forgetting)
    assert re.search(r"v1 w\*\s+1\.00", forgetting), forgetting
    assert ansi(acc_color(1.0)) in raw and ansi(acc_color(0.0)) in raw
    assert "avg acc 1.00 (at learning 1.00)  retention 1.00" in forgetting
    assert "drift KL 0.0123, reading 0.75" in forgetting and "memorised 0.00 exact, 0.25 of tokens" in forgetting

    trends, _ = draw(panel("trends", snap), width)
    assert "+0.420 (1/1 kept)" in trends and "retention" in trends and "0.0123" in trends


def test_one_adapter_details_and_candidates_in_the_dashboard(one):
    home, store = one
    dash = dashboard(home, store)
    assert dash.handle("2") and dash.focus == "lineage"
    dash.handle("down")
    assert dash.selected_adapter == "knowledge-0001"  # the active one first
    lines, raw = screen(dash, 80, 24, color=True)
    assert "\x1b[7m" in raw or ";7m" in raw  # the selected row is drawn reversed
    dash.handle("enter")
    text = "\n".join(screen(dash, 80, 24)[0])
    assert "knowledge-0001  wake version 1 of knowledge, active" in text
    assert "sha256   " + "a" * 64 in text and "missing" in text  # no files in this store: said so
    dash.handle("esc")
    assert dash.detail is None
    dash.handle("3")
    dash.handle("enter")  # the first passage's candidates
    text = "\n".join(screen(dash, 80, 24)[0])
    assert "passage #1: candidates" in text and "★ chosen" in text and "Kelmora is the capital" in text
    assert dash.handle("q") is False


# ------------------------------------------------------------------ hundreds
def test_hundreds_of_versions_at_80x24(many):
    home, store, counts = many
    assert counts["versions"] == 300
    dash = dashboard(home, store)
    assert len(dash.snap.lineage) == 200  # the snapshot's window: the newest 200 versions
    assert [a["version"] for a in dash.snap.lineage] == list(range(101, 301))
    newest = max(a["version"] for a in dash.snap.lineage)
    active = dash.snap.active["knowledge"]
    for focus in PANELS:
        dash.focus = focus
        lines, _ = screen(dash, 80, 24)
        assert len(lines) == 24 and max(len(ln) for ln in lines) <= 80, focus
        text = "\n".join(lines)
        if focus in ("overview", "lineage"):
            assert f"v{newest} " in text and "earlier" in text
            assert any(f"v{int(active.rsplit('-', 1)[1])} " in ln and "active" in ln for ln in lines)
        if focus == "lineage":
            assert "✗" in text and "rolled back" in text and "◆" in text  # rollbacks and sleeps marked
        if focus == "forgetting":
            assert "earlier versions" in text and "of " in text and "passages)" in text
            assert re.search(r"v\d+ w\*", text) and "█" in text  # many passages: shades, not numbers
        if focus == "log":
            assert text.count("agent.wake") == 24 - 4  # the last lines that fit (borders, header, footer)
    # the selection walks back through the versions and the window follows it
    dash.focus = "lineage"
    for _ in range(40):
        dash.handle("up")
    lines, _ = screen(dash, 80, 24)
    sel = dash.selected_adapter
    assert sel is not None and any(f"v{int(sel.rsplit('-', 1)[1])} " in ln for ln in lines)


def test_hundreds_of_versions_at_160x48_show_every_panel(many):
    home, store, _ = many
    dash = dashboard(home, store)
    lines, raw = screen(dash, 160, 48, color=True)
    text = "\n".join(lines)
    assert len(lines) == 48 and max(len(ln) for ln in lines) <= 160
    for title in ("daemon", "adapter lineage", "recent passages", "forgetting matrix", "over time", "daemon log"):
        assert f"─ {title} ─" in text, title
    assert ansi(acc_color(1.0)) in raw and ansi(acc_color(0.5)) in raw  # the heatmap's colours
    # more room shows more versions than 80x24 does
    small = "\n".join(screen(dash, 80, 24)[0])
    assert len(re.findall(r" v\d+ ", text)) > len(re.findall(r" v\d+ ", small))


def test_lineage_panel_unbounded_shows_every_version(many):
    home, store, _ = many
    snap = take_snapshot(home, store, versions=1000)
    text, _ = draw(LineagePanel(snap), 120)
    assert len(text.strip().splitlines()) == 300
    assert text.count("rolled back") == sum(1 for a in snap.lineage if a["status"] == "rolled_back") > 0


# ------------------------------------------------------------------ the CLI views
def test_static_views_through_the_cli(one, seal):
    home, store = one
    r = seal("history")
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and lines[1].startswith("knowledge-0001 *") and max(map(len, lines)) <= 80
    r = seal("history", "--tree")
    assert r.exit_code == 0 and "● v1" in r.stdout

    r = seal("show", "v1")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "knowledge-0001  wake version 1 of knowledge, active" in out
    assert "training data: passage #1 Isle of Varn" in out and "Kelmora is the capital of the Isle of Varn." in out
    assert "self-edit [1] implications (reward +0.420" in out
    assert "sha256   " + "a" * 64 in out and "is missing" in out
    assert max(map(len, out.splitlines())) <= 80
    d = json.loads(seal("show", "knowledge-0001", "--json").stdout)
    assert d["adapter"]["sha256"] == "a" * 64 and d["chosen"]["policy"] == "implications"
    assert [c["reward_logprob"] for c in d["candidates"]] == [0.05, 0.42, -0.13]
    assert d["memorisation"]["token_match"] == 0.25 and d["drift"]["kl"] == 0.0123
    assert [e["accuracy"] for e in d["evaluations"]] == [1.0]

    r = seal("passages")
    assert r.exit_code == 0 and re.search(r"^\s*1\s+Isle of Varn\s+committed\s+2\s+3\s+\+0\.420\s+implications\s+knowledge-0001$",
                                          r.stdout, re.M), r.stdout
    assert json.loads(seal("passages", "--json").stdout)[0]["chosen_policy"] == "implications"

    r = seal("candidates", "1")
    assert r.exit_code == 0 and "★ chosen" in r.stdout and "Varn lies in a sea." in r.stdout
    assert "(the passage alone)" in r.stdout and "committed -> knowledge-0001" in r.stdout
    c = json.loads(seal("candidates", "1", "--json").stdout)
    assert [x["chosen"] for x in c["candidates"]] == [0, 1, 0]

    r = seal("tui")  # not a terminal: every panel once, as plain text
    assert r.exit_code == 0
    for title in ("daemon", "adapter lineage", "recent passages", "forgetting matrix", "over time", "daemon log"):
        assert title in r.stdout
    assert "\x1b[" not in r.stdout


def test_views_refuse_what_is_not_there(one, seal, tmp_path):
    home, store = one
    before = store.counts()
    for args, msg in ((("show", "knowledge-0042"), "no adapter 'knowledge-0042'"),
                      (("show", "v7"), "no adapter 'v7'"),
                      (("candidates", "9"), "no passage 9"),
                      (("rollback", "nope"), "no adapter 'nope'")):
        r = seal(*args)
        assert r.exit_code == 1 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert store.counts() == before


def test_read_only_views_create_no_store(seal, home):
    for args in (("history",), ("passages",), ("tui",), ("forgetting",), ("history", "--json")):
        r = seal(*args)
        assert r.exit_code == 0, r.output
    r = seal("show", "v1")
    assert r.exit_code == 1 and "nothing learned yet" in r.output
    assert not (Path(home) / "store.db").exists()


def test_step_progress_moves_its_bar_from_step_events(monkeypatch):
    from agent import commands
    from agent.events import Event

    term = Console(file=io.StringIO(), force_terminal=True, width=100)
    monkeypatch.setattr(commands, "err", term)
    with commands._StepProgress("sleeping") as progress:
        progress(Event("measure", "start", "sleep (replay): measuring 3 learned passage(s) before"))
        task = progress.bar.tasks[0]
        assert task.total is None and task.description.startswith("sleep (replay): measuring")
        progress(Event("consolidate", "advance", "consolidating", done=4, total=30, loss=0.812))
        assert (task.completed, task.total, task.description) == (4, 30, "consolidating")
        progress(Event("consolidate", "advance", "consolidating", done=30, total=30, loss=0.5))
        progress(Event("consolidate", "end"))  # no message: the bar stays as it is
        progress(Event("measure", "start", "measuring after"))
        assert (task.completed, task.total, task.description) == (30, 30, "measuring after")
        progress(Event("sft", "advance", "editor SFT", done=2, total=10))  # another phase of steps: a fresh bar
        assert (task.completed, task.total, task.description) == (2, 10, "editor SFT")


def test_one_screen_of_a_given_size_and_its_svg(one, seal, tmp_path):
    svg = tmp_path / "tui.svg"
    r = seal("tui", "--size", "80x24", "--svg", str(svg))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 24 and max(map(len, lines)) <= 80
    assert "knowledge-0001" in lines[0] and "─ adapter lineage ─" in r.stdout and "1 overview" in lines[-1]
    assert svg.read_text().startswith("<svg") and "knowledge-0001" in svg.read_text()
    r = seal("tui", "--size", "100x30", "--panel", "forgetting")
    assert r.exit_code == 0 and "─ forgetting matrix ─" in r.stdout and len(r.stdout.splitlines()) == 30
    r = seal("tui", "--size", "80by24")
    assert r.exit_code == 1 and "expected WIDTHxHEIGHT" in r.output


def test_status_panel_of_a_running_daemon(one):
    home, store = one
    snap = take_snapshot(home, store)
    snap.status.update({"running": True, "pid": 4242, "uptime_s": 3725.0, "model": "SmolLM2-135M-Instruct (default)",
                        "activity": "learning passage 7", "heartbeat_age_s": 4.0,
                        "next_sleep": {"due": False, "at": 1.7e9 + 3600, "reason": "after 4 commits"}})
    text, raw = draw(panel("status", snap), 80, color=True)
    assert "● running  pid 4242  up 1h 2m" in text and "SmolLM2-135M-Instruct (default)" in text
    assert "doing  learning passage 7 (heartbeat 4s ago)" in text and "(after 4 commits)" in text
    dash = Dashboard(home)
    dash.snap = snap
    assert "● running, up 1h 2m" in screen(dash, 80, 24)[0][0]


def test_the_snapshot_is_a_window_whatever_the_store_holds(many):
    """Redrawn every 2 s, the dashboard reads a window (issue 13: at 10,000 passages the
    whole-history snapshot took 243 s): the first rows of the passage overview are
    those of the unbounded query, the forgetting matrix is the same window with its
    figures over it, and the trends cover the last versions and cycles."""
    home, store, _ = many
    full = store.passage_overview(limit=-1)
    for n in (1, 10, 40):
        assert store.passage_overview(limit=n) == full[:n]
    snap = take_snapshot(home, store, versions=30)
    assert len(snap.lineage) == 30 and snap.lineage[-1]["version"] == 300
    assert snap.forgetting["window"]["overall"] is False and snap.forgetting["window"]["of_passages"] > 50
    whole = forgetting_summary(store)
    assert snap.forgetting["per_passage"] == whole["per_passage"]
    assert [r["id"] for r in snap.rewards] == [r["id"] for r in store.reward_series()][-30:]
    assert [d["id"] for d in snap.drift] == [d["id"] for d in store.drift()][-30:]
    assert len(snap.memorisation) <= 31 and snap.memorisation[-1] == store.memorisation_rates()[-1]


def test_history_pages_newest_first(many, tmp_path):
    from click.testing import CliRunner

    from agent.cli import main

    home, store, _ = many

    def seal(*args):
        return CliRunner().invoke(main, ["--home", str(home.root), *args], catch_exceptions=False)

    r = seal("history", "--limit", "3")
    assert r.exit_code == 0, r.output
    assert re.findall(r"^knowledge-(\d+)", r.stdout, re.M) == ["0300", "0299", "0298"]
    assert "3 of 300 versions shown (--offset 3 for the next" in r.stdout
    r = seal("history", "--limit", "2", "--offset", "3")
    assert re.findall(r"^knowledge-(\d+)", r.stdout, re.M) == ["0297", "0296"]
    assert [x["id"] for x in json.loads(seal("history", "--json", "--limit", "0").stdout)][-1] == "knowledge-0001"
    assert len(json.loads(seal("history", "--json").stdout)) == 50
    assert "no versions past 400" in seal("history", "--offset", "400").stdout


def test_the_live_dashboard_reads_off_the_drawing_thread(many, monkeypatch):
    """A slow read (a big store, a busy disk) never blocks a key or a redraw: the
    SnapshotReader reads in its own thread, hands each read over once, and r wakes it."""
    import threading
    import time

    import agent.ui.dashboard as dashboard_module
    from agent.ui.dashboard import SnapshotReader

    home, store, _ = many
    gate = threading.Event()
    real = dashboard_module.take_snapshot

    def slow(*args, **kwargs):
        gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(dashboard_module, "take_snapshot", slow)
    dash = Dashboard(home)
    dash.reader = reader = SnapshotReader(home, interval=60).start()
    try:
        t0 = time.perf_counter()
        assert reader.latest() is None  # reading: nothing yet, and no wait
        assert dash.handle("2") and dash.render(80, 24) is not None  # keys and the screen go on
        assert time.perf_counter() - t0 < 1.0
        gate.set()
        for _ in range(100):
            fresh = reader.latest()
            if fresh is not None:
                break
            time.sleep(0.05)
        assert fresh is not None and fresh[1] is None and fresh[0].lineage
        assert reader.latest() is None  # handed over once
        dash.show(*fresh)
        assert dash.snap is fresh[0]
        dash.handle("r")  # wakes the reader long before its 60 s interval
        for _ in range(100):
            if reader.reads >= 2:
                break
            time.sleep(0.05)
        assert reader.reads == 2
    finally:
        reader.stop()
    assert not reader._thread.is_alive()

"""The commands that look at a home: history, show, forgetting, passages, candidates, tui.

They only read (a home with no store gets no store). The views they print are
``agent.ui.views``, ``agent.ui.panels`` and ``agent.ui.dashboard``, imported inside the commands so that listing
them (`seal --help`) stays fast; `agent.cli` registers them.
"""

from __future__ import annotations

import json

import click
from rich.console import Console

from adapters.names import KNOWLEDGE, SAVED

from ..cli import (
    App,
    SealCommand,
    adapter_row,
    fail,
    out,
    pass_app,
    print_table,
    print_view,
    store_or_none,
)


class JobState(click.Choice):
    """A choice of the store's job states, read when first needed: the store imports
    sqlite-utils (and, through it, pandas), which `seal --help` should not wait for."""

    def __init__(self) -> None:
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        from store.db import JOB_STATES

        return JOB_STATES


@click.command(cls=SealCommand)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--name", type=click.Choice(list(SAVED)), default=KNOWLEDGE, show_default=True,
              help="which adapter's versions")
@click.option("--tree", is_flag=True, help="the lineage as a tree (wake commits, sleeps, rolled-back branches)")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="versions shown, newest first (0: all; with --tree: of each adapter)")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
              help="skip this many newest versions first (the next page)")
@pass_app
def history(app: App, as_json: bool, name: str, tree: bool, limit: int, offset: int) -> None:
    """List adapter versions, newest first (* active, x rolled back, - pruned), a page
    at a time: --limit N (0: all) and --offset K."""
    from ..api.client import daemon_view
    from .panels import panel
    from .snapshot import take_snapshot
    from .views import history_table

    served = None if tree else daemon_view(app.home, "/adapters", name=name, limit=limit or 10_000, offset=offset)
    store = None if served is not None else store_or_none(app)
    rows = served["versions"] if served is not None else store.adapter_history(name, limit or -1, offset) if store else []
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no adapters yet" + (" (seal learn)" if store else "") if not offset else f"no versions past {offset}")
        return
    if tree:
        print_view(panel("lineage", take_snapshot(app.home, store, versions=limit or 1 << 62)))
        return
    print_table(history_table(rows))
    total = served["total"] if served is not None else store.count_adapters(name)
    if offset + len(rows) < total:
        click.echo(f"{offset + len(rows)} of {total} versions shown (--offset {offset + len(rows)} for the next, "
                   "--limit 0 for all)")


@click.command(cls=SealCommand)
@click.option("--json", "as_json", is_flag=True, help="print JSON (matrix, per-passage and overall summary)")
@click.option("--versions", type=click.IntRange(min=0), default=50, show_default=True,
              help="matrix rows: the newest versions shown (0: none; the overall figures cover all)")
@click.option("--passages", type=click.IntRange(min=0), default=50, show_default=True,
              help="matrix columns and per-passage rows: the passages learned last")
@pass_app
def forgetting(app: App, as_json: bool, versions: int, passages: int) -> None:
    """The forgetting matrix (probe accuracy of each learned passage under each
    adapter version) and what it says: at-learning, best, current, forgetting."""
    from ..api.client import daemon_view
    from ..tracking import forgetting_summary

    if not app.home.store_file.exists():
        click.echo("{}" if as_json else "nothing learned yet")
        return
    s = daemon_view(app.home, "/forgetting", versions=versions, passages=passages) or \
        forgetting_summary(app.store, versions, passages)
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    if not s["passages"]:
        click.echo("nothing learned yet (seal learn)")
        return
    from .views import forgetting_text, forgetting_view

    if out.is_terminal:  # the heatmap, coloured by probe accuracy
        print_view(forgetting_view(s))
        return
    for line in forgetting_text(s):
        click.echo(line)


# --------------------------------------------------------------- inspecting, acting
@click.command(cls=SealCommand)
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.2),
              help="seconds between reads of the store")
@click.option("--once", is_flag=True, help="print every panel once and exit (what a pipe gets)")
@click.option("--size", metavar="WxH", help="with --once: one dashboard screen of this size (e.g. 80x24) instead")
@click.option("--panel", "focus", type=click.Choice(["overview", "lineage", "passages", "forgetting", "trends", "log"]),
              default="overview", show_default=True, help="with --size: the panel on that screen")
@click.option("--svg", "svg_path", type=click.Path(dir_okay=False), help="with --size: also save the screen as SVG")
@pass_app
def tui(app: App, interval: float, once: bool, size: str | None, focus: str, svg_path: str | None) -> None:
    """Live dashboard: daemon status, adapter lineage, recent passages and their
    candidates, the forgetting heatmap, reward/retention/memorisation over time, the
    daemon's log. Keys: 1-6/Tab panels, arrows select, Enter details, Esc back, q quit.
    It only reads; when stdout is not a terminal it prints once, as plain text."""
    from .panels import static_dashboard
    from .snapshot import take_snapshot

    if size:
        import io

        from .dashboard import Dashboard

        try:
            width, height = (int(x) for x in size.lower().split("x"))
            if width < 20 or height < 5:
                raise ValueError
        except ValueError:
            fail(f"--size {size!r}: expected WIDTHxHEIGHT, at least 20x5 (e.g. 80x24)")
        dash = Dashboard(app.home)
        dash.reload()
        dash.focus = focus
        screen = Console(width=width, height=height, record=True, file=io.StringIO(),
                         color_system="truecolor" if out.is_terminal or svg_path else None, force_terminal=True)
        screen.print(dash.render(width, height))
        dash.close()
        if svg_path:
            screen.save_svg(svg_path, title=f"seal tui ({width}x{height})", clear=False)
        click.echo("\n".join(line.rstrip() for line in screen.export_text().splitlines()))
        return
    if once or not out.is_terminal:
        print_view(static_dashboard(take_snapshot(app.home, store_or_none(app))))
        return
    from .dashboard import run as run_tui

    run_tui(app.home, interval=interval)


@click.command(cls=SealCommand)
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--lines", "text_lines", type=click.IntRange(min=1), help="cut the passage and self-edit texts to N lines")
@pass_app
def show(app: App, adapter: str, as_json: bool, text_lines: int | None) -> None:
    """One adapter version: lineage, training data (passage and chosen self-edit, or
    the sleep's mix), candidates' rewards, evaluations, sha256 and files (checked).
    ADAPTER: an id (knowledge-0003), a version (3 or v3; e2 for the editor) or 'active'."""
    from .fmt import to_json
    from .views import adapter_details, adapter_view

    row = adapter_row(app, adapter)
    d = adapter_details(app.store, app.home.adapters, row["id"])
    if as_json:
        click.echo(to_json(d))
        return
    print_view(adapter_view(d, text_lines))


@click.command(cls=SealCommand)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--limit", default=50, show_default=True, help="the newest N passages (0 = all)")
@click.option("--state", type=JobState(), help="only passages whose job is in this state")
@pass_app
def passages(app: App, as_json: bool, limit: int, state: str | None) -> None:
    """Ingested passages: questions, job state, and their latest wake cycle (candidates
    tried, best reward, chosen policy, the version it committed)."""
    from .views import passages_table

    store = store_or_none(app)
    rows = store.passage_overview(limit=-1, order="id", state=state) if store else []
    shown = rows[-limit:] if limit > 0 else rows
    if as_json:
        click.echo(json.dumps(shown, indent=1))
        return
    if not shown:
        click.echo("no passages" + (f" in state {state}" if state else " yet (seal ingest FILE)"))
        return
    print_table(passages_table(shown))
    if len(shown) < len(rows):
        click.echo(f"... {len(rows) - len(shown)} older (--limit 0 lists all)")


@click.command(cls=SealCommand)
@click.argument("passage", type=int)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@pass_app
def candidates(app: App, passage: int, as_json: bool) -> None:
    """Every self-edit tried for PASSAGE (an id, see seal passages), in every cycle:
    rewards (answer log-likelihood, accuracy and F1 gains), training loss, which won,
    and the texts."""
    from .fmt import to_json
    from .views import candidates_view

    store = store_or_none(app)
    p = store.passage(passage) if store else None
    if p is None:
        fail(f"no passage {passage} (seal passages lists them)")
    cycles = store.cycles(passage_id=passage)
    cands = store.cycle_candidates(c["id"] for c in cycles)
    if as_json:
        click.echo(to_json({"passage": p, "cycles": cycles[::-1], "candidates": cands}))
        return
    print_view(candidates_view(p, cycles, cands))

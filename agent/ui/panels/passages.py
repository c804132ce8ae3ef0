"""The passages panel: recent passages, their state and their candidates' rewards."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from ..fmt import fit, reward_style, room_of
from ..snapshot import Snapshot


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
        return fit(t, room) if t else Text("-", style="dim")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = self.snap.passages
        if not rows:
            yield Text("no passages yet (seal ingest FILE)", style="dim")
            return
        room = room_of(options)
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

"""The log panel: the tail of the daemon's log."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from ..fmt import fit, room_of
from ..snapshot import LOG_NAME, Snapshot


class LogPanel:
    """The tail of the daemon's log, as many lines as fit."""

    def __init__(self, snap: Snapshot):
        self.snap = snap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = self.snap.log_tail
        if not lines:
            yield Text(f"no daemon log yet ({Path(self.snap.home) / 'logs' / LOG_NAME})", style="dim")
            return
        room = room_of(options)
        if room is not None:
            lines = lines[-room:]
        for ln in lines:
            style = "red" if " ERROR " in ln or " CRITICAL " in ln else "yellow" if " WARNING " in ln else ""
            yield fit(Text(ln, style=style), options.max_width)

"""The dashboard's panels, by name, each built from a snapshot.

Each panel reads the room it is given (``options.height`` and ``max_width``, set by a
``Layout`` region or a ``Panel``) and fills it: the newest versions, the latest log
lines, as many heatmap rows and columns as fit. Rendered without a height (a static
view, a pipe) a panel shows everything.
"""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel

from ..snapshot import Snapshot
from .forgetting import ForgettingPanel
from .lineage import LineagePanel
from .log import LogPanel
from .passages import PassagesPanel
from .status import StatusPanel
from .trends import TrendsPanel

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

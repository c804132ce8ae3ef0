"""The lineage panel: every adapter version as a tree (`seal history --tree`, and the
versions the dashboard selects)."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from adapters.names import EDITOR, KNOWLEDGE

from ..fmt import acc_color, fit, num, reward_style, room_of, short_id
from ..snapshot import Snapshot


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
        t = fit(t, width)
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
        room = room_of(options)
        if room is not None and len(lines) > room:
            # keep the selection in view; else show the newest knowledge versions
            anchor = ids.index(self.selected) if self.selected in ids else n_know - 1
            start = min(max(anchor - room // 2, 0), len(lines) - room + 1)
            start = max(start, 1)
            lines = [Text(f"… {start} earlier", style="dim")] + lines[start : start + room - 1]
        yield from lines

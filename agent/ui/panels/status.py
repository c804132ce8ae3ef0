"""The daemon panel: running or not, the active adapter, the queue, the next sleep."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from adapters.names import EDITOR, KNOWLEDGE

from ..fmt import duration, fit, next_sleep_text, room_of, when
from ..snapshot import Snapshot


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
        room = room_of(options)
        if room is not None:
            lines = lines[:room]
        for line in lines:
            yield fit(line, options.max_width)

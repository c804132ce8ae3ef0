"""The trends panel: reward, retention, memorisation and drift over time, as sparklines."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from ..fmt import fit, num, room_of, sparkline
from ..snapshot import Snapshot


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
        width, room = options.max_width, room_of(options)
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
            yield fit(t, width)

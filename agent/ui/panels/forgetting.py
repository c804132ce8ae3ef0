"""The forgetting panel: the forgetting matrix as a heatmap, and its summary."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from ..fmt import EMPTY_CELL, acc_color, fit, num, reward_style, room_of, shade, short_id
from ..snapshot import Snapshot


class ForgettingPanel:
    """The forgetting matrix as a heatmap (rows: knowledge versions; columns: learned
    passages; cells: probe accuracy as colour and shade), and its summary: average
    accuracy, retention, backward transfer, drift and memorisation."""

    LABEL = 9

    def __init__(self, snap_or_summary: Snapshot | dict):
        self.s = snap_or_summary.forgetting if isinstance(snap_or_summary, Snapshot) else snap_or_summary

    def summary_lines(self) -> list[Text]:
        s = self.s
        out = [Text.assemble("avg acc ", (num(s.get("average_accuracy")), acc_color(s.get("average_accuracy"))),
                             f" (at learning {num(s.get('mean_at_learning'))})  retention ",
                             (num(s.get("retention")), "bold"), "  backward transfer ",
                             (num(s.get("backward_transfer"), "+.2f"),
                              reward_style(s.get("backward_transfer"))))]
        d, m = s.get("drift"), s.get("memorisation")
        extra = []
        if d:
            extra.append(f"drift KL {d['kl']:.4f}, reading {d['reading_acc']:.2f}")
        if m:
            extra.append(f"memorised {m['exact_rate']:.2f} exact, {m['token_match']:.2f} of tokens")
        if extra:
            out.append(Text("  ".join(extra), style="dim"))
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        s = self.s
        if not s or not s.get("passages"):
            yield Text("nothing learned yet: no forgetting matrix", style="dim")
            return
        width, room = options.max_width, room_of(options)
        summary = self.summary_lines()
        rows = [(i, a) for i, a in enumerate(s["adapters"])
                if any(c is not None for c in s["accuracy"][i]) or a["active"]]
        pids = [p["id"] for p in s["passages"]]
        # room for every passage as a number ("0.50"): numbers; else two-character shades
        cw = 5 if len(pids) * 5 <= width - self.LABEL else 2
        n_cols = max(1, min(len(pids), (width - self.LABEL) // cw))
        cols = list(range(len(pids) - n_cols, len(pids)))  # the newest passages
        n_rows = len(rows) if room is None else max(1, room - len(summary) - 1)
        shown = rows[-n_rows:] if len(rows) > n_rows else rows
        head = Text(f"{'ver':<{self.LABEL}}", style="dim")
        for k, j in enumerate(cols):
            if cw == 5:
                head.append(f"{'#' + str(pids[j]):>4} ")
            elif k % 5 == 0:  # a passage id every 5 columns
                label = f"#{pids[j]}"
                head.append(label[: min(len(label), 2 * (len(cols) - k))])
                head.append(" " * max(0, min(10, 2 * (len(cols) - k)) - len(label)))
        yield fit(head, width)
        if len(rows) > len(shown) and room is not None:
            shown = shown[1:]
            yield Text(f"… {len(rows) - len(shown)} earlier versions", style="dim")
        for i, a in shown:
            tag = "base" if a["id"] is None else f"{short_id(a['id'])} {a['kind'][0]}"
            tag += "*" if a["active"] else ("x" if a["status"] == "rolled_back" else "")
            line = Text(f"{tag:<{self.LABEL}}", style="bold" if a["active"] else "")
            for j in cols:
                acc = s["accuracy"][i][j]
                if cw == 5:
                    line.append(f"{'·' if acc is None else f'{acc:.2f}':>4} ", style=acc_color(acc))
                else:
                    line.append(shade(acc) * 2 if acc is not None else EMPTY_CELL + " ", style=acc_color(acc))
            yield fit(line, width)
        if len(cols) < len(pids):
            summary.insert(0, Text(f"(the newest {len(cols)} of {len(pids)} passages)", style="dim"))
        for t in summary:
            yield fit(t, width)

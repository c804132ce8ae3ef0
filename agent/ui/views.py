"""The static views: `seal history`, `seal passages`, `seal candidates`, `seal show`
(also the dashboard's details) and `seal forgetting`, rendered once at full length."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.console import Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from store import Store

from .fmt import acc_color, cell, day_time, file_size, indented, num, reward_style, short_id, when
from .panels.forgetting import ForgettingPanel


def history_table(rows: list[dict], width: int = 80) -> Table:
    """`seal history`: versions newest first (store.adapter_history rows); * active,
    x rolled back, - pruned; a sleep version's passage column names the sleep."""
    table = Table(box=None, pad_edge=False, collapse_padding=True)
    for col in ("id", "parent", "passage", "policy", "reward", "probe", "when"):
        # only the passage title may shrink: ids and numbers stay whole
        table.add_column(col, no_wrap=col != "passage", overflow="ellipsis" if col in ("passage", "policy") else "fold",
                         max_width=10 if col == "policy" else None)
    for r in rows:
        mark = " *" if r["active"] else " x" if r["status"] == "rolled_back" else " -" if r["status"] == "pruned" else ""
        probe = "-" if r["probe_acc"] is None else f"{r['probe_acc']:.2f}"
        reward = "-" if r["reward"] is None else f"{r['reward']:+.3f}"
        what = cell(f"{r['passage_id']} {r['title'] or ''}" if r["kind"] == "wake" else f"({r['kind']})")
        style = "bold green" if r["active"] else "dim" if r["status"] in ("rolled_back", "pruned") else None
        table.add_row(r["id"] + mark, r["parent_id"] or "base", what, r["policy"] or "-", reward, probe,
                      day_time(r["created_at"]), style=style)
    return table


def passages_table(rows: list[dict]) -> Table:
    """`seal passages`: every passage with its state and latest cycle."""
    table = Table(box=None, pad_edge=False, collapse_padding=True)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("passage", no_wrap=False, overflow="ellipsis")
    table.add_column("state", no_wrap=True)
    table.add_column("qs", justify="right", no_wrap=True)
    table.add_column("cands", justify="right", no_wrap=True)
    table.add_column("best", justify="right", no_wrap=True)
    table.add_column("chosen", no_wrap=True, overflow="ellipsis", max_width=12)
    table.add_column("adapter", no_wrap=True)
    for p in rows:
        state = p["outcome"] if p["state"] == "done" and p["outcome"] else p["state"] or "-"
        if p["state"] == "claimed":
            state = "learning"
        table.add_row(str(p["id"]), cell(p["title"] or "(untitled)"), state, str(p["n_questions"]),
                      str(p["n_candidates"]) if p["cycle_id"] else "-", num(p["best_reward"], "+.3f"),
                      p["chosen_policy"] or "-", p["adapter_id"] or "-")
    return table


def candidates_view(passage: dict, cycles: list[dict], candidates: list[dict], width: int = 80) -> Group:
    """`seal candidates PASSAGE`: for each wake cycle of the passage, oldest first, every
    self-edit tried, its rewards and which won, then the texts."""
    parts: list = [Text.assemble(("#" + str(passage["id"]), "bold"), " ", (passage["title"] or "(untitled)", "bold"))]
    if not cycles:
        parts.append(Text("not learned yet: no candidates", style="dim"))
        return Group(*parts)
    by_cycle: dict[int, list[dict]] = defaultdict(list)
    for c in candidates:
        by_cycle[c["cycle_id"]].append(c)
    for cy in sorted(cycles, key=lambda c: c["id"]):
        parts.append(Text(""))
        parts.append(Text.assemble(
            (f"cycle {cy['id']}", "bold"), f" {when(cy['finished_at'])}: ",
            (cy["outcome"] or "?", {"committed": "green", "rejected": "yellow", "failed": "red"}.get(cy["outcome"], "")),
            f" -> {cy['adapter_id']}" if cy.get("adapter_id") else "",
            f"; baseline acc {num(cy['baseline_acc'])}, answer log-lik {num(cy['baseline_logprob'], '.3f')}; "
            f"{cy['n_reward'] or 0} reward / {cy['n_probe'] or 0} probe questions"))
        if cy.get("reason"):
            parts.append(Text("  " + cy["reason"], style="dim"))
        table = Table(box=None, pad_edge=False, collapse_padding=True)
        for col, just in (("#", "right"), ("policy", "left"), ("ll gain", "right"), ("acc gain", "right"),
                          ("f1 gain", "right"), ("loss", "right"), ("tokens", "right"), ("won", "left"),
                          ("note", "left")):
            table.add_column(col, justify=just, no_wrap=col != "note", overflow="fold")
        for c in by_cycle.get(cy["id"], []):
            table.add_row(str(c["idx"]), c["policy"], Text(num(c["reward_logprob"], "+.3f"), style=reward_style(c["reward_logprob"])),
                          num(c["reward_acc"], "+.2f"), num(c["reward_f1"], "+.2f"), num(c["train_loss"], ".3f"),
                          str(c["n_tokens"] or 0), Text("★ chosen", style="bold green") if c["chosen"] else "",
                          cell(c["note"]), style="bold" if c["chosen"] else None)
        parts.append(table)
        for c in by_cycle.get(cy["id"], []):
            head = Text.assemble(("  [" + str(c["idx"]) + "] ", "bold"), c["policy"],
                                 (" ★" if c["chosen"] else "", "bold green"))
            parts.append(head)
            body = (c["text"] or "").strip() or ("(the passage alone)" if c["policy"] == "passage" else "(empty)")
            parts.append(indented(body, 6, style="" if c["text"] else "dim"))
    return Group(*parts)


def adapter_details(store: Store, adapters_root: Path, adapter_id: str) -> dict | None:
    """Everything `seal show` prints about one version (JSON-able): the row, lineage
    (ancestors, children), files and their sha256 check, the training data (the
    chosen self-edit and passage of a wake commit, the mix of a sleep, the pairs of
    an editor round), the candidates' rewards, evaluations, drift, memorisation and
    the events that name it. None if there is no such version."""
    from adapters.registry import AdapterRegistry

    with store.reading():
        row = store.adapter(adapter_id)
        if row is None:
            return None
        active = store.active_adapter_id(row["name"]) == adapter_id
        ancestors, x, seen = [], row.get("parent_id"), set()
        while x and x not in seen:
            seen.add(x)
            ancestors.append(x)
            parent = store.adapter(x)
            x = parent.get("parent_id") if parent else None
        passage = store.passage(row["passage_id"]) if row.get("passage_id") is not None else None
        cycle = store.cycle_of_adapter(adapter_id)
        candidates = store.cycle_candidates([cycle["id"]]) if cycle else []
        evals = store.evaluations(adapter_id=adapter_id)
        titles = {p: (store.passage(p) or {}).get("title") for p in {e["passage_id"] for e in evals}}
        latest: dict[tuple[int, str], dict] = {}
        for e in evals:
            latest[(e["passage_id"], e["kind"])] = {**e, "title": titles.get(e["passage_id"])}
        mem = {m["passage_id"]: m for m in store.memorisation(adapter_id)}
        detail = {
            "adapter": row,
            "active": active,
            "ancestors": ancestors[::-1],
            "children": store.adapter_children(adapter_id),
            "passage": {k: passage[k] for k in ("id", "title", "text", "n_tokens")} if passage else None,
            "cycle": cycle,
            "candidates": candidates,
            "chosen": next((c for c in candidates if c["chosen"]), None),
            "sleep": store.sleep_of_adapter(adapter_id),
            "editor_round": store.editor_round_of_adapter(adapter_id),
            "evaluations": sorted(latest.values(), key=lambda e: (e["kind"], e["passage_id"])),
            "drift": (store.drift(adapter_id) or [None])[-1],
            "memorisation": ({"exact_rate": sum(m["exact"] for m in mem.values()) / len(mem),
                              "token_match": sum(m["token_match"] for m in mem.values()) / len(mem),
                              "n": len(mem)} if mem else None),
            "events": store.adapter_events(adapter_id),
        }
    folder = Path(adapters_root) / row["path"]
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    detail["path"] = str(folder)
    detail["files"] = [{"name": f.name, "bytes": f.stat().st_size} for f in files if f.is_file()]
    detail["problem"] = AdapterRegistry(adapters_root, store).verify(adapter_id) if Path(adapters_root).is_dir() \
        else f"no adapters folder {adapters_root}"
    return detail


def _cut(text: str, text_lines: int | None, style: str = "") -> Padding:
    """A passage or self-edit text, indented: in full, or (``text_lines``) its first
    wrapped lines (at 76 columns) and how many more there are."""
    body = " ".join((text or "").split()) if text_lines is not None else (text or "").strip()
    if text_lines is not None:
        import textwrap

        lines = textwrap.wrap(body, 76)
        if len(lines) > text_lines:
            body = "\n".join(lines[:text_lines] + [f"… ({len(lines) - text_lines} more lines)"])
    return indented(body, 4, style)


def _adapter_head(d: dict) -> list:
    """The version's heading, then its lineage, policy, sha256 and files (checked)."""
    a = d["adapter"]
    status = "active" if d["active"] else a["status"].replace("_", " ")
    parts: list = [Text.assemble((a["id"], "bold"), f"  {a['kind']} version {a['version']} of {a['name']}, ",
                                 (status, "bold green" if d["active"] else "red" if a["status"] == "rolled_back" else "dim"),
                                 f", created {when(a['created_at'])}")]
    kv = Table.grid(padding=(0, 1))
    kv.add_column(style="dim", no_wrap=True)
    kv.add_column(overflow="fold")
    chain = ["base", *(short_id(x) for x in d["ancestors"]), a["id"]]
    if len(chain) > 9:  # the first steps and the last ones
        chain = [*chain[:3], f"… {len(chain) - 8} more", *chain[-5:]]
    lineage = " → ".join(chain)
    kv.add_row("lineage", lineage)
    kv.add_row("children", ", ".join(d["children"]) or "none")
    kv.add_row("policy", f"{a.get('policy') or '-'}  reward {num(a.get('reward'), '+.4f')}")
    kv.add_row("sha256", a["sha256"])
    kv.add_row("files", d["path"])
    for f in d["files"]:
        kv.add_row("", f"{f['name']}  {file_size(f['bytes'])}")
    kv.add_row("check", Text("files complete, sha256 matches", style="green") if not d["problem"]
               else Text(d["problem"], style="red"))
    parts.append(kv)
    return parts


def _training_data(d: dict, text_lines: int | None) -> list:
    """What the version was trained on: a wake commit's passage and chosen self-edit,
    a sleep's mix (with its before / after measures), an editor round's pairs."""
    parts: list = []
    if d["passage"]:
        p = d["passage"]
        parts.append(Text.assemble("\n", ("training data", "bold underline"),
                                   f": passage #{p['id']} {p['title'] or ''} ({p['n_tokens'] or '?'} tokens)"))
        parts.append(_cut(p["text"], text_lines, "dim"))
        ch = d["chosen"]
        if ch:
            parts.append(Text.assemble(f"  + self-edit [{ch['idx']}] ", (ch["policy"], "bold"),
                                       f" (reward {num(ch['reward_logprob'], '+.3f')} answer log-lik, "
                                       f"{num(ch['reward_acc'], '+.2f')} accuracy)"))
            body = (ch["text"] or "").strip()
            parts.append(_cut(body, text_lines) if body else indented("(the passage alone)", 4, "dim"))
    if d["sleep"]:
        s = d["sleep"]
        b, af = s.get("before") or {}, s.get("after") or {}
        parts.append(Text.assemble("\n", ("training data", "bold underline"),
                                   f": sleep {s['id']} ({s['policy']}, {s['trigger']}): {s['n_examples'] or 0} "
                                   f"replayed self-edit example(s) of the learned passages and {s['n_dreams'] or 0} "
                                   f"dream(s), trained from {s['parent_adapter'] or 'base'}, final loss "
                                   f"{num(s['train_loss'], '.3f')}"))
        parts.append(indented(s.get("reason") or "", 2, "dim"))
        t = Table(box=None, pad_edge=False, collapse_padding=True)
        for col in ("measure", "before", "after"):
            t.add_column(col, justify="left" if col == "measure" else "right", no_wrap=True)
        for label, key, fmt in (("retention (probe acc)", "retention", ".2f"), ("probe answer log-lik", "logprob", ".3f"),
                                ("drift KL from base", "drift_kl", ".4f"), ("reading acc", "reading_acc", ".2f"),
                                ("memorised (exact)", "memorisation", ".2f")):
            t.add_row(label, num(b.get(key), fmt), num(af.get(key), fmt))
        parts.append(t)
    if d["editor_round"]:
        r = d["editor_round"]
        parts.append(Text.assemble("\n", ("training data", "bold underline"),
                                   f": ReST-EM round {r['id']}: {r['n_pairs'] or 0} (passage -> self-edit) pair(s), "
                                   f"loss {num(r['train_loss'], '.3f')}; held-out reward "
                                   f"{num(r['reward_before'], '+.4f')} -> {num(r['reward_after'], '+.4f')} "
                                   f"on {r['n_heldout'] or 0} passage(s)"))
    return parts


def _adapter_measures(d: dict) -> list:
    """How the version did: its cycle's candidates and rewards, its evaluations, drift,
    memorisation, and the events that name it."""
    a = d["adapter"]
    parts: list = []
    if d["candidates"]:
        cy = d["cycle"]
        parts.append(Text.assemble("\n", ("rewards", "bold underline"),
                                   f": {len(d['candidates'])} candidate(s) of cycle {cy['id']}, baseline acc "
                                   f"{num(cy['baseline_acc'])}; {cy.get('reason') or ''}"))
        t = Table(box=None, pad_edge=False, collapse_padding=True)
        for col in ("#", "policy", "ll gain", "acc gain", "loss", "won"):
            t.add_column(col, justify="left" if col in ("policy", "won") else "right", no_wrap=True)
        for c in d["candidates"]:
            t.add_row(str(c["idx"]), c["policy"], Text(num(c["reward_logprob"], "+.3f"), style=reward_style(c["reward_logprob"])),
                      num(c["reward_acc"], "+.2f"), num(c["train_loss"], ".3f"),
                      Text("★", style="bold green") if c["chosen"] else "")
        parts.append(t)
    if d["evaluations"]:
        parts.append(Text.assemble("\n", ("evaluations", "bold underline"),
                                   f" under {a['id']} (latest of each passage)"))
        t = Table(box=None, pad_edge=False, collapse_padding=True)
        for col in ("passage", "kind", "accuracy", "answer log-lik", "n"):
            t.add_column(col, justify="left" if col in ("passage", "kind") else "right", no_wrap=col != "passage",
                         overflow="ellipsis", max_width=36 if col == "passage" else None)
        for e in d["evaluations"]:
            t.add_row(cell(f"#{e['passage_id']} {e['title'] or ''}"), e["kind"],
                      Text(num(e["accuracy"]), style=acc_color(e["accuracy"])), num(e["logprob"], ".3f"), str(e["n"]))
        parts.append(t)
    extra = []
    if d["drift"]:
        extra.append(f"drift KL {num(d['drift']['kl'], '.4f')} from the base, reading accuracy "
                     f"{num(d['drift']['reading_acc'])}")
    if d["memorisation"]:
        m = d["memorisation"]
        extra.append(f"memorised verbatim: {m['exact_rate']:.2f} exact, {m['token_match']:.2f} of tokens "
                     f"({m['n']} passages)")
    if extra:
        parts.append(Text("\n" + "\n".join(extra)))
    if d["events"]:
        parts.append(Text.assemble("\n", ("events", "bold underline")))
        for e in d["events"][:10]:
            parts.append(Text(f"  {when(e['at'])} {e['kind']:<9} {e['detail']}", style="dim", no_wrap=True,
                              overflow="ellipsis"))
    return parts


def adapter_view(d: dict, text_lines: int | None = None) -> Group:
    """`seal show ADAPTER` (and the TUI's details): the detail dict as text.
    ``text_lines`` cuts the self-edit and passage texts (None: in full)."""
    return Group(*_adapter_head(d), *_training_data(d, text_lines), *_adapter_measures(d))


def forgetting_text(s: dict, width: int = 80) -> list[str]:
    """Plain text within ``width`` columns: the matrix in blocks of passage columns,
    then one line per passage, then the overall numbers (`seal forgetting` in a pipe)."""
    lines = ["forgetting matrix: probe accuracy of each learned passage (columns)",
             "under each knowledge version (rows; w wake, s sleep, * active, x rolled back)"]
    label_w, cell_w = 12, 5
    per_block = max(1, (width - label_w) // cell_w)
    pids = [p["id"] for p in s["passages"]]
    for start in range(0, len(pids), per_block):
        cols = range(start, min(start + per_block, len(pids)))
        lines.append("")
        lines.append(f"{'version':<{label_w}}" + "".join(f"{'#' + str(pids[j]):>{cell_w}}" for j in cols))
        for i, a in enumerate(s["adapters"]):
            tag = "base" if a["id"] is None else f"v{a['version']} {a['kind'][0]}"
            tag += " *" if a["active"] else (" x" if a["status"] == "rolled_back" else "")
            cells = [s["accuracy"][i][j] for j in cols]
            if all(c is None for c in cells) and not a["active"]:
                continue  # a version that measured none of these passages
            lines.append(f"{tag:<{label_w}}" + "".join(f"{'.' if c is None else f'{c:.2f}':>{cell_w}}" for c in cells))
    lines.append("")
    lines.append(f"{'passage':<34}{'learned':>9}{'at-learn':>9}{'best':>7}{'current':>9}{'forgot':>8}")
    for p in s["per_passage"]:
        title = f"#{p['passage_id']} {p['title']}"
        title = title if len(title) <= 33 else title[:32] + "…"
        learned = "v" + p["learned_by"].rsplit("-", 1)[-1].lstrip("0")
        lines.append(f"{title:<34}{learned:>9}{num(p['at_learning']):>9}{num(p['best']):>7}"
                     f"{num(p['current']):>9}{num(p['forgetting'], '+.2f'):>8}")
    lines.append("")
    lines.append(f"average accuracy {num(s['average_accuracy'])} (at learning {num(s['mean_at_learning'])}), "
                 f"retention {num(s['retention'])}")
    lines.append(f"backward transfer {num(s['backward_transfer'], '+.2f')}")
    d, m = s.get("drift"), s.get("memorisation")
    if d:
        lines.append(f"{s['active'] or 'base'}: drift KL {d['kl']:.4f} from the base, "
                     f"reading accuracy {d['reading_acc']:.2f}")
    if m:
        lines.append(f"memorised verbatim: {m['exact_rate']:.2f} exact, {m['token_match']:.2f} of tokens "
                     f"({m['n']} passages)")
    return lines


def forgetting_view(s: dict) -> Group:
    """`seal forgetting` on a terminal: the heatmap, then the per-passage table."""
    table = Table(box=None, pad_edge=False, collapse_padding=True, title_justify="left")
    for col in ("passage", "learned", "at-learn", "best", "current", "forgot"):
        table.add_column(col, justify="left" if col == "passage" else "right", no_wrap=col != "passage",
                         overflow="ellipsis", max_width=34 if col == "passage" else None)
    for p in s["per_passage"]:
        table.add_row(cell(f"#{p['passage_id']} {p['title']}"), short_id(p["learned_by"]),
                      Text(num(p["at_learning"]), style=acc_color(p["at_learning"])),
                      Text(num(p["best"]), style=acc_color(p["best"])),
                      Text(num(p["current"]), style=acc_color(p["current"])),
                      Text(num(p["forgetting"], "+.2f"), style="red" if (p["forgetting"] or 0) > 0 else ""))
    return Group(Text("forgetting matrix: probe accuracy of each learned passage (columns) under each knowledge "
                      "version (rows; w wake, s sleep, * active, x rolled back); with many passages ░▒▓█ low "
                      "to high; · not measured", style="dim"),
                 ForgettingPanel(s), Text(""), table)

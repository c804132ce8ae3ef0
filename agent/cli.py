"""The `seal` command line: the only place in seal that prints.

Every user-facing failure (bad input, bad config, missing model) is one line on
stderr and a non-zero exit; tracebacks are for bugs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from store import Store
from store.db import JOB_STATES

from .app import Parts
from .config import Config, load_config
from .home import Home
from .ingest import STDIN, IngestError
from .ingest import prepare as prepare_documents
from .runtime import ModelError, Runtime
from .settings import ConfigError, config_items, parse_overrides, resolve_home, to_toml

log = logging.getLogger(__name__)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@dataclass
class App:
    """What every command needs: the configuration and this home's parts
    (``agent.app.Parts``: store, registry, runtime, learner, each built on first use)."""

    home: Home
    cfg: Config
    parts: Parts = field(init=False, repr=False)
    _runtime: Runtime | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.parts = Parts(self.home, self.cfg)

    @property
    def store(self) -> Store:
        return self.parts.store

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            with err.status(f"loading model {self.cfg.model.path or '(default: SmolLM2-135M-Instruct)'}..."):
                self._runtime = self.parts.runtime
        return self._runtime

    @property
    def learner(self):
        _ = self.runtime  # the model loads first, under its status line
        return self.parts.learner


pass_app = click.make_pass_decorator(App)


def print_table(table) -> None:
    """A rich table on a terminal; plain text without trailing padding in a pipe."""
    if out.is_terminal:
        out.print(table)
        return
    with out.capture() as cap:
        out.print(table)
    click.echo("\n".join(line.rstrip() for line in cap.get().splitlines()))


def fail(message: str) -> None:
    """Stop with a one-line error and exit status 1."""
    raise click.ClickException(message)


class SealGroup(click.Group):
    """Turns expected failures into one-line errors."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ConfigError, ModelError) as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=SealGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), help="seal home folder (default: $SEAL_HOME or ~/.seal)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a setting, e.g. --set wake.candidates=5")
@click.option("--model", "model_path", help="model: local HF folder or .gguf file (same as --set model.path=...)")
@click.option("-v", "--verbose", count=True, help="more log output (-vv for debug)")
@click.version_option(package_name="seal-daemon")
@click.pass_context
def main(ctx: click.Context, home: str | None, overrides: tuple[str, ...], model_path: str | None, verbose: int) -> None:
    """seal: a daemon that keeps a local language model learning from your documents."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations are not the user's business
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    for noisy in ("transformers", "peft", "trl", "accelerate", "apscheduler", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    root = resolve_home(home)
    try:
        extra = parse_overrides(list(overrides) + ([f"model.path={model_path}"] if model_path else []))
        cfg = load_config(root, extra)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    ctx.obj = App(Home(root), cfg)
    ctx.call_on_close(ctx.obj.parts.close)


# ---------------------------------------------------------------------------- config
@main.group()
def config() -> None:
    """Show or write the configuration."""


@config.command("show")
@click.option("--toml", "as_toml", is_flag=True, help="print as seal.toml text")
@pass_app
def config_show(app: App, as_toml: bool) -> None:
    """Print the resolved configuration (defaults < seal.toml < flags)."""
    if as_toml:
        click.echo(to_toml(app.cfg))
        return
    click.echo(f"# home: {app.home.root}")
    width = max(len(k) for k, _, _ in config_items(app.cfg))
    for key, value, help_ in config_items(app.cfg):
        click.echo(f"{key:<{width}} = {value!r}" + (f"   # {help_}" if help_ else ""))


@config.command("init")
@click.option("--force", is_flag=True, help="overwrite an existing seal.toml")
@pass_app
def config_init(app: App, force: bool) -> None:
    """Write <home>/seal.toml with every setting and its help."""
    path = app.home.config_file
    if path.exists() and not force:
        fail(f"{path} exists (use --force to overwrite)")
    app.home.ensure()
    path.write_text(to_toml(app.cfg), encoding="utf-8")
    click.echo(f"wrote {path}")


# ------------------------------------------------------------------------------- ask
@main.command()
@click.argument("question")
@click.option("--context", "context_file", type=click.Path(dir_okay=False), help="answer open-book from this text file")
@click.option("--title", help="topic of the question (given to the model, as in training)")
@click.option("--max-tokens", default=64, show_default=True, help="longest answer")
@pass_app
def ask(app: App, question: str, context_file: str | None, title: str | None, max_tokens: int) -> None:
    """Ask the current model a question."""
    from policies.questions import answer_prompt

    if not question.strip():
        fail("the question is empty")
    context = None
    if context_file:
        p = Path(context_file)
        if not p.is_file():
            fail(f"{context_file}: no such file")
        try:
            context = p.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            fail(f"{context_file}: not UTF-8 text")
        if not context:
            fail(f"{context_file}: the file is empty")
    rt = app.runtime
    if app.home.store_file.exists() and app.learner.registry.active("knowledge"):
        app.learner.model.set_adapter("knowledge")  # answer from what was learned
    prompt = rt.chat(answer_prompt(question.strip(), title=title, context=context))
    (gen,) = rt.generate([prompt], max_new_tokens=max_tokens)
    click.echo(gen.text)


# ---------------------------------------------------------------------------- ingest
@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="FILE...|DIR|-")
@click.option(
    "--questions",
    "questions_file",
    metavar="QA.jsonl",
    help='questions to learn against: JSONL lines of {"question", "answer"[, "title"]}; '
    "each goes to the passage that contains its answer",
)
@click.option("--title", help="title of the text documents (default: a leading '# Heading', else the file name)")
@pass_app
def ingest(app: App, paths: tuple[str, ...], questions_file: str | None, title: str | None) -> None:
    """Add documents and queue their passages for learning.

    Reads .txt and .md files, SEAL/SQuAD-style .json (a list of records, or one) and
    .jsonl (a record a line) with "title", "context" and "questions"
    [{"question", "answer"}], every such file in a folder (recursively), or text from
    stdin with -. Nothing is stored unless every input is good; once this returns,
    what it reports is durably stored. Content ingested before is reported as a
    duplicate and not queued again.
    """
    if STDIN in paths and sys.stdin is not None and sys.stdin.isatty():
        err.print("reading a document from stdin (end it with Ctrl-D)")
    try:
        docs = prepare_documents(
            paths,
            cfg=app.cfg.ingest,
            model=app.cfg.model,
            title=title,
            questions=questions_file,
            stdin=lambda: click.get_binary_stream("stdin"),
        )
    except IngestError as e:
        fail(str(e))
    outcomes = app.store.ingest(docs)
    new_docs = dup_docs = passages = questions = 0
    for doc, o in zip(docs, outcomes, strict=True):
        # Only --questions can make the user expect new questions on known text.
        offered = sum(len(p.questions) for p in doc.passages) if questions_file else 0
        dropped = f"; its {offered} question(s) were not added" if offered else ""
        if o.status == "duplicate" and o.duplicate_of:
            dup_docs += 1
            click.echo(f"duplicate: {o.source} (already ingested from {o.duplicate_of}{dropped})")
        elif o.status == "duplicate" or o.passages_added == 0:
            dup_docs += 1
            click.echo(f"duplicate: {o.source} (every passage was already ingested{dropped})")
        else:
            new_docs += 1
            passages += o.passages_added
            questions += o.questions_added
            known = f", {o.passages_duplicate} already known" if o.passages_duplicate else ""
            click.echo(
                f"new: {o.source} {doc.title!r}: {o.passages_added} passage(s){known}, {o.questions_added} question(s)"
            )
    if new_docs == 0:
        fail(f"nothing new to ingest: {dup_docs} duplicate document(s)")
    skipped = f"; {dup_docs} duplicate document(s) skipped" if dup_docs else ""
    click.echo(f"ingested {new_docs} document(s): {passages} passage(s), {questions} question(s) queued{skipped}")


# ----------------------------------------------------------------------------- queue
@main.command()
@click.option("--all", "show_all", is_flag=True, help="list done jobs too")
@click.option("--json", "as_json", is_flag=True, help="print JSON (counts and jobs)")
@click.option("--limit", default=50, show_default=True, help="list at most this many jobs (0 = all)")
@pass_app
def queue(app: App, show_all: bool, as_json: bool, limit: int) -> None:
    """What is waiting to be learned: jobs by state, and the counts of each state."""
    states = JOB_STATES if show_all else ("pending", "claimed", "failed")
    if app.home.store_file.exists():
        counts = app.store.queue_summary()
        jobs = app.store.jobs(states, limit=limit if limit > 0 else -1)
    else:  # nothing ingested yet: a read-only command does not create the store
        counts, jobs = dict.fromkeys(JOB_STATES, 0), []
    listed = sum(counts[s] for s in states)
    if as_json:
        click.echo(json.dumps({"counts": counts, "jobs": jobs, "truncated": len(jobs) < listed}, indent=2))
        return
    click.echo("queue: " + ", ".join(f"{counts[s]} {s}" for s in JOB_STATES))
    if not jobs:
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    # One line per job within the console's width (80 when piped): the numeric columns
    # take ~31 characters, the title and the note share the rest.
    with_notes = any(j["state"] in ("failed", "claimed") or j["error"] for j in jobs)
    room = max(out.width - 33, 24)
    title_w = min(40, room) if not with_notes else room // 2
    table.add_column("passage", no_wrap=True, overflow="ellipsis", max_width=title_w)
    if with_notes:
        table.add_column("error / worker", no_wrap=True, overflow="ellipsis", max_width=room - title_w)
    style = {"pending": "", "claimed": "yellow", "done": "green", "failed": "red"}
    for j in jobs:
        row = [str(j["id"]), Text(j["state"], style=style.get(j["state"], "")), str(j["attempts"])]
        row += [str(j["n_tokens"] or ""), Text(j["title"] or "(untitled)")]
        if with_notes:
            note = j["error"] or (f"by {j['claimed_by']}" if j["state"] == "claimed" and j["claimed_by"] else "")
            row.append(Text(" ".join(note.split())))
        table.add_row(*row)
    print_table(table)
    if len(jobs) < listed:
        click.echo(f"... {listed - len(jobs)} more (--limit 0 lists all)")


# ----------------------------------------------------------------------------- learn
def _refuse_beside_daemon(app: App, what: str) -> None:
    """One worker per home: a foreground learn or sleep beside a running daemon would
    race it for version numbers (and its recovery could remove the daemon's fresh files)."""
    from .daemon.process import running

    info = running(app.home)
    if info is not None:
        fail(f"a seal daemon runs on this home (pid {info.get('pid') or '?'}): it does the {what} work itself; "
             f"stop it first (seal daemon stop)")


@main.command()
@click.option("--max-passages", type=click.IntRange(min=1), help="stop after this many passages")
@pass_app
def learn(app: App, max_passages: int | None) -> None:
    """Process the queue in the foreground, then exit."""
    from .wake import learn as drain

    _refuse_beside_daemon(app, "learn")
    pending = app.store.queue_summary()["pending"]
    if pending == 0 and not app.store.claimed_jobs():
        click.echo("nothing to learn: the queue is empty (seal ingest FILE)")
        return
    total = min(pending, max_passages) if max_passages else pending
    learner = app.learner
    reports = []
    if err.is_terminal:
        import time

        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=err, transient=True, redirect_stdout=False, redirect_stderr=False) as bar:
            task = bar.add_task("learning", total=total, rate="")
            started, tokens = time.monotonic(), [0]

            def progress(msg: str) -> None:
                bar.update(task, description=msg[:50])

            def report(r) -> None:
                # tokens generated and trained on, as the cycle recorded them
                last = app.store.cycles(passage_id=r.passage_id, limit=1)
                with contextlib.suppress(ValueError, TypeError, IndexError):
                    tokens[0] += sum(json.loads(last[0]["tokens"] or "{}").values())
                rate = tokens[0] / max(time.monotonic() - started, 1e-9)
                bar.update(task, advance=1, rate=f"{rate:,.0f} tok/s" if tokens[0] else "")
                if out.is_terminal:  # the same screen: above the bar, not through it
                    bar.console.print(_report_line(r), markup=False, highlight=False, soft_wrap=True)
                else:
                    _print_report(r)

            reports = drain(learner, max_passages, progress, on_report=report)
    else:
        reports = drain(learner, max_passages, lambda msg: log.info(msg), on_report=_print_report)
    done = [r for r in reports if r.outcome == "committed"]
    click.echo(f"learned {len(done)} of {len(reports)} passage(s); active adapter: "
               f"{(learner.registry.active('knowledge') or {}).get('id', 'none (base model)')}")
    if any(r.outcome == "failed" for r in reports):
        sys.exit(1)


def _report_line(r) -> str:
    secs = sum(r.timings.values())
    probe = ""
    if r.probe_before is not None and r.probe_after is not None:
        probe = f" probe acc {r.probe_before.accuracy:.2f}->{r.probe_after.accuracy:.2f}"
    return f"{r.outcome:9} #{r.passage_id} {r.title[:30]!r} {r.adapter_id or ''}{probe} ({secs:.0f}s): {r.reason}"


def _print_report(r) -> None:
    click.echo(_report_line(r))


# --------------------------------------------------------------------------- history
def print_view(renderable) -> None:
    """A rich renderable on a terminal; plain text (80 columns, or $COLUMNS) without
    trailing padding in a pipe. Long text wraps at the width either way."""
    if out.is_terminal:
        out.print(renderable, soft_wrap=False)
        return
    with out.capture() as cap:
        out.print(renderable, soft_wrap=False)
    click.echo("\n".join(line.rstrip() for line in cap.get().splitlines()))


def _store_or_none(app: App) -> Store | None:
    """The store if the home has one: a read-only command creates nothing."""
    return app.store if app.home.store_file.exists() else None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--name", type=click.Choice(["knowledge", "editor"]), default="knowledge", show_default=True,
              help="which adapter's versions")
@click.option("--tree", is_flag=True, help="the lineage as a tree (wake commits, sleeps, rolled-back branches)")
@pass_app
def history(app: App, as_json: bool, name: str, tree: bool) -> None:
    """List adapter versions, newest first (* active, x rolled back, - pruned)."""
    from .views import history_table, panel, take_snapshot

    store = _store_or_none(app)
    rows = store.adapter_history(name) if store else []
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no adapters yet" + (" (seal learn)" if store else ""))
        return
    if tree:
        print_view(panel("lineage", take_snapshot(app.home, store)))
        return
    print_table(history_table(rows))


# ------------------------------------------------------------------ sleep, forgetting
@main.command()
@click.option("--policy", type=click.Choice(["replay", "dream", "merge"]), help="consolidation policy (default: sleep.policy)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@pass_app
def sleep(app: App, policy: str | None, as_json: bool) -> None:
    """Run one sleep phase now: consolidate, measure, keep or roll back."""
    import dataclasses

    _refuse_beside_daemon(app, "sleep")
    from .sleep import record_skip, sleep_phase

    cfg = dataclasses.replace(app.cfg.sleep, policy=policy) if policy else app.cfg.sleep
    if not app.home.store_file.exists():  # nothing ingested: a sleep does not create the store
        report = None
    elif not app.store.learned_passages():  # nothing to consolidate: no need to load the model
        report = record_skip(app.store, cfg, "manual", "no learned passage yet",
                             app.store.active_adapter_id("knowledge"))
    else:
        learner = app.learner
        learner.recover()  # leftovers of a killed commit go before a new one
        if err.is_terminal and not as_json:
            with _StepProgress("sleeping") as progress:
                report = sleep_phase(learner, cfg, getattr(app.cfg, "editor", None), "manual", progress=progress)
        else:
            report = sleep_phase(learner, cfg, getattr(app.cfg, "editor", None), "manual",
                                 progress=lambda msg: log.info(msg))
    if report is None:
        click.echo('{"outcome": "skipped", "reason": "no learned passage yet"}' if as_json
                   else "nothing to consolidate: no passage learned yet (seal ingest, seal learn)")
        return
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(report), indent=1, default=str))
    else:
        _print_sleep(report)
    if report.outcome in ("failed", "abandoned"):
        sys.exit(1)


class _StepProgress:
    """A progress bar fed by progress messages: a message with "step I/N" in it moves
    the bar (steps, elapsed, ETA), any other message names the current phase."""

    STEP = re.compile(r"step (\d+)/(\d+)")

    def __init__(self, description: str):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=err, transient=True)
        self.task = self.bar.add_task(description, total=None)

    def __call__(self, msg: str) -> None:
        m = self.STEP.search(msg)
        if m:
            done, total = int(m.group(1)), int(m.group(2))
            if self.bar.tasks[0].total != total:  # a new phase of steps: its own ETA
                self.bar.reset(self.task, total=total)
            self.bar.update(self.task, completed=done, description=msg[: m.start()].rstrip(" :,")[:40] or "training")
        else:
            self.bar.update(self.task, description=msg[:50])

    def __enter__(self) -> _StepProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _print_sleep(r) -> None:
    import textwrap

    def say(text: str) -> None:  # within 80 columns
        click.echo(textwrap.fill(text, width=80, initial_indent="  ", subsequent_indent="    "))

    head = f"sleep {r.sleep_id if r.sleep_id is not None else '-'} ({r.policy}): {r.outcome}"
    click.echo(head + (f" -> {r.adapter_id} (was {r.parent_id or 'base'})" if r.adapter_id else ""))
    say(r.reason)
    if r.before:
        after = r.after or {}
        click.echo(f"  {'measure':<26}{'before':>9}{'after':>9}")
        for label, key, fmt in (("retention (probe acc)", "retention", ".2f"),
                                ("probe answer log-lik", "logprob", ".3f"),
                                ("drift KL from base", "drift_kl", ".4f"),
                                ("reading acc (open book)", "reading_acc", ".2f"),
                                ("memorised (exact)", "memorisation", ".2f"),
                                ("memorised (tokens)", "token_match", ".2f")):
            click.echo(f"  {label:<26}{_num(r.before.get(key), fmt):>9}{_num(after.get(key), fmt):>9}")
        say(f"{r.before.get('n_passages', 0)} passage(s) measured; trained on {r.n_examples} replayed "
            f"example(s) and {r.n_dreams} dream(s)" + (f", final loss {r.train_loss:.3f}" if r.train_loss else ""))
    if r.timings:
        say("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
    if r.editor is not None:
        e = r.editor if isinstance(r.editor, dict) else getattr(r.editor, "__dict__", {"result": str(r.editor)})
        say(f"editor (ReST-EM): {e.get('outcome', '?')}" + (f": {e['reason']}" if e.get("reason") else ""))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON (matrix, per-passage and overall summary)")
@pass_app
def forgetting(app: App, as_json: bool) -> None:
    """The forgetting matrix (probe accuracy of each learned passage under each
    adapter version) and what it says: at-learning, best, current, forgetting."""
    from .tracking import forgetting_summary

    if not app.home.store_file.exists():
        click.echo("{}" if as_json else "nothing learned yet")
        return
    s = forgetting_summary(app.store)
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
@main.command()
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
    from .views import static_dashboard, take_snapshot

    if size:
        import io

        from .tui import Dashboard

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
        print_view(static_dashboard(take_snapshot(app.home, _store_or_none(app))))
        return
    from .tui import run as run_tui

    run_tui(app.home, interval=interval)


def _adapter_row(app: App, ref: str) -> dict:
    """An adapter version by id (knowledge-0003), by version (3, v3: knowledge; e2:
    editor) or 'active'; a one-line error if there is none."""
    store = _store_or_none(app)
    if store is None:
        fail(f"no adapter {ref!r}: nothing learned yet in {app.home.root}")
    ref = ref.strip()
    candidates = [ref]
    low = ref.lower()
    if low == "active":
        candidates = [store.active_adapter_id("knowledge") or ""]
    elif low.lstrip("v").isdigit():
        candidates.append(f"knowledge-{int(low.lstrip('v')):04d}")
    elif low.startswith("e") and low[1:].isdigit():
        candidates.append(f"editor-{int(low[1:]):04d}")
    for c in candidates:
        row = store.adapter(c) if c else None
        if row is not None:
            return row
    fail(f"no adapter {ref!r} (seal history lists them)")


@main.command()
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--lines", "text_lines", type=click.IntRange(min=1), help="cut the passage and self-edit texts to N lines")
@pass_app
def show(app: App, adapter: str, as_json: bool, text_lines: int | None) -> None:
    """One adapter version: lineage, training data (passage and chosen self-edit, or
    the sleep's mix), candidates' rewards, evaluations, sha256 and files (checked).
    ADAPTER: an id (knowledge-0003), a version (3 or v3; e2 for the editor) or 'active'."""
    from .views import adapter_details, adapter_view, to_json

    row = _adapter_row(app, adapter)
    d = adapter_details(app.store, app.home.adapters, row["id"])
    if as_json:
        click.echo(to_json(d))
        return
    print_view(adapter_view(d, text_lines))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--limit", default=50, show_default=True, help="the newest N passages (0 = all)")
@click.option("--state", type=click.Choice(JOB_STATES), help="only passages whose job is in this state")
@pass_app
def passages(app: App, as_json: bool, limit: int, state: str | None) -> None:
    """Ingested passages: questions, job state, and their latest wake cycle (candidates
    tried, best reward, chosen policy, the version it committed)."""
    from .views import passages_table

    store = _store_or_none(app)
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


@main.command()
@click.argument("passage", type=int)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@pass_app
def candidates(app: App, passage: int, as_json: bool) -> None:
    """Every self-edit tried for PASSAGE (an id, see seal passages), in every cycle:
    rewards (answer log-likelihood, accuracy and F1 gains), training loss, which won,
    and the texts."""
    from .views import candidates_view, to_json

    store = _store_or_none(app)
    p = store.passage(passage) if store else None
    if p is None:
        fail(f"no passage {passage} (seal passages lists them)")
    cycles = store.cycles(passage_id=passage)
    cands = store.cycle_candidates(c["id"] for c in cycles)
    if as_json:
        click.echo(to_json({"passage": p, "cycles": cycles[::-1], "candidates": cands}))
        return
    print_view(candidates_view(p, cycles, cands))


@main.command()
@click.argument("adapter")
@pass_app
def rollback(app: App, adapter: str) -> None:
    """Make ADAPTER the active version of its adapter (newer versions are marked rolled
    back; nothing is deleted; `seal rollback` to a newer one goes forward again).
    Recorded as an event. Refuses beside a running daemon."""
    row = _adapter_row(app, adapter)
    _refuse_beside_daemon(app, "learning")
    registry = app.parts.registry
    problem = registry.verify(row["id"])
    if problem:
        fail(f"cannot roll back: {problem}")
    if app.store.active_adapter_id(row["name"]) == row["id"]:
        click.echo(f"{row['id']} is already the active {row['name']} version")
        return
    detail = app.store.rollback(row["name"], row["id"])
    gone = ", ".join(detail["rolled_back"]) or "none"
    click.echo(f"active {row['name']} version: {row['id']} (was {detail['previous'] or 'the base model'}); "
               f"marked rolled back: {gone}")


@main.command()
@click.argument("adapter")
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False), help="folder to write (new or empty)")
@click.option("--merged", is_flag=True, help="a full HF model folder with the adapter merged into the base model")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="--merged: weight dtype (auto: the base model's)")
@pass_app
def export(app: App, adapter: str, dest: str, merged: bool, dtype: str) -> None:
    """Write ADAPTER as a standard PEFT adapter folder (PeftModel.from_pretrained(base,
    DIR) loads it), or with --merged as a full HF model folder. The base model is the
    configured one (model.path, or the default model)."""
    import datetime as dt

    from adapters.export import export_adapter, export_merged
    from adapters.lora import AdapterError

    from .runtime import resolve_model_dir

    row = _adapter_row(app, adapter)
    registry = app.parts.registry
    problem = registry.verify(row["id"])
    if problem:
        fail(f"cannot export: {problem}")
    base_dir, base_name = resolve_model_dir(app.cfg.model)
    provenance = {k: row.get(k) for k in ("id", "name", "version", "kind", "parent_id", "passage_id", "policy",
                                          "reward", "created_at")}
    provenance |= {"base_model": base_name, "exported_at": dt.datetime.now().isoformat(timespec="seconds"),
                   "seal_home": str(app.home.root)}
    src = registry.path(row["id"])
    try:
        if merged:
            with err.status(f"merging {row['id']} into {base_name}..."):
                export_merged(src, Path(dest), sha256=row["sha256"], base_model=base_dir, provenance=provenance,
                              dtype=dtype)
        else:
            export_adapter(src, Path(dest), sha256=row["sha256"], base_model=str(base_dir), provenance=provenance)
    except AdapterError as e:
        fail(str(e))
    what = f"a full model ({base_name} with {row['id']} merged in)" if merged else f"PEFT adapter {row['id']}"
    click.echo(f"exported {what} to {dest}")


@main.command()
@click.option("--keep", required=True, type=click.IntRange(min=0), help="wake versions to keep, newest first")
@click.option("--dry-run", is_flag=True, help="say what would be removed, remove nothing")
@click.option("--json", "as_json", is_flag=True, help="print JSON (removed, kept and why)")
@pass_app
def prune(app: App, keep: int, dry_run: bool, as_json: bool) -> None:
    """Remove the files of old wake versions: all but the KEEP newest, the active one
    and those referenced (the parent of a sleep checkpoint or editor version). Sleep
    checkpoints and editor versions are never removed; rows stay (marked pruned) and
    the removal is recorded as an event. Refuses beside a running daemon."""
    if _store_or_none(app) is None:
        click.echo('{"removed": [], "kept": {}}' if as_json else "nothing to prune: no adapters yet")
        return
    _refuse_beside_daemon(app, "learning")
    registry = app.parts.registry
    plan = registry.prune_plan(keep) if dry_run else registry.prune(keep)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": plan.remove, "kept": plan.kept, "bytes": plan.bytes},
                              indent=1))
        return
    verb = "would remove" if dry_run else "removed"
    if not plan.remove:
        click.echo(f"nothing to prune: {len(plan.kept)} wake version(s) kept")
        return
    ids = ", ".join(r["id"] for r in plan.remove)
    click.echo(f"{verb} {len(plan.remove)} version(s), {plan.bytes / 2**20:.1f} MiB: {ids}")
    for aid, why in plan.kept.items():
        click.echo(f"  kept {aid}: {why}")


# ---------------------------------------------------------------------------- daemon
@main.group()
def daemon() -> None:
    """Run seal as a background service: start, stop, status, run."""


@daemon.command("start")
@click.option("--wait", "wait_s", default=120.0, show_default=True, type=click.FloatRange(min=1),
              help="seconds to wait for it to load its model (it goes on loading after that)")
@pass_app
def daemon_start(app: App, wait_s: float) -> None:
    """Start the daemon in the background (logs to <home>/logs/daemon.log).

    It runs `seal daemon run` detached, with the same --home, --set and --model."""
    from .daemon.process import DaemonError, already_running, running, start_detached

    holder = running(app.home)
    if holder:
        fail(already_running(app.home, holder))
    root = click.get_current_context().find_root().params
    args = ["--home", str(app.home.root)]
    for pair in root.get("overrides") or ():
        args += ["--set", pair]
    if root.get("model_path"):
        args += ["--model", root["model_path"]]
    args += ["-v"] * (root.get("verbose") or 0)
    try:
        info = start_detached(app.home, args, wait_s)
    except DaemonError as e:
        fail(str(e))
    if info["ready"]:
        click.echo(f"seal daemon started: pid {info['pid']}, log {info.get('log')}")
    else:
        click.echo(f"seal daemon starting: pid {info['pid']}, still loading its model after {wait_s:g} s; "
                   f"log {info.get('log')}")


@daemon.command("stop")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0),
              help="seconds to wait for a warm stop before stopping cold (default: daemon.stop_timeout_s)")
@click.option("--now", is_flag=True, help="stop at once (cold): the current step is abandoned, its claim given back")
@pass_app
def daemon_stop(app: App, timeout_s: float | None, now: bool) -> None:
    """Stop the daemon: it finishes or safely abandons its current step (warm);
    after --timeout, or with --now, it stops at once (cold)."""
    from .daemon.process import DaemonError, stop_daemon

    try:
        pid, how = stop_daemon(app.home, app.cfg.daemon.stop_timeout_s if timeout_s is None else timeout_s, now=now)
    except DaemonError as e:
        fail(str(e))
    click.echo(f"seal daemon stopped ({how}): pid {pid}")


@daemon.command("status")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@pass_app
def daemon_status(app: App, as_json: bool) -> None:
    """Whether the daemon runs, and what it is doing: pid, uptime, model, active
    adapter, queue, last heartbeat, next sleep. Exits 3 when it does not run."""
    import datetime as dt

    from .daemon.process import daemon_status as read_status
    from .views import next_sleep_text

    s = read_status(app.home)
    if as_json:
        click.echo(json.dumps(s, indent=1))
    else:
        def ago(secs: float | None) -> str:
            return "-" if secs is None else _duration(secs) + " ago"

        def when(t: float | None) -> str:
            return "-" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")

        if s["running"]:
            click.echo(f"seal daemon: running, pid {s['pid']} on {s['host']}, up {_duration(s['uptime_s'] or 0)}")
        else:
            click.echo("seal daemon: not running")
        q = s["queue"]
        nxt = next_sleep_text(s["next_sleep"], when)
        rows = [("home", s["home"])]
        if s["running"]:
            rows.append(("model", s["model"] or "-"))
        rows += [
            ("active adapter", s["active_adapter"] or "none (base model)"),
            ("queue", ", ".join(f"{q[k]} {k}" for k in JOB_STATES) if q else "empty (nothing ingested)"),
            ("activity", s["activity"] or "-"),
            ("last heartbeat", ago(s["heartbeat_age_s"])),
            ("last sleep", when(s["last_sleep_at"])),
            ("next sleep", nxt if s["running"] else "-"),
            ("log", s["log"]),
        ]
        for k, v in rows:
            click.echo(f"  {k + ':':<16}{v}")
    if not s["running"]:
        sys.exit(3)


def _duration(secs: float) -> str:
    secs = int(max(secs, 0))
    d, rem = divmod(secs, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d {h}h" if d else f"{h}h {m}m" if h else f"{m}m {s}s" if m else f"{s}s"


@daemon.command("run")
@click.option("--burst", is_flag=True, help="drain the inbox and the queue, sleeping when due, then exit")
@click.option("--detached", is_flag=True, hidden=True, help="started by `seal daemon start`: log to the file only")
@pass_app
def daemon_run(app: App, burst: bool, detached: bool) -> None:
    """Run the daemon in the foreground (for systemd; see examples/seal.service).

    SIGTERM or Ctrl-C stops it warm (the current step finishes or is safely
    abandoned); a second one stops it at once."""
    from .app import build_daemon
    from .daemon.process import AlreadyRunning, DaemonLock, log_to_file, pid_info

    lock = DaemonLock(app.home)
    try:
        lock.acquire(pid_info(app.home, app.cfg.model.path))
    except AlreadyRunning as e:
        fail(str(e))
    with lock:
        log_to_file(app.home, detached=detached)
        d = build_daemon(app.home, app.cfg, handle_signals=True)
        if not burst:
            code = d.serve()
            if code:
                fail(f"the daemon stopped: {d.fatal}" if d.fatal else "the daemon stopped with an error")
            return
        r = d.run_burst()
    by = {k: sum(1 for i in r.inbox if i.outcome == k) for k in ("ingested", "duplicate", "failed")}
    committed = sum(1 for c in r.cycles if c.outcome == "committed")
    click.echo(f"inbox: {by['ingested']} ingested, {by['duplicate']} duplicate, {by['failed']} failed; "
               f"learned {committed} of {len(r.cycles)} passage(s); {len(r.sleeps)} sleep(s)"
               + ("; stopped early" if r.stopped else ""))
    if any(c.outcome == "failed" for c in r.cycles):
        sys.exit(1)


# ----------------------------------------------------------------------------- bench
@main.group()
def bench() -> None:
    """Reproducible benchmarks: print a table and write JSON."""


@bench.command("squad")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="SEAL/SQuAD-format JSON (default: ../shared/data/squad_dev.json)")
@click.option("--passages", default=20, show_default=True, type=click.IntRange(min=1), help="passages drawn with the seed")
@click.option("--seed", default=0, show_default=True, help="draws passages, splits questions, seeds sampling and training")
@click.option("--split", type=click.Choice(["eval", "tune", "all"]), default="eval", show_default=True,
              help="eval: passages never used for tuning; tune: the tuning split")
@click.option("--policies", "policy_names", default=",".join(("implications", "rewrite", "self_qa", "qa_chat")),
              show_default=True, help="self-edit policies to measure (one sample each)")
@click.option("--candidates", type=click.IntRange(min=1), help="N of best-of-N (default: wake.candidates)")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=0),
              help="ReST-EM rounds of the editor (rows restem-1..R); 0: none")
@click.option("--editor-passages", default=8, show_default=True, type=click.IntRange(min=1),
              help="tune-split passages the editor is trained on (never an evaluated one)")
@click.option("--editors", "editors_dir", type=click.Path(file_okay=False),
              help="editors from `seal bench editor` (default: <out>.editors, trained first if missing)")
@click.option("--resume", is_flag=True, help="continue the interrupted run saved at --out")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON result (default: bench-out/squad-<seed>-<n>.json)")
@pass_app
def bench_squad(app: App, data_path: str | None, passages: int, seed: int, split: str, policy_names: str,
                candidates: int | None, rounds: int, editor_passages: int, editors_dir: str | None, resume: bool,
                out_path: str | None) -> None:
    """SEAL's single-passage protocol: closed-book probe accuracy after each kind of update."""
    import json as jsonlib

    from policies import self_edit as self_edits

    from .bench.common import DEFAULT_DATA, draw, load_squad
    from .bench.squad import run_squad

    path = Path(data_path) if data_path else DEFAULT_DATA
    if not path.is_file():
        fail(f"{path}: no such file (use --data)")
    names = tuple(n.strip() for n in policy_names.split(",") if n.strip())
    unknown = [n for n in names if n not in self_edits.SELF_EDIT_POLICIES]
    if unknown:
        fail(f"unknown self-edit policy {unknown[0]!r} (known: {', '.join(self_edits.SELF_EDIT_POLICIES)})")
    target = Path(out_path) if out_path else Path("bench-out") / f"squad-{seed}-{passages}.json"
    previous = None
    if resume:
        try:
            previous = jsonlib.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            fail(f"--resume: cannot read {target} ({e})")
    try:
        data = load_squad(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path}: not a SEAL/SQuAD-format file ({e})")
    target.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        tmp = target.with_suffix(".tmp")
        tmp.write_text(jsonlib.dumps(result, indent=1), encoding="utf-8")
        tmp.replace(target)

    editors, editor_info = None, None
    if rounds:
        editors, editor_info = _editors(app, path, Path(editors_dir) if editors_dir else target.with_suffix(".editors"),
                                        editor_passages, seed, rounds, {d["title"] for d in draw(data, passages, seed, split)})
    with _progress(passages) as (say, tick):
        try:
            result = run_squad(app.runtime, app.cfg, data_path=path, passages=passages, seed=seed, split=split,
                               policies=names, candidates=candidates, editors=editors, editor_info=editor_info,
                               previous=previous, say=say, on_passage=tick, on_result=save)
        except ValueError as e:
            fail(str(e))
    save(result)
    _print_squad(result)
    click.echo(f"wrote {target}")


def _train_editors(app: App, path: Path, out_dir: Path, passages: int, seed: int, rounds: int,
                   names: tuple[str, ...] | None, exclude: set[str]) -> dict:
    """`bench_editor.train_editors` with a progress bar over passages x rounds."""
    from .bench.editor import train_editors

    with _progress(passages * rounds) as (say, tick):
        done = [0]

        def step(_i: int, _n: int) -> None:
            done[0] += 1
            tick(done[0], passages * rounds)

        try:
            return train_editors(app.runtime, app.cfg, data_path=path, passages=passages, seed=seed, rounds=rounds,
                                 out_dir=out_dir, names=names, exclude_titles=exclude, say=say, on_passage=step)
        except ValueError as e:
            fail(str(e))


def _editors(app: App, path: Path, out_dir: Path, passages: int, seed: int, rounds: int,
             exclude: set[str]) -> tuple[dict, dict]:
    """Train (or, when done before, read back) the ReST-EM editors of ``bench squad``."""
    from .bench.editor import RESULT, load_editors

    names = None
    saved = out_dir / RESULT
    if saved.is_file():  # trained before (e.g. by `seal bench editor`): its settings; missing rounds are re-run
        old = json.loads(saved.read_text(encoding="utf-8"))
        names, passages, seed = old["names"], len(old["passages"]), old["seed"]
    result = _train_editors(app, path, out_dir, passages, seed, rounds, names, exclude)
    _print_editor(result)
    info = {"dir": str(out_dir), "passages": result["passages"], "rounds": rounds, "names": result["names"],
            "pairs": [r["n_pairs"] for r in result["rounds"][:rounds]],
            "outcomes": [r["outcome"] for r in result["rounds"][:rounds]]}
    return load_editors(out_dir, rounds), info


@bench.command("editor")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="SEAL/SQuAD-format JSON (default: ../shared/data/squad_dev.json)")
@click.option("--passages", default=8, show_default=True, type=click.IntRange(min=1), help="tune-split passages trained on")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1), help="ReST-EM rounds")
@click.option("--seed", default=0, show_default=True, help="draws passages, seeds sampling and training")
@click.option("--policies", "policy_names", help="self-edits sampled per passage, by policy, comma-separated, "
              "repeats allowed (default: policies.self_edit x wake.candidates)")
@click.option("--exclude-eval", type=click.IntRange(min=0), default=20, show_default=True,
              help="leave out the titles a `bench squad --passages N` with this seed evaluates")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="directory for the editors and editor.json (resumed if it exists)")
@pass_app
def bench_editor(app: App, data_path: str | None, passages: int, rounds: int, seed: int, policy_names: str | None,
                 exclude_eval: int, out_dir: str) -> None:
    """ReST-EM on the editor (tune split), and the selection rules replayed on round 1's trials."""
    from policies import self_edit as self_edits

    from .bench.common import DEFAULT_DATA, draw, load_squad

    path = Path(data_path) if data_path else DEFAULT_DATA
    if not path.is_file():
        fail(f"{path}: no such file (use --data)")
    names = None
    if policy_names:
        names = tuple(n.strip() for n in policy_names.split(",") if n.strip())
        bad = [n for n in names if n not in self_edits.SELF_EDIT_POLICIES or self_edits.get(n).prompt("t", "x") is None]
        if bad or not names:
            fail(f"--policies: {bad[0] if bad else policy_names!r} is not a self-edit policy that writes text")
    exclude = {d["title"] for d in draw(load_squad(path), exclude_eval, seed, "eval")} if exclude_eval else set()
    result = _train_editors(app, path, Path(out_dir), passages, seed, rounds, names, exclude)
    _print_editor(result, study=True, policies=app.cfg.policies)
    click.echo(f"wrote {Path(out_dir) / 'editor.json'}")


def _print_editor(result: dict, study: bool = False, policies=None) -> None:
    from rich.table import Table

    from .bench.editor import selection_study, study_rules

    table = Table(title=f"ReST-EM on the editor, {len(result['passages'])} tune passages (seed {result['seed']})",
                  box=None, pad_edge=False, title_justify="left")
    for col in ("round", "pairs", "new", "SFT loss", "minutes", "outcome"):
        table.add_column(col, justify="left" if col == "outcome" else "right", no_wrap=col != "outcome")
    for r in result["rounds"]:
        table.add_row(str(r["round"]), str(r["n_pairs"]), str(r["new_pairs"]),
                      "-" if r["sft_loss"] is None else f"{r['sft_loss']:.3f}", f"{r['seconds'] / 60:.1f}", r["outcome"])
    print_table(table)
    if not study or not result["rounds"]:
        return
    rows = selection_study(result, policies.reward_fraction, study_rules(policies), seed=result["seed"], splits=20)
    table = Table(title="Selection replayed on round 1: probe accuracy on the tune passages, mean of 20 "
                        "reward/probe splits", box=None,
                  pad_edge=False, title_justify="left")
    table.add_column("rule", no_wrap=False)
    table.add_column("accuracy", justify="right", no_wrap=True)
    table.add_column("questions", justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r["rule"], f"{100 * r['accuracy']:.1f}%", str(r["questions"]))
    print_table(table)


@bench.command("show")
@click.argument("result_file", type=click.Path(dir_okay=False))
def bench_show(result_file: str) -> None:
    """Print the table of a saved benchmark result (JSON)."""
    import json as jsonlib

    try:
        result = jsonlib.loads(Path(result_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        fail(f"{result_file}: cannot read a benchmark result ({e})")
    kind = result.get("benchmark") if isinstance(result, dict) else None
    if kind == "squad":
        _print_squad(result)
    elif kind == "editor":
        from policies.config import PolicyConfig

        _print_editor(result, study=True, policies=PolicyConfig(**result["policies"]))
    elif kind == "continual":
        _print_continual(result)
    elif kind == "speed":
        _print_speed(result)
    else:
        fail(f"{result_file}: not a `seal bench squad` or `seal bench continual` result")


def _print_squad(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"SQuAD single-passage, {result['passages']} passages ({result['split']} split, seed {result['seed']}), "
                        f"closed-book, probe questions", box=None, pad_edge=False, title_justify="left")
    for col in ("condition", "acc %", "95% CI", "F1", "95% CI", "q", "tokens", "s/psg"):
        table.add_column(col, justify="left" if col == "condition" else "right", no_wrap=True)
    for r in result["rows"]:
        lo, hi = r["ci95"]
        f_lo, f_hi = r.get("f1_ci95", [math.nan, math.nan])
        table.add_row(r["condition"], f"{100 * r['accuracy']:.1f}", f"{100 * lo:.0f}-{100 * hi:.0f}",
                      f"{100 * r['f1']:.1f}", f"{100 * f_lo:.0f}-{100 * f_hi:.0f}", str(r["questions"]),
                      f"{r['tokens_per_passage']:.0f}", f"{r['seconds_per_passage']:.1f}")
    print_table(table)
    b = result.get("best_of_n_breakdown_median_s") or {}
    if b:
        click.echo("best-of-N per passage (median s): " + ", ".join(f"{k} {v:.1f}" for k, v in b.items())
                   + f"; total {sum(b.values()):.1f}")
    e = result.get("editors")
    if e:
        click.echo(f"editors: ReST-EM on {len(e['passages'])} tune passages, pairs per round {e['pairs']}")


@bench.command("continual")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="SEAL/SQuAD-format JSON (default: ../shared/data/squad_dev.json)")
@click.option("--passages", default=8, show_default=True, type=click.IntRange(min=2), help="passages learned in sequence")
@click.option("--sleep-every", default=4, show_default=True, type=click.IntRange(min=1), help="sleep after every N updates")
@click.option("--sequences", default=1, show_default=True, type=click.IntRange(min=1), help="sequences (seeds seed, seed+1, ...)")
@click.option("--seed", default=0, show_default=True, help="draws passages, seeds sampling and training")
@click.option("--split", type=click.Choice(["eval", "tune", "all"]), default="eval", show_default=True,
              help="eval: passages never used for tuning; tune: the tuning split")
@click.option("--conditions", default="no-sleep,sleep,sleep+dreams", show_default=True, help="conditions to run")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON result (default: bench-out/continual-<seed>-<n>.json)")
@pass_app
def bench_continual(app: App, data_path: str | None, passages: int, sleep_every: int, sequences: int, seed: int,
                    split: str, conditions: str, out_path: str | None) -> None:
    """Learn passages in sequence; the forgetting matrix with and without sleep and dreams."""
    from .bench.common import DEFAULT_DATA
    from .bench.continual import CONDITIONS, dumps, plot, run_continual

    path = Path(data_path) if data_path else DEFAULT_DATA
    if not path.is_file():
        fail(f"{path}: no such file (use --data)")
    conds = tuple(c.strip() for c in conditions.split(",") if c.strip())
    unknown = [c for c in conds if c not in CONDITIONS]
    if unknown or not conds:
        fail(f"unknown condition {unknown[0] if unknown else ''!r} (known: {', '.join(CONDITIONS)})")
    target = Path(out_path) if out_path else Path("bench-out") / f"continual-{seed}-{passages}.json"
    target.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        tmp = target.with_suffix(".tmp")
        tmp.write_text(dumps(result), encoding="utf-8")
        tmp.replace(target)

    shared = min(sleep_every, passages)
    steps = sequences * (shared + len(conds) * (passages - shared))
    with _progress(steps) as (say, tick):
        done = [0]

        def step() -> None:
            done[0] += 1
            tick(done[0], steps)

        result = run_continual(app.runtime, app.cfg, data_path=path, passages=passages, sleep_every=sleep_every,
                               seed=seed, sequences=sequences, split=split, conditions=conds, say=say,
                               on_step=step, on_result=save)
    save(result)
    _print_continual(result)
    png = plot(result, target.with_suffix(".png"))
    click.echo(f"wrote {target}" + (f" and {png}" if png else ""))


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.0f}"


def _spread(s: dict, key: str) -> str:
    """The standard deviation over sequences, when there are several."""
    if s["sequences"] < 2:
        return ""
    sd = s.get(key + "_sd", s[key + "_spread"] / 2)  # results written before the sd was recorded
    return f" ±{100 * sd:.0f}"


def _print_continual(result: dict) -> None:
    from rich.table import Table

    for r in [r for r in result["runs"] if r["sequence"] == 0]:
        ids = [str(p["id"]) for p in r["passages"]]
        table = Table(title=f"{r['condition']}: probe accuracy %; rows: after each update; columns: passages",
                      box=None, pad_edge=False, title_justify="left")
        table.add_column("after", no_wrap=True, max_width=24)
        for i in range(len(ids)):
            table.add_column(f"p{i + 1}", justify="right", no_wrap=True)
        table.add_column("mean", justify="right", no_wrap=True)
        for row in r["rows"]:
            label = f"sleep ({row['outcome']})" if row["kind"] == "sleep" else f"{row['step']} {row['title']}"
            cells = [_pct(row["scores"][p]["accuracy"]) if p in row["scores"] else "" for p in ids]
            mean = sum(v["accuracy"] for v in row["scores"].values()) / len(row["scores"])
            table.add_row(label[:24], *cells, _pct(mean))
        print_table(table)
        click.echo(f"memorisation at the end: {_pct(r['memorisation']['exact'])}% exact, "
                   f"{_pct(r['memorisation']['token_match'])}% of tokens ({r['memorisation']['n']} passages)\n")
    sd = " (mean ±sd over sequences)" if result["sequences"] > 1 else ""
    table = Table(title=f"continual, {result['passages']} passages x {result['sequences']} sequence(s), sleep every "
                        f"{result['sleep_every']} ({result['split']} split, seed {result['seed']}){sd}",
                  box=None, pad_edge=False, title_justify="left")
    for col in ("condition", "at learning", "final", "retained", "ll-gain ret.", "verbatim", "tokens"):
        table.add_column(col, justify="left" if col == "condition" else "right", no_wrap=True)
    for s in result["summary"]:
        table.add_row(s["condition"], _pct(s["at_learning"]) + "%" + _spread(s, "at_learning"),
                      _pct(s["final"]) + "%" + _spread(s, "final"), _pct(s["retention"]) + "%",
                      _pct(s["logprob_retention"]) + "%", _pct(s["memorisation_exact"]) + "%",
                      _pct(s["memorisation_token_match"]) + "%")
    print_table(table)


@bench.command("speed")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="SEAL/SQuAD-format JSON (default: ../shared/data/squad_dev.json)")
@click.option("--seed", default=0, show_default=True, help="draws the passage, seeds sampling and training")
@click.option("--split", type=click.Choice(["eval", "tune", "all"]), default="tune", show_default=True,
              help="the split the passage is drawn from")
@click.option("--candidates", type=int, help="self-edits N (default: wake.candidates)")
@click.option("--epochs", type=int, help="epochs of every trial, in both runs (default: lora.epochs)")
@click.option("--pad-to", "pad_to", default=2048, show_default=True, type=int,
              help="the reference pads every training example to this many tokens (SEAL: 2048)")
@click.option("--matmul-size", "matmul_n", default=2048, show_default=True, type=int,
              help="side of the square fp32 matmul that measures the machine's FLOP/s")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON result (default: bench-out/speed-<model>-<seed>.json)")
@pass_app
def bench_speed(app: App, data_path: str | None, seed: int, split: str, candidates: int | None, epochs: int | None,
                pad_to: int, matmul_n: int, out_path: str | None) -> None:
    """One wake cycle step by step (time, tokens, FLOP/s against the machine's measured
    matmul FLOP/s, peak memory), beside the same cycle with SEAL's reference settings."""
    from .bench.common import DEFAULT_DATA
    from .bench.speed import SpeedError, dumps, run_speed

    for name, value, least in (("--candidates", candidates, 1), ("--epochs", epochs, 1), ("--pad-to", pad_to, 2),
                               ("--matmul-size", matmul_n, 16)):
        if value is not None and value < least:
            fail(f"{name} must be at least {least}, got {value}")
    path = Path(data_path) if data_path else DEFAULT_DATA
    if not path.is_file():
        fail(f"{path}: no such file (use --data)")
    with _progress(2) as (say, tick):
        try:  # two runs: optimised, then reference
            result = run_speed(app.runtime, app.cfg, data_path=path, seed=seed, split=split, candidates=candidates,
                               epochs=epochs, pad_to=pad_to, matmul_n=matmul_n, say=say,
                               on_mode=lambda m: tick(1, 2) if m == "reference" else None)
        except SpeedError as e:
            fail(str(e))
    target = Path(out_path) if out_path else Path("bench-out") / f"speed-{app.runtime.name}-{seed}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(dumps(result), encoding="utf-8")
    _print_speed(result)
    click.echo(f"wrote {target}")


def _print_speed(result: dict) -> None:
    import textwrap

    from .bench.speed import render

    for piece in render(result):
        if isinstance(piece, str):
            click.echo(textwrap.fill(piece, 80, subsequent_indent="  ", break_on_hyphens=False))
        else:
            print_table(piece)


@bench.command("views")
@click.option("--versions", default=300, show_default=True, type=click.IntRange(min=1), help="adapter versions in the synthetic store")
@click.option("--passages", type=click.IntRange(min=1), help="passages (default: one per version, and a few queued)")
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(min=1), help="renders per measurement (median and max)")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="also write the result as JSON")
def bench_views(versions: int, passages: int | None, repeat: int, out_path: str | None) -> None:
    """Render time of every dashboard panel and static view on a synthetic store with
    hundreds of versions (no model needed)."""
    from .bench.views import run_views_bench

    with _progress(1) as (say, _tick):
        result = run_views_bench(versions, passages, repeat, say=say)
    table = Table(title=f"seal tui / views: {result['versions']} versions, {result['passages']} passages "
                        f"(store built in {result['build_s']:.1f} s); ms per render, median and max of {repeat}",
                  box=None, pad_edge=False, title_justify="left")
    for col in ("view", "size", "median ms", "max ms"):
        table.add_column(col, justify="left" if col in ("view", "size") else "right", no_wrap=True)
    for r in result["rows"]:
        table.add_row(r["view"], r["size"], f"{r['median_ms']:.1f}", f"{r['max_ms']:.1f}")
    print_table(table)
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=1), encoding="utf-8")
        click.echo(f"wrote {out_path}")


class _progress:
    """A rich progress bar on a terminal; log lines otherwise."""

    def __init__(self, total: int):
        self.total = total

    def __enter__(self):
        if not err.is_terminal:
            return (lambda msg: log.info(msg)), (lambda i, n: err.print(f"{i}/{n} done"))
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("starting", total=self.total)
        return (lambda msg: self.bar.update(task, description=msg[:50])), (lambda i, n: self.bar.update(task, completed=i))

    def __exit__(self, *exc):
        if hasattr(self, "bar"):
            self.bar.__exit__(*exc)


def run() -> None:  # pragma: no cover - console entry for `python -m agent.cli`
    main(prog_name="seal")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())

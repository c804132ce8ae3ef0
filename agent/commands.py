"""The everyday commands: ask, ingest, queue, learn, sleep, rollback, export, prune.

They import the model's modules inside their bodies, so that listing them (`seal
--help`) stays fast; `agent.cli` registers them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from adapters.names import KNOWLEDGE

from .cli import (
    App,
    SealCommand,
    adapter_row,
    err,
    fail,
    out,
    pass_app,
    print_table,
    progress_bar,
    store_or_none,
)
from .events import ADVANCE

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- ask
@click.command(cls=SealCommand)
@click.argument("question")
@click.option("--context", "context_file", type=click.Path(dir_okay=False), help="answer open-book from this text file")
@click.option("--title", help="topic of the question (given to the model, as in training)")
@click.option("--max-tokens", default=64, show_default=True, help="longest answer")
@click.option("--local", is_flag=True, help="load the model in this process even when a daemon runs on the home")
@pass_app
def ask(app: App, question: str, context_file: str | None, title: str | None, max_tokens: int, local: bool) -> None:
    """Ask the current model a question; the answer is printed as it is generated.

    When a daemon runs on the home, its model answers through its API (no second
    copy of the model is loaded); otherwise this process loads the model."""
    from policies.questions import answer_prompt

    from .api.client import ApiClientError, daemon_client

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
    message = answer_prompt(question.strip(), title=title, context=context)
    shown = _Streamed()
    client = None if local else daemon_client(app.home)
    if client is not None:  # the daemon's model answers: no second copy of it in memory
        try:
            client.chat([{"role": "user", "content": message}], shown, max_tokens=max_tokens)
        except ApiClientError as e:
            fail(str(e))
        shown.end()
        return
    rt = app.runtime
    if app.home.store_file.exists() and app.learner.registry.active(KNOWLEDGE):
        app.learner.model.set_adapter(KNOWLEDGE)  # answer from what was learned
    rt.stream(rt.chat(message), shown, max_new_tokens=max_tokens)
    shown.end()


class _Streamed:
    """Prints an answer piece by piece as it is generated, without its leading blanks."""

    def __init__(self):
        self.started = False

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            click.echo(text, nl=False)

    def end(self) -> None:
        click.echo()


# ---------------------------------------------------------------------------- ingest
@click.command(cls=SealCommand)
@click.argument("paths", nargs=-1, required=True, metavar="FILE...|DIR|-")
@click.option(
    "--questions",
    "questions_file",
    metavar="QA.jsonl",
    help='questions to learn against: JSONL lines of {"question", "answer"[, "title"]}; '
    "each goes to the passage that contains its answer",
)
@click.option("--title", help="title of the text documents (default: a leading '# Heading', else the file name)")
@click.option("--local", is_flag=True, help="write to the store from this process even when a daemon runs on the home")
@pass_app
def ingest(app: App, paths: tuple[str, ...], questions_file: str | None, title: str | None, local: bool) -> None:
    """Add documents and queue their passages for learning.

    Reads .txt and .md files, SEAL/SQuAD-style .json (a list of records, or one) and
    .jsonl (a record a line) with "title", "context" and "questions"
    [{"question", "answer"}], every such file in a folder (recursively), or text from
    stdin with -. Nothing is stored unless every input is good; once this returns,
    what it reports is durably stored. Content ingested before is reported as a
    duplicate and not queued again. Beside a running daemon, the files are read here
    and sent to its API, which checks and stores them as this would.
    """
    from .api.client import ApiClientError, daemon_client
    from .ingest import STDIN, IngestError, outcome_rows, read_sources
    from .ingest import prepare as prepare_documents

    if STDIN in paths and sys.stdin is not None and sys.stdin.isatty():
        err.print("reading a document from stdin (end it with Ctrl-D)")
    stdin = lambda: click.get_binary_stream("stdin")  # noqa: E731
    client = None if local else daemon_client(app.home)
    try:
        if client is not None:
            sources, qfile = read_sources(paths, cfg=app.cfg.ingest, stdin=stdin, questions=questions_file)
        else:
            docs = prepare_documents(paths, cfg=app.cfg.ingest, model=app.cfg.model, title=title,
                                     questions=questions_file, stdin=stdin)
    except IngestError as e:
        fail(str(e))
    if client is not None:
        try:
            status, body = client.ingest(sources, qfile, title)
        except ApiClientError as e:
            fail(str(e))
        if status not in (201, 409):
            fail(body.get("error", {}).get("message") or f"the daemon's API answered {status}")
        rows = body.get("documents") or []
    else:
        rows = outcome_rows(docs, app.store.ingest(docs))
    new_docs = dup_docs = passages = questions = 0
    for r in rows:
        # Only --questions can make the user expect new questions on known text.
        offered = r["questions_offered"] if questions_file else 0
        dropped = f"; its {offered} question(s) were not added" if offered else ""
        if r["status"] == "duplicate" and r["duplicate_of"]:
            dup_docs += 1
            click.echo(f"duplicate: {r['source']} (already ingested from {r['duplicate_of']}{dropped})")
        elif r["status"] == "duplicate":
            dup_docs += 1
            click.echo(f"duplicate: {r['source']} (every passage was already ingested{dropped})")
        else:
            new_docs += 1
            passages += r["passages"]
            questions += r["questions"]
            known = f", {r['passages_known']} already known" if r["passages_known"] else ""
            lost = f"; {r['questions_dropped']} question(s) of passages learned before were not added" \
                if r["questions_dropped"] else ""
            click.echo(f"new: {r['source']} {r['title']!r}: {r['passages']} passage(s){known}, "
                       f"{r['questions']} question(s){lost}")
    if new_docs == 0:
        fail(f"nothing new to ingest: {dup_docs} duplicate document(s)")
    skipped = f"; {dup_docs} duplicate document(s) skipped" if dup_docs else ""
    click.echo(f"ingested {new_docs} document(s): {passages} passage(s), {questions} question(s) queued{skipped}")


# ----------------------------------------------------------------------------- queue
@click.command(cls=SealCommand)
@click.option("--all", "show_all", is_flag=True, help="list done jobs too")
@click.option("--json", "as_json", is_flag=True, help="print JSON (counts and jobs)")
@click.option("--limit", default=50, show_default=True, help="list at most this many jobs (0 = all)")
@click.option("--retry", "retry_ids", type=int, multiple=True, metavar="JOB_ID",
              help="put a failed job back in the queue with fresh attempts (repeatable)")
@click.option("--retry-failed", is_flag=True, help="put every failed job back in the queue")
@pass_app
def queue(app: App, show_all: bool, as_json: bool, limit: int, retry_ids: tuple[int, ...], retry_failed: bool) -> None:
    """What is waiting to be learned: jobs by state, and the counts of each state;
    --retry / --retry-failed give failed passages another chance."""
    from store.db import JOB_STATES

    from .api.client import daemon_view

    if retry_ids or retry_failed:
        if retry_ids and retry_failed:
            fail("give --retry JOB_ID or --retry-failed, not both")
        if not app.home.store_file.exists():
            fail("nothing ingested yet: no job to retry")
        if retry_ids:
            failed = {j["id"] for j in app.store.jobs(("failed",), limit=-1)}
            wrong = [i for i in retry_ids if i not in failed]
            if wrong:
                fail(f"job {wrong[0]} is not a failed job (see `seal queue`)")
        n = app.store.retry_jobs(retry_ids or None)
        click.echo(f"retried {n} job(s): back in the queue with fresh attempts")
        return

    states = JOB_STATES if show_all else ("pending", "claimed", "failed")
    served = daemon_view(app.home, "/queue", state=",".join(states), limit=limit if limit > 0 else 10_000)
    if served is not None:  # a daemon runs: its API reads the store
        counts, jobs = served["counts"], served["jobs"]
    elif app.home.store_file.exists():
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
def _take_writer_lock(app: App, command: str, what: str) -> None:
    """One writer per home (``agent.home.WriterLock``), held until the command ends:
    beside a running daemon, or another learn, sleep, rollback or prune, this one
    refuses with one line naming the holder, before it changes anything."""
    from .daemon.process import running
    from .home import HomeBusy, WriterLock

    info = running(app.home)
    if info is not None:
        fail(f"a seal daemon runs on this home (pid {info.get('pid') or '?'}): it does the {what} work itself; "
             f"stop it first (seal daemon stop)")
    try:
        lock = WriterLock(app.home, command).acquire()
    except HomeBusy as e:
        fail(str(e))
    click.get_current_context().call_on_close(lock.release)


@click.command(cls=SealCommand)
@click.option("--max-passages", type=click.IntRange(min=1), help="stop after this many passages")
@pass_app
def learn(app: App, max_passages: int | None) -> None:
    """Process the queue in the foreground, then exit."""
    from .events import describe, log_lines
    from .wake import learn as drain

    _take_writer_lock(app, "learn", "learn")
    pending = app.store.queue_summary()["pending"]
    if pending == 0 and not app.store.claimed_jobs():
        click.echo("nothing to learn: the queue is empty (seal ingest FILE)")
        return
    total = min(pending, max_passages) if max_passages else pending
    learner = app.learner
    reports = []
    if err.is_terminal:
        import time

        with progress_bar(err, rate=True) as bar:
            task = bar.add_task("learning", total=total, rate="")
            started, tokens = time.monotonic(), [0]

            def on_event(e) -> None:
                if e.message or e.phase == ADVANCE:
                    bar.update(task, description=describe(e)[:50])

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

            reports = drain(learner, max_passages, on_event, on_report=report)
    else:
        reports = drain(learner, max_passages, log_lines(log.info), on_report=_print_report)
    done = [r for r in reports if r.outcome == "committed"]
    click.echo(f"learned {len(done)} of {len(reports)} passage(s); active adapter: "
               f"{(learner.registry.active(KNOWLEDGE) or {}).get('id', 'none (base model)')}")
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


# ------------------------------------------------------------------ sleep, forgetting
@click.command(cls=SealCommand)
@click.option("--policy", type=click.Choice(["replay", "dream", "merge"]), help="consolidation policy (default: sleep.policy)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@pass_app
def sleep(app: App, policy: str | None, as_json: bool) -> None:
    """Run one sleep phase now: consolidate, measure, keep or roll back."""
    import dataclasses

    _take_writer_lock(app, "sleep", "sleep")
    from .sleep import record_skip, sleep_phase

    cfg = dataclasses.replace(app.cfg.sleep, policy=policy) if policy else app.cfg.sleep
    if not app.home.store_file.exists():  # nothing ingested: a sleep does not create the store
        report = None
    elif not app.store.learned_passages():  # nothing to consolidate: no need to load the model
        report = record_skip(app.store, cfg, "manual", "no learned passage yet",
                             app.store.active_adapter_id(KNOWLEDGE))
    else:
        learner = app.learner
        learner.recover()  # leftovers of a killed commit go before a new one
        if err.is_terminal and not as_json:
            with _StepProgress("sleeping") as on_event:
                report = sleep_phase(learner, cfg, getattr(app.cfg, "editor", None), "manual", on_event=on_event)
        else:
            from .events import log_lines

            report = sleep_phase(learner, cfg, getattr(app.cfg, "editor", None), "manual",
                                 on_event=log_lines(log.info))
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
    """A progress bar fed by step events: a step's advances move the bar (steps,
    elapsed, ETA; a new total starts a fresh bar), a message names the current step."""

    def __init__(self, description: str):
        self.bar = progress_bar(err)
        self.task = self.bar.add_task(description, total=None)

    def __call__(self, e) -> None:
        if e.phase == ADVANCE and e.total:
            if self.bar.tasks[0].total != e.total:  # a new phase of steps: its own ETA
                self.bar.reset(self.task, total=e.total)
            self.bar.update(self.task, completed=e.done, description=(e.message or e.step)[:40])
        elif e.message:
            self.bar.update(self.task, description=e.message[:50])

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


@click.command(cls=SealCommand)
@click.argument("adapter")
@pass_app
def rollback(app: App, adapter: str) -> None:
    """Make ADAPTER the active version of its adapter (newer versions are marked rolled
    back; nothing is deleted; `seal rollback` to a newer one goes forward again).
    Recorded as an event. Refuses beside a running daemon."""
    row = adapter_row(app, adapter)
    _take_writer_lock(app, "rollback", "learning")
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


@click.command(cls=SealCommand)
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

    row = adapter_row(app, adapter)
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


@click.command(cls=SealCommand)
@click.option("--keep", required=True, type=click.IntRange(min=0), help="wake versions to keep, newest first")
@click.option("--keep-sleeps", type=click.IntRange(min=0), default=0, show_default=True,
              help="sleep checkpoints and editor versions to keep, newest first (0: all)")
@click.option("--dry-run", is_flag=True, help="say what would be removed, remove nothing")
@click.option("--json", "as_json", is_flag=True, help="print JSON (removed, kept and why)")
@pass_app
def prune(app: App, keep: int, keep_sleeps: int, dry_run: bool, as_json: bool) -> None:
    """Remove the files of old versions: all wake versions but the KEEP newest, the
    active one and those referenced (the parent of a kept sleep checkpoint or editor
    version). Checkpoints stay, all of them unless --keep-sleeps N; rows stay (marked
    pruned) and the removal is recorded as an event. Refuses beside a running daemon."""
    if store_or_none(app) is None:
        click.echo('{"removed": [], "kept": {}}' if as_json else "nothing to prune: no adapters yet")
        return
    _take_writer_lock(app, "prune", "learning")
    registry = app.parts.registry
    plan = registry.prune_plan(keep, keep_sleeps) if dry_run else registry.prune(keep, keep_sleeps)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": plan.remove, "kept": plan.kept, "bytes": plan.bytes},
                              indent=1))
        return
    verb = "would remove" if dry_run else "removed"
    if not plan.remove:
        click.echo(f"nothing to prune: {len(plan.kept)} version(s) kept")
        return
    ids = ", ".join(r["id"] for r in plan.remove)
    click.echo(f"{verb} {len(plan.remove)} version(s), {plan.bytes / 2**20:.1f} MiB: {ids}")
    for aid, why in plan.kept.items():
        click.echo(f"  kept {aid}: {why}")

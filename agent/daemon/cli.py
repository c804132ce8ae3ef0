"""`seal daemon start|stop|status|run`: seal as a background service.

``start``, ``stop`` and ``status`` only deal with the process (``agent.daemon.process``);
``run`` builds the daemon (``agent.app.build_daemon``) and runs it in the foreground.
"""

from __future__ import annotations

import json
import sys

import click

from ..cli import App, SealGroup, fail, pass_app
from ..home import HomeBusy, WriterLock
from .process import (
    AlreadyRunning,
    DaemonError,
    DaemonLock,
    already_running,
    log_to_file,
    pid_info,
    running,
    start_detached,
    stop_daemon,
)
from .process import daemon_status as read_status

PUBLIC_HELP = "let the API listen on api.host even when it is not loopback (other machines can reach it)"
RAY_HELP = ("run the wake cycle's trials on a Ray cluster: its address (auto, or ray://HOST:10001), or 'local' for "
            "a private one on this machine (runner.kind = ray; needs the ray extra)")


def ray_runner(cfg, address: str | None):
    """``cfg`` with its trials on Ray at ``address`` (None: unchanged)."""
    if address is None:
        return cfg
    import dataclasses

    return dataclasses.replace(cfg, runner=dataclasses.replace(cfg.runner, kind="ray",
                                                               address="" if address == "local" else address))


@click.group(cls=SealGroup)
def daemon() -> None:
    """Run seal as a background service: start, stop, status, run."""


@daemon.command("start")
@click.option("--wait", "wait_s", default=120.0, show_default=True, type=click.FloatRange(min=1),
              help="seconds to wait for it to load its model (it goes on loading after that)")
@click.option("--public", is_flag=True, help=PUBLIC_HELP)
@click.option("--ray", "ray_address", metavar="ADDRESS", help=RAY_HELP)
@pass_app
def daemon_start(app: App, wait_s: float, public: bool, ray_address: str | None) -> None:
    """Start the daemon in the background (logs to <home>/logs/daemon.log).

    It runs `seal daemon run` detached, with the same --home, --set and --model."""
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
        run_args = (("--public",) if public else ()) + (("--ray", ray_address) if ray_address else ())
        info = start_detached(app.home, args, wait_s, run_args=run_args)
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

    from store.db import JOB_STATES

    from ..api.client import daemon_view
    from ..ui.fmt import file_size, next_sleep_text

    s = daemon_view(app.home, "/status", disk=1) or read_status(app.home)
    s.pop("api", None)
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
            rows.append(("api", s.get("api_url") or "off"))
        rows += [
            ("active adapter", s["active_adapter"] or "none (base model)"),
            ("queue", ", ".join(f"{q[k]} {k}" for k in JOB_STATES) if q else "empty (nothing ingested)"),
            ("activity", s["activity"] or "-"),
            ("last heartbeat", ago(s["heartbeat_age_s"])),
            ("last sleep", when(s["last_sleep_at"])),
            ("next sleep", nxt if s["running"] else "-"),
            ("disk", "{} ({} adapters, {} store, {} logs)".format(
                *(file_size(s["disk"][k]) for k in ("total", "adapters", "store", "logs")))),
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
@click.option("--public", is_flag=True, help=PUBLIC_HELP)
@click.option("--ray", "ray_address", metavar="ADDRESS", help=RAY_HELP)
@pass_app
def daemon_run(app: App, burst: bool, detached: bool, public: bool, ray_address: str | None) -> None:
    """Run the daemon in the foreground (for systemd; see examples/seal.service),
    serving the HTTP API on api.host:api.port (token in <home>/token) unless
    api.enabled = false.

    SIGTERM or Ctrl-C stops it warm (the current step finishes or is safely
    abandoned); a second one stops it at once."""
    from ..app import build_daemon

    lock = DaemonLock(app.home)
    try:
        lock.acquire(pid_info(app.home, app.cfg.model.path))
    except AlreadyRunning as e:
        fail(str(e))
    with lock:
        try:  # and the home's writer lock, so that no foreground learn, sleep, rollback or prune runs beside it
            writer = WriterLock(app.home, "daemon run").acquire()
        except HomeBusy as e:
            fail(str(e))
        click.get_current_context().call_on_close(writer.release)
        log_to_file(app.home, detached=detached)
        if ray_address is not None:
            try:
                import ray  # noqa: F401
            except ImportError:
                fail("--ray needs the ray extra: pip install 'seal-daemon[ray]'")
        d = build_daemon(app.home, ray_runner(app.cfg, ray_address), handle_signals=True, public=public)
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

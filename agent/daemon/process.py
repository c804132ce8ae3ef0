"""One daemon per home, and the commands that start, stop and ask about it.

- one daemon per home: an exclusive ``flock`` on ``<home>/daemon.lock``, held for the
  life of the process (the kernel drops it when the process dies, even by kill -9);
  ``<home>/daemon.pid`` says who holds it;
- ``start_detached`` runs ``seal daemon run`` in its own session, logging to
  ``<home>/logs/daemon.log``, and waits until it has loaded its model;
- ``stop_daemon`` stops it warm (SIGTERM), then cold (a second SIGTERM), then kills it;
- ``daemon_status`` reads the pidfile and what the daemon wrote in the store's state
  table (alive-at time, activity, next sleep); it creates nothing.

Nothing here loads the model, and the store (sqlite-utils, slow to import) is
imported only where it is read, so that `seal daemon --help` stays fast.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import logging.handlers
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

from ..home import Home

LOCK_NAME, PID_NAME, LOG_NAME = "daemon.lock", "daemon.pid", "daemon.log"
STATE_HEARTBEAT, STATE_NEXT_SLEEP, STATE_ACTIVITY = "daemon.heartbeat", "daemon.next_sleep", "daemon.activity"


class DaemonError(RuntimeError):
    """A daemon command cannot do what was asked: the message is one line, fit for the user."""


class AlreadyRunning(DaemonError):
    """Another daemon holds this home's lock."""


# ------------------------------------------------------------ one daemon per home
def pid_info(home: Home, model: str | None = None) -> dict:
    """What daemon.pid says about the daemon holding the lock (``model``: model.path)."""
    return {"pid": os.getpid(), "started_at": time.time(), "host": socket.gethostname(), "home": str(home.root),
            "model": model or "SmolLM2-135M-Instruct (default)", "log": str(home.logs / LOG_NAME)}


class DaemonLock:
    """An exclusive ``flock`` on <home>/daemon.lock for the life of the process, and
    <home>/daemon.pid (JSON: pid, started_at, host, home, ...) naming the holder."""

    def __init__(self, home: Home):
        self.home = home
        self.fd: int | None = None

    def acquire(self, info: dict, retry_s: float = 0.5) -> None:
        """Take the lock or raise AlreadyRunning naming the holder. Retries briefly,
        because `seal daemon status` probes the lock for an instant."""
        self.home.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.home.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + retry_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise AlreadyRunning(already_running(self.home, read_pidfile(self.home))) from None
                time.sleep(0.05)
        self.fd = fd
        data = json.dumps(info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        tmp = self.home.root / f".{PID_NAME}.{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, self.home.root / PID_NAME)

    def release(self) -> None:
        if self.fd is None:
            return
        remove_pidfile(self.home)
        os.close(self.fd)  # drops the lock
        self.fd = None

    def __enter__(self) -> DaemonLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_pidfile(home: Home) -> None:
    info = read_pidfile(home)
    if info and info.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            (home.root / PID_NAME).unlink()


def read_pidfile(home: Home) -> dict | None:
    try:
        info = json.loads((home.root / PID_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def lock_held(home: Home) -> bool:
    """Whether some process holds the home's daemon lock (an instant's probe)."""
    try:
        fd = os.open(home.root / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our probe's shared lock
    return False


def running(home: Home) -> dict | None:
    """The pidfile of the daemon running on this home, or None if none runs."""
    if not lock_held(home):
        return None
    return read_pidfile(home) or {"pid": None}


def already_running(home: Home, info: dict | None) -> str:
    if not info or not info.get("pid"):
        return f"a seal daemon already runs on {home.root} (its pidfile is unreadable)"
    since = dt.datetime.fromtimestamp(info["started_at"]).strftime("%Y-%m-%d %H:%M:%S")
    return f"a seal daemon already runs on {home.root}: pid {info['pid']}, started {since}"


# ---------------------------------------------------------------- start, stop, status
def log_to_file(home: Home, detached: bool = False) -> logging.Handler:
    """Log INFO and above to <home>/logs/daemon.log (rotated). When ``detached``, the
    terminal handlers go: stderr is that same file."""
    home.ensure()
    root = logging.getLogger()
    if detached:
        for h in list(root.handlers):
            root.removeHandler(h)
    else:
        for h in root.handlers:
            if h.level == logging.NOTSET:
                h.setLevel(root.level)  # the terminal keeps the verbosity the user asked for
    handler = logging.handlers.RotatingFileHandler(home.logs / LOG_NAME, maxBytes=10 << 20, backupCount=3,
                                                   encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
    level = min(root.level or logging.INFO, logging.INFO)  # -vv: DEBUG in the file too
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def start_detached(home: Home, cli_args: list[str], wait_s: float = 60.0, run_args: tuple[str, ...] = ()) -> dict:
    """Start ``python -m agent.cli <cli_args> daemon run`` in its own session, output to
    the log; return its pidfile once it has loaded its model (``ready``: True), or
    after ``wait_s`` if it is still loading (``ready``: False). Raises DaemonError
    with the last line of the log if it exits meanwhile."""
    home.ensure()
    log_path = home.logs / LOG_NAME
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    project = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = project + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *cli_args, "daemon", "run", "--detached", *run_args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    deadline = time.monotonic() + wait_s
    while True:
        code = proc.poll()
        if code is not None:
            raise DaemonError(f"the daemon exited at start (status {code}): {_last_line(log_path)}")
        info = running(home)
        ours = info is not None and info.get("pid") == proc.pid
        if ours and _ready(home, info["started_at"]):
            return {**info, "ready": True}
        if time.monotonic() > deadline:
            if ours:
                return {**info, "ready": False}
            raise DaemonError(f"the daemon (pid {proc.pid}) did not come up within {wait_s:g} s: see {log_path}")
        time.sleep(0.1)


def _ready(home: Home, since: float) -> bool:
    """Whether the daemon started at ``since`` has written a status past 'starting'
    and is not already stopping (as one that could not load its model does: its
    exit, not a start, is what `seal daemon start` must report)."""
    from store import Store

    if not home.store_file.exists():
        return False
    try:
        with Store(home.store_file) as store:
            beat, activity = store.get_state(STATE_HEARTBEAT), store.get_state(STATE_ACTIVITY)
    except sqlite3.Error:
        return False
    if not beat or float(beat) < since or activity in (None, "starting"):
        return False
    return not activity.startswith(("stopping", "stopped"))


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"see {path}"
    return lines[-1].strip() if lines else f"see {path}"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_stopped(home: Home, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while lock_held(home):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop_daemon(home: Home, timeout_s: float, now: bool = False) -> tuple[int, str]:
    """Stop the daemon of this home: SIGTERM (warm), then after ``timeout_s`` (at once
    with ``now``) a second SIGTERM (cold), then SIGKILL as a last resort. Returns
    (pid, how: warm | cold | killed)."""
    info = running(home)
    if info is None:
        raise DaemonError(f"no seal daemon runs on {home.root}")
    pid = info.get("pid")
    if not pid:
        raise DaemonError(f"a seal daemon holds {home.root / LOCK_NAME} but its pidfile is unreadable")
    _signal(pid, signal.SIGTERM)
    # Two signals sent back to back may arrive as one: give the first a moment.
    if wait_stopped(home, 0.5 if now else timeout_s):
        return pid, "warm"
    _signal(pid, signal.SIGTERM)
    if wait_stopped(home, 15.0):
        return pid, "cold"
    _signal(pid, signal.SIGKILL)
    if wait_stopped(home, 15.0):
        return pid, "killed"
    raise DaemonError(f"pid {pid} did not stop, even after SIGKILL")


def disk_use(home: Home) -> dict[str, int]:
    """Bytes on disk under the home, in one walk: adapter versions, the store (with its
    WAL), logs, and all of it (the inbox and the rest included). Links are not followed."""
    out = {"adapters": 0, "store": 0, "logs": 0, "total": 0}
    store_files = {home.store_file.name + ext for ext in ("", "-wal", "-shm")}
    for root, _dirs, names in os.walk(home.root):
        top = os.path.relpath(root, home.root).split(os.sep)[0]
        for n in names:
            try:
                st = os.lstat(os.path.join(root, n))
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            out["total"] += st.st_size
            if top in ("adapters", "logs"):
                out[top] += st.st_size
            elif top == "." and n in store_files:
                out["store"] += st.st_size
    return out


def daemon_status(home: Home, now: float | None = None, disk: bool = True) -> dict:
    """Everything `seal daemon status` shows; reads only (creates no store). ``disk``:
    walk the home for its disk use (the dashboard, redrawn every 2 s, does not)."""
    now = time.time() if now is None else now
    info = running(home)
    out: dict = {"running": info is not None, "home": str(home.root), "log": str(home.logs / LOG_NAME),
                 "pid": None, "host": None, "started_at": None, "uptime_s": None, "model": None}
    out["api_url"] = None
    if info:
        out.update({k: info.get(k) for k in ("pid", "host", "started_at", "model")})
        out["uptime_s"] = now - info["started_at"] if info.get("started_at") else None
        from ..api.client import read_address

        where = read_address(home)
        out["api_url"] = where["url"] if where and where.get("pid") == info.get("pid") else None
    out.update({"active_adapter": None, "queue": None, "heartbeat_at": None, "heartbeat_age_s": None,
                "activity": None, "next_sleep": None, "last_sleep_at": None, "disk": disk_use(home) if disk else None})
    if home.store_file.exists():
        from adapters.names import KNOWLEDGE
        from store import Store

        with Store(home.store_file) as store:
            out["active_adapter"] = store.active_adapter_id(KNOWLEDGE)
            out["queue"] = store.queue_summary()
            out["last_sleep_at"] = store.last_sleep_at()
            beat = store.get_state(STATE_HEARTBEAT)
            if beat:
                out["heartbeat_at"] = float(beat)
                out["heartbeat_age_s"] = now - float(beat)
            out["activity"] = store.get_state(STATE_ACTIVITY)
            raw = store.get_state(STATE_NEXT_SLEEP)
            with contextlib.suppress(ValueError, TypeError):
                out["next_sleep"] = json.loads(raw) if raw else None
    return out

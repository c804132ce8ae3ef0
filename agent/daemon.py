"""The daemon: the wake cycle, the inbox and the sleep phase as a long-running service.

One round of the loop (``Daemon.step``) polls the inbox, runs one wake cycle if work
is queued, and sleeps if the schedule says a sleep is due; ``run_burst`` repeats rounds
until nothing is left to do, then returns (rq's ``work(burst=True)``); ``serve`` runs
the same pieces as APScheduler 3.x jobs until it is told to stop. The clock, the
Learner and the sleep function are passed in, so tests step the loop with a fake clock
and no real waiting.

What the daemon guarantees, and how:

- one daemon per home: an exclusive ``flock`` on ``<home>/daemon.lock``, held for the
  life of the process (the kernel drops it when the process dies, even by kill -9);
  ``<home>/daemon.pid`` says who holds it;
- nothing in memory is the truth: the last sleep and the commits since it are read
  from the store each time, so a restart (or a sleep the machine missed) asks again;
- a warm stop (first SIGTERM/SIGINT) abandons the current wake cycle at its next
  heartbeat (the claim goes back without counting an attempt) or lets the sleep
  function stop itself; a second signal stops at once (claim given back, ``os._exit``);
- at start, claims of dead workers go back to the queue and half-written adapter
  folders are removed (``Learner.recover``): work interrupted by kill -9 resumes.

The model is used by one job at a time: every job that touches it runs on an executor
with a single worker thread (the same thread that loaded it, since sqlite connections
belong to their thread); only the heartbeat runs beside it, on its own connection.
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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.names import KNOWLEDGE
from policies import schedule as schedules
from store import Store

from .events import OnEvent, ignore, log_lines
from .home import Home
from .ingest import IngestError, prepare
from .learner import Learner, worker_id
from .wake import CycleReport, StopRequested, learn

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

LOCK_NAME, PID_NAME, LOG_NAME = "daemon.lock", "daemon.pid", "daemon.log"
DONE, FAILED = "done", "failed"
# Names that say "still being written" (browsers, rsync, editors); dotfiles are skipped too,
# so the safe way to drop a file is to write ".name" and rename it to "name".
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".swp", "~")
MODEL_EXECUTOR = "model"
EXIT_COLD = 1  # the exit status of a cold stop (a warm stop exits 0)
STATE_HEARTBEAT, STATE_NEXT_SLEEP, STATE_ACTIVITY = "daemon.heartbeat", "daemon.next_sleep", "daemon.activity"


@dataclass(frozen=True)
class DaemonConfig:
    wake_poll_s: float = field(default=2.0, metadata={"help": "how often the queue is checked for pending passages (s)"})
    inbox_poll_s: float = field(default=5.0, metadata={"help": "how often <home>/inbox is scanned for new files (s)"})
    inbox_settle_s: float = field(
        default=1.0, metadata={"help": "a file in the inbox is read only once it has not changed for this long (s)"}
    )
    sleep_poll_s: float = field(default=30.0, metadata={"help": "how often the schedule is asked whether a sleep is due (s)"})
    sleep_retry_s: float = field(
        default=600.0, metadata={"help": "after a sleep that failed or stopped early, wait this long before trying again (s)"}
    )
    heartbeat_s: float = field(
        default=10.0, metadata={"help": "how often the daemon writes its heartbeat and next sleep to the store (s)"}
    )
    stop_timeout_s: float = field(
        default=120.0, metadata={"help": "warm stop: longest wait for the current step to finish or abandon, then stop cold (s)"}
    )
    misfire_grace_s: float = field(
        default=300.0, metadata={"help": "APScheduler: a job run later than this (the model was busy) is skipped (s)"}
    )

    def __post_init__(self) -> None:
        for name in ("wake_poll_s", "inbox_poll_s", "sleep_poll_s", "sleep_retry_s", "heartbeat_s",
                     "stop_timeout_s", "misfire_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.inbox_settle_s < 0:
            raise ValueError(f"inbox_settle_s must be 0 or more, got {self.inbox_settle_s}")


class DaemonError(RuntimeError):
    """A daemon command cannot do what was asked: the message is one line, fit for the user."""


class AlreadyRunning(DaemonError):
    """Another daemon holds this home's lock."""


# ------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class InboxResult:
    name: str
    outcome: str  # ingested | duplicate | failed
    detail: str
    moved_to: Path | None


@dataclass(frozen=True)
class SleepRun:
    trigger: str
    outcome: str  # the sleep function's own (kept, rolled_back, skipped, abandoned, ...), or stopped | failed
    reason: str  # why it was due
    result: object = None  # what the sleep function returned (its report)
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class StepReport:
    inbox: list[InboxResult]
    cycle: CycleReport | None
    sleep: SleepRun | None

    @property
    def idle(self) -> bool:
        return not self.inbox and self.cycle is None and self.sleep is None


@dataclass
class BurstReport:
    inbox: list[InboxResult] = field(default_factory=list)
    cycles: list[CycleReport] = field(default_factory=list)
    sleeps: list[SleepRun] = field(default_factory=list)
    stopped: bool = False

    def add(self, s: StepReport) -> None:
        self.inbox += s.inbox
        self.cycles += [s.cycle] if s.cycle else []
        self.sleeps += [s.sleep] if s.sleep else []


# -------------------------------------------------------------------- collaborators
# (learner, *, trigger: str, should_stop: () -> bool, progress: (str) -> None) -> report;
# the report's ``outcome`` (if it has one) is logged and returned in SleepRun.
SleepFn = Callable[..., object]


def default_sleep(cfg: Config) -> SleepFn:
    """The sleep phase of agent.sleep (imported when the first sleep runs)."""

    def sleep(learner: Learner, *, trigger: str, should_stop: Callable[[], bool],
              on_event: OnEvent = ignore) -> object:
        from .sleep import sleep_phase

        return sleep_phase(learner, cfg.sleep, cfg.editor, trigger=trigger, on_event=on_event, should_stop=should_stop)

    return sleep


def build_learner(home: Home, cfg: Config) -> Learner:
    """The daemon's Learner: the configured model, this home's store and adapters."""
    from adapters.registry import AdapterRegistry

    from .runtime import Runtime

    home.ensure()
    store = Store(home.store_file)
    return Learner(Runtime.load(cfg.model), store, AdapterRegistry(home.adapters, store), cfg.lora, cfg.policies, cfg.wake)


# -------------------------------------------------------------------------- daemon
class Daemon:
    """The loop. ``learner`` (or ``learner_factory``, called on first use, in the thread
    that will use it), ``sleep_fn`` and ``clock`` are injectable; ``handle_signals``
    installs the SIGTERM/SIGINT handlers (main thread only; the CLI turns it on)."""

    def __init__(self, home: Home, cfg: Config, *, learner: Learner | None = None,
                 learner_factory: Callable[[], Learner] | None = None, sleep_fn: SleepFn | None = None,
                 clock: Callable[[], float] = time.time, handle_signals: bool = False):
        self.home, self.cfg, self.clock = home, cfg, clock
        self._learner = learner
        self._factory = learner_factory or (lambda: build_learner(home, cfg))
        self._sleep_fn = sleep_fn or default_sleep(cfg)
        self._handle_signals = handle_signals
        self.worker = worker_id()
        self._stop = threading.Event()
        self._model_lock = threading.Lock()  # held while a job uses the model
        self._closed = False
        self._started = False
        self._sleep_blocked_until = float("-inf")
        self.activity = "starting"
        self.fatal: BaseException | None = None

    # ------------------------------------------------------------------ basics
    @property
    def learner(self) -> Learner:
        if self._learner is None:
            self._learner = self._factory()
        return self._learner

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """A warm stop: the current step finishes or abandons safely, nothing new starts."""
        self._stop.set()

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def start(self) -> None:
        """Once, before any work: log the resolved config, load the model, give back
        the claims of dead workers and remove half-written adapters."""
        if self._started:
            return
        from .config import config_items

        log.info("seal daemon %s starting on %s", self.worker, self.home.root)
        for key, value, _ in config_items(self.cfg):
            log.info("config %s = %r", key, value)
        self.learner.recover()
        self._started = True
        self.activity = "idle"
        log.info("ready: active adapter %s, queue %s",
                 self.learner.store.active_adapter_id(KNOWLEDGE) or "none (base model)", self.learner.store.queue_summary())
        self.beat()  # `seal daemon start` waits for this: the model is loaded

    # -------------------------------------------------------------- the pieces
    def step(self, now: float | None = None) -> StepReport:
        """One round: poll the inbox, one wake cycle if work is queued, a sleep if due."""
        self.start()
        inbox = self.poll_inbox()
        cycle = self.wake_once()
        slept = self.sleep_if_due(now)
        self.beat(now)
        return StepReport(inbox, cycle, slept)

    def wake_once(self) -> CycleReport | None:
        """Learn the next pending passage, if any (one wake cycle)."""
        if self.stopping or not self.learner.store.queue_summary()["pending"]:
            return None

        def progress(msg: str) -> None:
            self.activity = f"learning: {msg}"
            log.info(msg)

        self.activity = "learning"
        try:
            reports = learn(self.learner, max_passages=1, on_event=log_lines(progress), should_stop=self._stop.is_set)
        finally:
            self.activity = "idle"
        for r in reports:
            log.info("%s passage %s %r %s: %s", r.outcome, r.passage_id, r.title, r.adapter_id or "", r.reason)
        return reports[0] if reports else None

    def next_sleep(self, now: float | None = None, store: Store | None = None) -> schedules.Due:
        now = self._now(now)
        if now < self._sleep_blocked_until:
            return schedules.Due(False, self._sleep_blocked_until, "retrying after a sleep that did not finish")
        return schedules.due(self.cfg.schedule, store or self.learner.store, now)

    def sleep_if_due(self, now: float | None = None) -> SleepRun | None:
        """Sleep if the schedule (asked with the store's truth) says a sleep is due."""
        if self.stopping:
            return None
        now = self._now(now)
        due = self.next_sleep(now)
        if not due.due:
            return None
        return self.sleep(self.cfg.schedule.policy, due.reason, now)

    def sleep(self, trigger: str, reason: str = "", now: float | None = None) -> SleepRun:
        """Run the sleep function now. If it records no sleep in the store (it failed or
        was stopped), the schedule is not asked again for ``sleep_retry_s``."""
        now = self._now(now)
        store = self.learner.store
        before = store.last_sleep_at()
        log.info("sleeping (%s): %s", trigger, reason)
        self.activity = f"sleeping ({trigger})"
        t0 = time.perf_counter()
        outcome, result, error = "done", None, None

        def progress(msg: str) -> None:
            self.activity = f"sleeping: {msg}"
            log.info(msg)

        try:
            result = self._sleep_fn(self.learner, trigger=trigger, should_stop=self._stop.is_set,
                                    on_event=log_lines(progress))
            outcome = str(getattr(result, "outcome", outcome))
        except StopRequested:
            outcome = "stopped"
            self._reload()
        except Exception as e:  # a bug or a broken model: the daemon goes on learning
            log.exception("the sleep phase failed")
            outcome, error = "failed", f"{type(e).__name__}: {e}"
            self._reload()
        finally:
            self.activity = "idle"
        if store.last_sleep_at() in (None, before):
            self._sleep_blocked_until = now + self.cfg.daemon.sleep_retry_s
            log.warning("the sleep recorded no report (%s): next try in %.0f s", outcome, self.cfg.daemon.sleep_retry_s)
        seconds = time.perf_counter() - t0
        log.info("sleep %s in %.1f s: %s", outcome, seconds, error or getattr(result, "reason", result))
        return SleepRun(trigger, outcome, reason, result, error, seconds)

    def _reload(self) -> None:
        """After a sleep that did not finish, the live adapters must equal the store's."""
        try:
            self.learner.reload_active()
            if hasattr(self.learner, "load_editor"):
                self.learner.load_editor()
        except Exception:
            log.exception("could not reload the active adapters")

    # -------------------------------------------------------------------- inbox
    def poll_inbox(self) -> list[InboxResult]:
        """Ingest every settled file in <home>/inbox (dotfiles, partial downloads and
        subfolders skipped), then move it to inbox/done/ or inbox/failed/."""
        inbox = self.home.inbox
        if self.stopping or not inbox.is_dir():
            return []
        results = []
        for path in sorted(inbox.iterdir()):
            if self.stopping:
                break
            if self._settled(path):
                r = self._take(path)
                if r is not None:
                    results.append(r)
        return results

    def _settled(self, path: Path) -> bool:
        if path.name.startswith(".") or path.name.endswith(PARTIAL_SUFFIXES):
            return False
        try:
            st = path.stat()
        except OSError:  # gone meanwhile, or a dangling link
            return False
        # mtimes are wall-clock time, whatever the injected clock says
        return stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime >= self.cfg.daemon.inbox_settle_s

    def _take(self, path: Path) -> InboxResult | None:
        """Ingest one file exactly as `seal ingest FILE` does (one transaction, same errors)."""
        self.activity = f"ingesting {path.name}"
        try:
            docs = prepare([str(path)], cfg=self.cfg.ingest, model=self.cfg.model,
                           tokenizer=self.learner.runtime.tokenizer)
            (o,) = self.learner.store.ingest(docs)
        except IngestError as e:
            return self._file(path, "failed", str(e))
        except (OSError, sqlite3.Error) as e:  # the disk or the store, not the file: next poll
            log.warning("inbox: %s left for the next poll: %s", path.name, e)
            return None
        except Exception as e:
            log.exception("inbox: ingesting %s failed", path.name)
            return self._file(path, "failed", f"internal error: {type(e).__name__}: {e}")
        finally:
            self.activity = "idle"
        if o.status == "new" and o.passages_added:
            known = f", {o.passages_duplicate} already known" if o.passages_duplicate else ""
            return self._file(path, "ingested", f"{o.passages_added} passage(s){known}, {o.questions_added} question(s) queued")
        if o.duplicate_of:
            return self._file(path, "duplicate", f"duplicate: already ingested from {o.duplicate_of}; nothing queued")
        return self._file(path, "duplicate", "duplicate: every passage was already ingested; nothing queued")

    def _file(self, path: Path, outcome: str, detail: str) -> InboxResult:
        """Move a taken file to done/ (ingested, duplicate) or failed/, the reason beside it."""
        folder = self.home.inbox / (FAILED if outcome == "failed" else DONE)
        target = None
        try:
            folder.mkdir(exist_ok=True)
            target = _free_name(folder, path.name)
            os.replace(path, target)
            if outcome != "ingested":
                target.with_name(target.name + ".reason.txt").write_text(detail + "\n", encoding="utf-8")
        except OSError as e:
            log.error("inbox: cannot move %s to %s: %s", path, folder, e)
        (log.warning if outcome == "failed" else log.info)("inbox: %s %s -> %s: %s", outcome, path.name,
                                                             folder.name, detail)
        return InboxResult(path.name, outcome, detail, target)

    # ---------------------------------------------------------------- heartbeat
    def beat(self, now: float | None = None) -> None:
        """Write the heartbeat, what the daemon is doing, and the next sleep to the
        store's state table (its own connection: it runs beside the model's thread)."""
        now = self._now(now)
        try:
            with Store(self.home.store_file) as store:
                due = self.next_sleep(now, store)
                store.set_state(STATE_HEARTBEAT, repr(float(now)))
                store.set_state(STATE_ACTIVITY, self.activity)
                store.set_state(STATE_NEXT_SLEEP, json.dumps({"at": due.next_at, "due": due.due, "reason": due.reason}))
        except Exception:  # a heartbeat must never take the daemon down
            log.exception("heartbeat failed")

    # ------------------------------------------------------------------ running
    def run_burst(self) -> BurstReport:
        """Drain the inbox and the queue, sleeping when due, then return."""
        report = BurstReport()
        with self._signals():
            self.start()
            while not self.stopping:
                s = self.step()
                report.add(s)
                if s.idle:
                    break
            report.stopped = self.stopping
            self.activity = "stopped"
            self.beat()
        return report

    def serve(self) -> int:
        """Run until a signal (or ``request_stop``): APScheduler 3.x jobs with fixed ids,
        coalesced, one instance each, an explicit misfire grace; the jobs that use the
        model share one worker thread. Returns the exit status."""
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        d = self.cfg.daemon
        with self._signals():  # first: a SIGTERM from now on is a warm stop, not a kill
            _quiet_apscheduler()
            self.home.ensure()
            Store(self.home.store_file).close()  # create and migrate it here, before two threads open it
            sched = BackgroundScheduler(
                executors={MODEL_EXECUTOR: ThreadPoolExecutor(1), "default": ThreadPoolExecutor(1)},
                job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": int(d.misfire_grace_s)},
                timezone=dt.UTC,
            )
            now = dt.datetime.now(dt.UTC)
            common = {"args": [self], "replace_existing": True, "coalesce": True, "max_instances": 1,
                      "misfire_grace_time": int(d.misfire_grace_s)}
            sched.add_job(start_job, "date", run_date=now, id="seal.start", executor=MODEL_EXECUTOR, **common)
            for job, every, job_id in ((inbox_job, d.inbox_poll_s, "seal.inbox"), (wake_job, d.wake_poll_s, "seal.wake"),
                                       (sleep_job, d.sleep_poll_s, "seal.sleep")):
                sched.add_job(job, "interval", seconds=every, id=job_id, executor=MODEL_EXECUTOR, next_run_time=now,
                              **common)
            sched.add_job(heartbeat_job, "interval", seconds=d.heartbeat_s, id="seal.heartbeat", executor="default",
                          next_run_time=now, **common)
            sched.start()
            while not self._stop.wait(0.2):  # signal handlers run in this (main) thread
                pass
            log.info("stopping: the current step finishes or is abandoned (a second signal stops at once)")
            self.activity = "stopping"
            self.beat()
            sched.shutdown(wait=False)  # no new runs; jobs already queued see the stop and return
            deadline = time.monotonic() + d.stop_timeout_s
            while not self._model_lock.acquire(timeout=min(0.2, max(0.01, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    log.error("the current step did not stop within %g s: stopping cold", d.stop_timeout_s)
                    self.cold_stop()
            self._closed = True
            self._model_lock.release()
            self.activity = "stopped" if self.fatal is None else f"stopped: {self.fatal}"
            self.beat()
        log.info("stopped")
        return 0 if self.fatal is None else 1

    def model_job(self, name: str, fn: Callable[[], object]) -> None:
        """Run one piece on the model's thread, unless the daemon is stopping."""
        with self._model_lock:
            if self._closed or self.stopping:
                return
            try:
                self.start()
            except Exception as e:
                # the CLI reports it in one line; the file log keeps it too
                log.info("cannot start: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
                log.debug("start failed", exc_info=True)
                self.fatal = e
                self._stop.set()
                return
            try:
                fn()
            except Exception:
                log.exception("job %s failed", name)

    # ------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if not self._handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if not self._stop.is_set():
            log.warning("%s: stopping warm (a second signal stops at once)", name)
            self._stop.set()
        else:
            log.warning("%s again: stopping cold", name)
            self.cold_stop()

    def cold_stop(self) -> None:
        """Stop now: give our claims back (without counting an attempt) and exit."""
        try:
            with Store(self.home.store_file) as store:
                n = store.release_claim(self.worker)
                store.set_state(STATE_ACTIVITY, "stopped (cold)")
            log.warning("cold stop: gave back %d claim(s)", n)
        except Exception:
            log.exception("cold stop: could not give the claims back (they are requeued at the next start)")
        _remove_pidfile(self.home)
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                h.flush()
        os._exit(EXIT_COLD)


# ------------------------------------------------- APScheduler jobs (module level)
def start_job(daemon: Daemon) -> None:
    daemon.model_job("start", lambda: None)


def inbox_job(daemon: Daemon) -> None:
    daemon.model_job("inbox", daemon.poll_inbox)


def wake_job(daemon: Daemon) -> None:
    daemon.model_job("wake", daemon.wake_once)


def sleep_job(daemon: Daemon) -> None:
    daemon.model_job("sleep", daemon.sleep_if_due)


def heartbeat_job(daemon: Daemon) -> None:
    daemon.beat()


class _ExpectedSkips(logging.Filter):
    """With one model thread, a tick that comes while the model is busy is skipped or
    late by design (coalesce=True, max_instances=1): not worth a warning each time."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "maximum number of running instances reached" not in msg and "was missed by" not in msg


def _quiet_apscheduler() -> None:
    for name in ("apscheduler.scheduler", f"apscheduler.executors.{MODEL_EXECUTOR}", "apscheduler.executors.default"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedSkips) for f in logger.filters):
            logger.addFilter(_ExpectedSkips())


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    n = 1
    while target.exists():
        n += 1
        p = Path(name)
        target = folder / f"{p.stem}-{n}{p.suffix}"
    return target


# ------------------------------------------------------------ one daemon per home
def pid_info(home: Home, cfg: Config) -> dict:
    """What daemon.pid says about the daemon holding the lock."""
    return {"pid": os.getpid(), "started_at": time.time(), "host": socket.gethostname(), "home": str(home.root),
            "model": cfg.model.path or "SmolLM2-135M-Instruct (default)", "log": str(home.logs / LOG_NAME)}


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
        _remove_pidfile(self.home)
        os.close(self.fd)  # drops the lock
        self.fd = None

    def __enter__(self) -> DaemonLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _remove_pidfile(home: Home) -> None:
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


def start_detached(home: Home, cli_args: list[str], wait_s: float = 60.0) -> dict:
    """Start ``python -m agent.cli <cli_args> daemon run`` in its own session, output to
    the log; return its pidfile once it has loaded its model (``ready``: True), or
    after ``wait_s`` if it is still loading (``ready``: False). Raises DaemonError
    with the last line of the log if it exits meanwhile."""
    home.ensure()
    log_path = home.logs / LOG_NAME
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    project = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = project + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *cli_args, "daemon", "run", "--detached"],
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
    """Whether the daemon started at ``since`` has written a heartbeat past 'starting'."""
    if not home.store_file.exists():
        return False
    try:
        with Store(home.store_file) as store:
            beat, activity = store.get_state(STATE_HEARTBEAT), store.get_state(STATE_ACTIVITY)
    except sqlite3.Error:
        return False
    return bool(beat) and float(beat) >= since and activity not in (None, "starting")


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


def daemon_status(home: Home, now: float | None = None) -> dict:
    """Everything `seal daemon status` shows; reads only (creates no store)."""
    now = time.time() if now is None else now
    info = running(home)
    out: dict = {"running": info is not None, "home": str(home.root), "log": str(home.logs / LOG_NAME),
                 "pid": None, "host": None, "started_at": None, "uptime_s": None, "model": None}
    if info:
        out.update({k: info.get(k) for k in ("pid", "host", "started_at", "model")})
        out["uptime_s"] = now - info["started_at"] if info.get("started_at") else None
    out.update({"active_adapter": None, "queue": None, "heartbeat_at": None, "heartbeat_age_s": None,
                "activity": None, "next_sleep": None, "last_sleep_at": None})
    if home.store_file.exists():
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

"""The daemon's loop: the inbox, the wake cycle and the sleep phase as a long-running service.

One round of the loop (``Daemon.step``) polls the inbox, runs one wake cycle if work
is queued, and sleeps if the schedule says a sleep is due; ``run_burst`` repeats rounds
until nothing is left to do, then returns (rq's ``work(burst=True)``); ``serve`` runs
the same pieces as APScheduler 3.x jobs until it is told to stop. The clock, the
Learner and the sleep function are passed in, so tests step the loop with a fake clock
and no real waiting.

What the daemon guarantees, and how:

- one daemon per home (``agent.daemon.process``: a lock held for the life of the process);
- nothing in memory is the truth: the last sleep and the commits since it are read
  from the store each time, so a restart (or a sleep the machine missed) asks again;
- a warm stop (first SIGTERM/SIGINT) abandons the current wake cycle at its next
  claim heartbeat (the claim goes back without counting an attempt) or lets the sleep
  function stop itself; a second signal stops at once (claim given back, ``os._exit``);
- at start, claims of dead workers go back to the queue and half-written adapter
  folders are removed (``Learner.recover``): work interrupted by kill -9 resumes.

The model is used by one job at a time: every job that touches it runs on an executor
with a single worker thread (the same thread that loaded it, since sqlite connections
belong to their thread); only the status writer runs beside it, on its own connection.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from adapters.names import KNOWLEDGE
from policies import schedule as schedules
from policies.schedule import ScheduleConfig
from store import Store

from ..events import log_lines
from ..home import Home
from ..learner import Learner, worker_id
from ..wake import CycleReport, StopRequested, learn
from .config import DaemonConfig
from .inbox import Inbox, InboxResult
from .process import STATE_ACTIVITY, STATE_HEARTBEAT, STATE_NEXT_SLEEP, remove_pidfile

log = logging.getLogger(__name__)

MODEL_EXECUTOR = "model"
EXIT_COLD = 1  # the exit status of a cold stop (a warm stop exits 0)

# (learner, *, trigger: str, should_stop: () -> bool, on_event: (Event) -> None) -> report;
# the report's ``outcome`` (if it has one) is logged and returned in SleepRun.
SleepFn = Callable[..., object]
# (path, tokenizer) -> documents: how an inbox file is read (as `seal ingest FILE` reads it)
ReadFn = Callable[[Path, object], list]


# ------------------------------------------------------------------------- reports
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


# -------------------------------------------------------------------------- daemon
class Daemon:
    """The loop, given only what it needs: its settings (``cfg``), the sleep
    ``schedule``, a ``learner_factory`` (called on first use, in the thread that will
    use the learner), the sleep function, how an inbox file is ``read``, and a
    ``clock``; ``settings`` (the resolved config, as rows) are logged at start.
    ``agent.app.build_daemon`` builds one from the root config. ``handle_signals``
    installs the SIGTERM/SIGINT handlers (main thread only; the CLI turns it on)."""

    def __init__(self, home: Home, cfg: DaemonConfig, schedule: ScheduleConfig, *,
                 learner_factory: Callable[[], Learner], sleep_fn: SleepFn, read: ReadFn,
                 clock: Callable[[], float] = time.time, settings: Iterable[tuple[str, object]] = (),
                 handle_signals: bool = False, api: Callable[[Daemon], object] | None = None):
        self.home, self.cfg, self.schedule, self.clock = home, cfg, schedule, clock
        self._learner: Learner | None = None
        self._factory, self._sleep_fn, self._read = learner_factory, sleep_fn, read
        self.settings = list(settings)
        self.inbox = Inbox(home.inbox, cfg.inbox_settle_s)
        self._handle_signals = handle_signals
        self._api = api  # starts the HTTP API beside the scheduler (agent.api.service); returns it, with .stop()
        self.worker = worker_id()
        self._stop = threading.Event()
        self._model_lock = threading.Lock()  # held while a job uses the model
        self._closed = False
        self._started = False
        self._sleep_blocked_until = float("-inf")
        self._wake_blocked_until = float("-inf")  # after a temporary fault: back off
        self.activity = "starting"
        self.fatal: BaseException | None = None

    # ------------------------------------------------------------------ basics
    @property
    def learner(self) -> Learner:
        if self._learner is None:
            self._learner = self._factory()
        return self._learner

    @property
    def model_lock(self) -> threading.Lock:
        """Held by every job that uses the model; the API's desk takes it too."""
        return self._model_lock

    def loaded_learner(self) -> Learner | None:
        """The Learner once the model is loaded and recovered (``start`` done), else None."""
        return self._learner if self._started and not self._closed else None

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
        log.info("seal daemon %s starting on %s", self.worker, self.home.root)
        for key, value in self.settings:
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
        cycle = self.wake_once(now)
        slept = self.sleep_if_due(now)
        self.beat(now)
        return StepReport(inbox, cycle, slept)

    def wake_once(self, now: float | None = None) -> CycleReport | None:
        """Learn the next pending passage, if any (one wake cycle). After a temporary
        fault (a ``deferred`` cycle), nothing is learned for ``fault_backoff_s``."""
        now = self._now(now)
        if self.stopping or now < self._wake_blocked_until or not self.learner.store.queue_summary()["pending"]:
            return None

        def progress(msg: str) -> None:
            self.activity = f"learning: {msg}"
            log.info(msg)

        self.activity = "learning"
        try:
            reports = learn(self.learner, max_passages=1, on_event=log_lines(progress), should_stop=self._stop.is_set,
                            recover=False)  # start() recovered, and the writer lock keeps any other worker out
        finally:
            self.activity = "idle"
        for r in reports:
            log.info("%s passage %s %r %s: %s", r.outcome, r.passage_id, r.title, r.adapter_id or "", r.reason)
            if r.outcome == "deferred":
                self._wake_blocked_until = now + self.cfg.fault_backoff_s
                log.warning("temporary fault: learning again in %.0f s", self.cfg.fault_backoff_s)
        if any(r.adapter_id for r in reports):
            self.prune()
        return reports[0] if reports else None

    def prune(self) -> None:
        """Keep the disk bounded: remove the files of wake versions beyond the
        ``keep_versions`` newest and of checkpoints beyond the ``keep_sleeps`` newest
        (``AdapterRegistry.prune``: the active version and the parents of the kept
        checkpoints stay; rows stay in the store). A failure is logged, not fatal: the
        next cycle tries again."""
        if not self.cfg.keep_versions:
            return
        try:
            plan = self.learner.registry.prune(self.cfg.keep_versions, self.cfg.keep_sleeps)
        except Exception:
            log.exception("automatic prune failed")
            return
        if plan.remove:
            log.info("pruned %d adapter versions (%d bytes), keeping the %d newest and %d checkpoints",
                     len(plan.remove), plan.bytes, self.cfg.keep_versions, self.cfg.keep_sleeps)

    def next_sleep(self, now: float | None = None, store: Store | None = None) -> schedules.Due:
        now = self._now(now)
        if now < self._sleep_blocked_until:
            return schedules.Due(False, self._sleep_blocked_until, "retrying after a sleep that did not finish")
        return schedules.due(self.schedule, store or self.learner.store, now)

    def sleep_if_due(self, now: float | None = None) -> SleepRun | None:
        """Sleep if the schedule (asked with the store's truth) says a sleep is due."""
        if self.stopping:
            return None
        now = self._now(now)
        due = self.next_sleep(now)
        if not due.due:
            return None
        return self.sleep(self.schedule.policy, due.reason, now)

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
            self._sleep_blocked_until = now + self.cfg.sleep_retry_s
            log.warning("the sleep recorded no report (%s): next try in %.0f s", outcome, self.cfg.sleep_retry_s)
        seconds = time.perf_counter() - t0
        log.info("sleep %s in %.1f s: %s", outcome, seconds, error or getattr(result, "reason", result))
        self.prune()
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
        """Ingest every settled file in <home>/inbox, then move it to inbox/done/ or
        inbox/failed/ (``agent.daemon.inbox``)."""
        if self.stopping:
            return []

        def read(path: Path) -> list:
            return self._read(path, self.learner.runtime.tokenizer)

        def doing(what: str) -> None:
            self.activity = what

        return self.inbox.poll(read, lambda docs: self.learner.store.ingest(docs), self._stop.is_set, doing)

    # ------------------------------------------------------------------- status
    def beat(self, now: float | None = None) -> None:
        """Write the status: alive at ``now``, what the daemon is doing, and the next
        sleep, to the store's state table (every ``status_every_s``; its own connection:
        it runs beside the model's thread)."""
        now = self._now(now)
        try:
            with Store(self.home.store_file) as store:
                due = self.next_sleep(now, store)
                with store.db.atomic():  # one commit, not three
                    store.set_state(STATE_HEARTBEAT, repr(float(now)))
                    store.set_state(STATE_ACTIVITY, self.activity)
                    store.set_state(STATE_NEXT_SLEEP, json.dumps({"at": due.next_at, "due": due.due, "reason": due.reason}))
        except Exception:  # writing the status must never take the daemon down
            log.exception("writing the status failed")

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

        d = self.cfg
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
            sched.add_job(heartbeat_job, "interval", seconds=d.status_every_s, id="seal.heartbeat", executor="default",
                          next_run_time=now, **common)
            sched.start()
            api = None
            if self._api is not None:
                try:
                    api = self._api(self)
                except Exception as e:  # the port is taken, a public address without --public
                    log.error("%s", e)
                    self.fatal = e
                    self._stop.set()
            while not self._stop.wait(0.2):  # signal handlers run in this (main) thread
                pass
            if api is not None:
                api.stop()
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
        remove_pidfile(self.home)
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


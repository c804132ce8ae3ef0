"""The daemon: the steppable loop in-process (tiny model, injected clock, fake or real
sleep), and real daemon processes (start/status/stop, one per home, the inbox, a warm
stop, kill -9 mid-cycle and mid-sleep, then a restart)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adapters import files, lora
from adapters.names import KNOWLEDGE
from agent.app import inbox_reader, sleeper
from agent.config import Config
from agent.daemon.config import DaemonConfig
from agent.daemon.loop import Daemon
from agent.daemon.process import (
    AlreadyRunning,
    DaemonLock,
    daemon_status,
    pid_info,
    read_pidfile,
    running,
    stop_daemon,
)
from agent.home import Home
from policies.config import PolicyConfig
from policies.schedule import ScheduleConfig
from store import Store
from tests.helpers import (
    ALWAYS,
    BRISK,
    FAST_WAKE,
    LEARNER_LORA,
    VARN,
    file_sha,
    make_learner,
    record,
    run_cli,
    seal_argv,
    start_cli,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def drop(home: Path, name: str, content: str | bytes, age_s: float = 120.0) -> Path:
    """Put a file in the inbox, its mtime ``age_s`` in the past (settled)."""
    inbox = home / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    p = inbox / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


class Clock:
    def __init__(self, t: float | None = None):
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t


class FakeSleep:
    """Records each call and a sleep report in the store, like the real one."""

    def __init__(self, fail: bool = False):
        self.calls: list[dict] = []
        self.fail = fail

    def __call__(self, learner, *, trigger, should_stop, on_event=None):
        store = learner.store
        self.calls.append({"trigger": trigger, "commits": store.commits_since(None), "stop": should_stop()})
        if self.fail:
            raise RuntimeError("the sleep broke")
        store.record_sleep({"started_at": time.time(), "trigger": trigger, "policy": "replay",
                            "outcome": "skipped", "reason": "fake"})
        return SimpleNamespace(outcome="skipped", reason="fake")


def config(**sections) -> Config:
    base = {"lora": LEARNER_LORA, "wake": FAST_WAKE, "policies": ALWAYS,
            "schedule": ScheduleConfig(policy="never"), "daemon": DaemonConfig()}
    return Config(**{**base, **sections})


def daemon(tokenizer, home: Path, cfg: Config | None = None, policies: PolicyConfig = ALWAYS, learner=None,
           sleep_fn=None, **kw) -> Daemon:
    """A daemon as agent.app.build_daemon wires it, on a tiny model's learner."""
    cfg = cfg or config()
    learner = learner or make_learner(tokenizer, home, policies=policies)
    return Daemon(Home(home), cfg.daemon, cfg.schedule, learner_factory=lambda: learner,
                  sleep_fn=sleep_fn or sleeper(cfg), read=inbox_reader(cfg), **kw)


# ----------------------------------------------------------------- in-process loop
def test_a_burst_ingests_the_inbox_like_seal_ingest_and_learns_it(tokenizer, home, tmp_path, seal):
    drop(home, "varn.json", json.dumps(record(*VARN)))
    drop(home, "broken.jsonl", '{"title": "x", "context": "fine"}\n{"title": oops}\n')
    drop(home, "notes.pdf", b"%PDF-1.4")
    drop(home, ".hidden.md", "# Secret\nnot for the daemon\n")
    drop(home, "download.md.part", "# Half\nstill coming\n")
    fresh = drop(home, "fresh.md", "# Fresh\nJust written, maybe still being written.\n", age_s=0)
    (home / "inbox" / "subfolder").mkdir()
    d = daemon(tokenizer, home, config(daemon=DaemonConfig(inbox_settle_s=60)), sleep_fn=FakeSleep())
    r = d.run_burst()

    by_name = {i.name: i for i in r.inbox}
    assert set(by_name) == {"varn.json", "broken.jsonl", "notes.pdf"}
    assert by_name["varn.json"].outcome == "ingested" and "1 passage(s)" in by_name["varn.json"].detail
    inbox = home / "inbox"
    assert (inbox / "done" / "varn.json").is_file() and not (inbox / "done" / "varn.json.reason.txt").exists()
    # the same one-line errors as `seal ingest`, written beside the file
    other = tmp_path / "other"
    for name in ("broken.jsonl", "notes.pdf"):
        assert by_name[name].outcome == "failed"
        reason = (inbox / "failed" / f"{name}.reason.txt").read_text().strip()
        assert (inbox / "failed" / name).is_file()
        copy = tmp_path / name
        copy.write_bytes((inbox / "failed" / name).read_bytes())
        cli = seal("--home", other, "ingest", copy)
        assert cli.exit_code == 1
        assert cli.output.strip() == "Error: " + reason.replace(str(inbox / name), str(copy))
    assert "line 2" in (inbox / "failed" / "broken.jsonl.reason.txt").read_text()
    # left alone: dotfiles, partial downloads, a file still being written, folders
    assert sorted(p.name for p in inbox.iterdir()) == [".hidden.md", "done", "download.md.part", "failed",
                                                         "fresh.md", "subfolder"]
    assert fresh.is_file()

    store = d.learner.store
    assert store.queue_summary() == {"pending": 0, "claimed": 0, "done": 1, "failed": 0}
    (cycle,) = r.cycles
    assert cycle.outcome == "committed" and store.active_adapter_id(KNOWLEDGE) == cycle.adapter_id
    assert r.sleeps == [] and not r.stopped

    # the same content again: a duplicate, moved to done/ with a note; nothing queued
    drop(home, "varn.json", json.dumps(record(*VARN)))
    r = d.run_burst()
    assert [(i.name, i.outcome) for i in r.inbox] == [("varn.json", "duplicate")]
    assert "duplicate" in (inbox / "done" / "varn-2.json.reason.txt").read_text()
    assert r.cycles == [] and store.queue_summary()["done"] == 1


@pytest.mark.slow
def test_the_schedule_fires_a_sleep_after_n_commits_with_an_injected_clock(tokenizer, home):
    clock = Clock()
    fake = FakeSleep()
    cfg = config(schedule=ScheduleConfig(policy="commits", every_commits=2))
    d = daemon(tokenizer, home, cfg, sleep_fn=fake, clock=clock)
    for i, (title, text, qas) in enumerate([VARN, BRISK, ("Gull Rock", "Gull Rock is a rock near Varn. It is 12 metres tall.",
                                                          [("How tall is Gull Rock?", "12 metres")])]):
        drop(home, f"{i}.json", json.dumps(record(title, text, qas)))
    store = d.learner.store

    def next_sleep():
        return json.loads(store.get_state("daemon.next_sleep"))

    s = d.step()  # ingests the three files, learns the first passage
    assert len(s.inbox) == 3 and s.cycle.outcome == "committed" and s.sleep is None and fake.calls == []
    assert next_sleep() == {"at": None, "due": False, "reason": "after 1 more commit(s)"}
    assert float(store.get_state("daemon.heartbeat")) == clock.t
    clock.t += 1
    s = d.step()  # the second commit: the sleep is due, and runs in the same step
    assert s.cycle.outcome == "committed"
    assert s.sleep is not None and s.sleep.trigger == "commits" and s.sleep.outcome == "skipped"
    assert fake.calls == [{"trigger": "commits", "commits": 2, "stop": False}]
    assert next_sleep()["reason"] == "after 2 more commit(s)"
    clock.t += 1
    s = d.step()
    assert s.cycle.outcome == "committed" and s.sleep is None and len(fake.calls) == 1
    assert d.step().idle
    assert len(store.sleeps()) == 1


def test_a_failed_sleep_is_retried_after_sleep_retry_s(tokenizer, home):
    clock = Clock()
    fake = FakeSleep(fail=True)
    cfg = config(schedule=ScheduleConfig(policy="commits", every_commits=1), daemon=DaemonConfig(sleep_retry_s=600))
    d = daemon(tokenizer, home, cfg, sleep_fn=fake, clock=clock)
    drop(home, "varn.json", json.dumps(record(*VARN)))
    s = d.step()
    assert s.cycle.outcome == "committed" and s.sleep.outcome == "failed" and "the sleep broke" in s.sleep.error
    assert d.learner.store.active_adapter_id(KNOWLEDGE) == s.cycle.adapter_id  # the wake commit stands
    clock.t += 599
    assert d.step().idle and len(fake.calls) == 1  # not hammered
    assert json.loads(d.learner.store.get_state("daemon.next_sleep"))["at"] == clock.t + 1
    clock.t += 1
    assert d.step().sleep.outcome == "failed" and len(fake.calls) == 2


def test_a_temporary_fault_defers_the_passage_and_the_daemon_backs_off(tokenizer, home, monkeypatch):
    """A full disk while learning is the machine's fault, not the passage's: the job
    goes back uncounted, and the daemon waits fault_backoff_s before trying again."""
    import agent.wake as wake

    clock = Clock()
    d = daemon(tokenizer, home, config(daemon=DaemonConfig(fault_backoff_s=60)), sleep_fn=FakeSleep(), clock=clock)
    drop(home, "varn.json", json.dumps(record(*VARN)))
    real = wake.wake_cycle
    faults = []

    def full_disk(*a, **kw):
        faults.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wake, "wake_cycle", full_disk)
    s = d.step()
    assert s.cycle.outcome == "deferred" and "No space left on device" in s.cycle.reason
    (job,) = d.learner.store.jobs()
    assert (job["state"], job["attempts"]) == ("pending", 0) and job["error"].startswith("deferred (temporary)")
    clock.t += 59
    assert d.step().cycle is None and len(faults) == 1  # backing off
    monkeypatch.setattr(wake, "wake_cycle", real)
    clock.t += 1
    assert d.step().cycle.outcome == "committed"


def test_a_warm_stop_mid_cycle_gives_the_claim_back_without_counting_it(tokenizer, home):
    d = daemon(tokenizer, home, sleep_fn=FakeSleep())
    store = d.learner.store
    drop(home, "varn.json", json.dumps(record(*VARN)))
    assert d.poll_inbox()[0].outcome == "ingested"
    learner = d.learner
    zero = learner.zero
    trial = learner.trial
    seen = []

    def trial_then_stop(examples, seed, progress=None, epochs=None):
        result = trial(examples, seed, progress, epochs)
        # the trial wrote weights; then SIGTERM arrives (the daemon's handler does this)
        lora.copy_adapter(learner.model, "trial", KNOWLEDGE)  # dirty the live adapter too
        seen.append(store.jobs(limit=5)[0])
        d.request_stop()
        return result

    learner.trial = trial_then_stop
    assert d.wake_once() is None  # abandoned at the next heartbeat
    assert seen[0]["state"] == "claimed" and seen[0]["attempts"] == 1
    (job,) = store.jobs(limit=5)
    assert (job["state"], job["attempts"], job["claimed_by"]) == ("pending", 0, None)
    assert store.cycles() == [] and store.adapters() == []
    assert store.events(kind="release")
    # the live knowledge adapter is the store's active one again (none: the base model)
    now = lora.snapshot(learner.model, KNOWLEDGE)
    assert all(torch.equal(now[k], zero[k]) for k in zero)
    # stopped: nothing new starts
    assert d.step().idle and store.queue_summary()["pending"] == 1

    learner.trial = trial
    again = daemon(tokenizer, home, learner=learner, sleep_fn=FakeSleep())
    r = again.run_burst()
    assert [c.outcome for c in r.cycles] == ["committed"]
    (job,) = store.jobs(limit=5)
    assert (job["state"], job["attempts"]) == ("done", 1)


def test_a_second_signal_stops_cold_and_gives_the_claim_back(tokenizer, home, monkeypatch):
    d = daemon(tokenizer, home, sleep_fn=FakeSleep())
    store = d.learner.store
    drop(home, "varn.json", json.dumps(record(*VARN)))
    d.poll_inbox()
    assert store.claim_next(d.worker).attempts == 1  # the daemon is mid-cycle

    class Exited(BaseException):
        pass

    codes = []

    def exit_(code):
        codes.append(code)
        raise Exited

    monkeypatch.setattr(os, "_exit", exit_)
    d._on_signal(signal.SIGTERM, None)
    assert d.stopping and codes == []  # the first: warm
    with pytest.raises(Exited):
        d._on_signal(signal.SIGINT, None)  # the second: at once
    assert codes == [1]
    (job,) = store.jobs(limit=5)
    assert (job["state"], job["attempts"], job["claimed_by"]) == ("pending", 0, None)
    assert store.get_state("daemon.activity") == "stopped (cold)"


@pytest.mark.slow
def test_the_real_sleep_phase_runs_when_due_and_is_recorded(tokenizer, home):
    """The default sleep function (agent.sleep.sleep_phase) as the daemon calls it."""
    from agent.sleep import SleepConfig

    cfg = config(schedule=ScheduleConfig(policy="commits", every_commits=1),
                 sleep=SleepConfig(epochs=1, dreams=0, restem=False))
    d = daemon(tokenizer, home, cfg)
    drop(home, "varn.json", json.dumps(record(*VARN)))
    r = d.run_burst()
    assert [c.outcome for c in r.cycles] == ["committed"]
    (s,) = r.sleeps
    assert s.trigger == "commits" and s.outcome in ("kept", "rolled_back", "skipped"), s
    (row,) = d.learner.store.sleeps()
    assert row["trigger"] == "commits" and row["outcome"] == s.outcome
    assert not d.next_sleep().due  # recorded in the store: not due again


def test_heartbeat_and_status_read_the_store(tokenizer, home):
    d = daemon(tokenizer, home, config(schedule=ScheduleConfig(policy="commits", every_commits=3)))
    d.start()
    d.activity = "idle"
    d.beat(now=1000.0)
    s = daemon_status(Home(home), now=1010.0)
    assert s["running"] is False and s["pid"] is None
    assert s["heartbeat_at"] == 1000.0 and s["heartbeat_age_s"] == 10.0 and s["activity"] == "idle"
    assert s["next_sleep"] == {"at": None, "due": False, "reason": "after 3 more commit(s)"}
    assert s["queue"] == {"pending": 0, "claimed": 0, "done": 0, "failed": 0} and s["active_adapter"] is None



def test_the_daemon_prunes_old_versions_by_itself_and_status_shows_disk_use(tokenizer, home):
    # months unattended: each learned passage is a new ~MB adapter version; the daemon
    # keeps the newest keep_versions (and the active one) and removes the others' files
    cfg = config(daemon=DaemonConfig(keep_versions=2))
    gull = ("Gull Rock", "Gull Rock is a rock near Varn. It is 12 metres tall.", [("How tall is Gull Rock?", "12 metres")])
    for i, rec in enumerate([VARN, BRISK, gull]):
        drop(home, f"{i}.json", json.dumps(record(*rec)))
    d = daemon(tokenizer, home, cfg, sleep_fn=FakeSleep())
    r = d.run_burst()
    assert [c.outcome for c in r.cycles] == ["committed"] * 3
    store = d.learner.store
    rows = {a["id"]: a for a in store.adapters() if a["kind"] == "wake"}
    assert len(rows) == 3
    live = sorted(i for i, a in rows.items() if a["status"] != "pruned")
    assert len(live) == 2 and store.active_adapter_id(KNOWLEDGE) in live
    (gone,) = set(rows) - set(live)
    assert not (home / "adapters" / rows[gone]["path"]).exists()
    assert all((home / "adapters" / rows[i]["path"]).is_dir() for i in live)
    assert d.learner.registry.verify(store.active_adapter_id(KNOWLEDGE)) is None

    s = daemon_status(Home(home))
    disk = s["disk"]
    assert disk["adapters"] > 0 and disk["store"] > 0
    assert disk["total"] >= disk["adapters"] + disk["store"]
    on_disk = sum(f.stat().st_size for f in (home / "adapters").rglob("*") if f.is_file())
    assert disk["adapters"] == on_disk


def test_keep_versions_zero_keeps_every_version(tokenizer, home):
    for i, rec in enumerate([VARN, BRISK]):
        drop(home, f"{i}.json", json.dumps(record(*rec)))
    d = daemon(tokenizer, home, config(daemon=DaemonConfig(keep_versions=0)), sleep_fn=FakeSleep())
    d.run_burst()
    assert [a["status"] for a in d.learner.store.adapters() if a["kind"] == "wake"].count("pruned") == 0


def test_seal_daemon_start_waits_for_a_status_of_a_daemon_that_runs(home):
    """A daemon that could not load its model writes 'stopping', then 'stopped: ...',
    before it exits: `seal daemon start` must wait for the exit, not call it started."""
    from agent.daemon.process import STATE_ACTIVITY, STATE_HEARTBEAT, _ready

    h = Home(home)
    assert not _ready(h, 999.0)  # no store yet
    with Store(h.store_file) as store:
        store.set_state(STATE_HEARTBEAT, "1000.0")
        for activity, ready in (("starting", False), ("idle", True), ("learning: step 1/4", True),
                                ("stopping", False), ("stopped: ModelError: no model", False)):
            store.set_state(STATE_ACTIVITY, activity)
            assert _ready(h, 999.0) is ready, activity
        store.set_state(STATE_ACTIVITY, "idle")
    assert not _ready(h, 1001.0)  # a status written before this start

def test_one_lock_per_home(home, tmp_path):
    h = Home(home)
    first = DaemonLock(h)
    first.acquire(pid_info(h))
    try:
        assert running(h)["pid"] == os.getpid() == read_pidfile(h)["pid"]
        with pytest.raises(AlreadyRunning, match=re.escape(f"already runs on {home}: pid {os.getpid()}, started ")):
            DaemonLock(h).acquire(pid_info(h), retry_s=0.1)
        other = DaemonLock(Home(tmp_path / "elsewhere"))  # another home: its own lock
        other.acquire(pid_info(other.home))
        other.release()
    finally:
        first.release()
    assert running(h) is None and read_pidfile(h) is None
    assert daemon_status(h)["running"] is False


def test_learn_and_sleep_refuse_beside_a_running_daemon(home, seal):
    h = Home(home)
    lock = DaemonLock(h)
    lock.acquire(pid_info(h))
    try:
        for command in ("learn", "sleep"):
            r = seal(command)
            assert r.exit_code == 1, r.output
            assert f"a seal daemon runs on this home (pid {os.getpid()})" in r.output
            assert len(r.output.strip().splitlines()) == 1
    finally:
        lock.release()
    assert seal("learn").exit_code == 0  # no daemon: an empty queue is simply reported


# ------------------------------------------------------------------- real processes
DAEMON_FLAGS = [
    "--set", "daemon.wake_poll_s=0.2", "--set", "daemon.inbox_poll_s=0.2", "--set", "daemon.sleep_poll_s=0.2",
    "--set", "daemon.status_every_s=0.2", "--set", "daemon.inbox_settle_s=0.2", "--set", "schedule.policy=never",
    "--set", "policies.min_gain=-1e9",
]


def _cli(home: Path, tiny_dir: Path, *args: str) -> list[str]:
    return seal_argv(home, tiny_dir, *DAEMON_FLAGS, *args, verbose=False)


def _run(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    return run_cli(cmd, ok=ok, timeout=120)


def _wait(what, timeout: float = 60.0, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what.__name__}\n{tail}")
        time.sleep(0.1)


def _kill(home: Path) -> None:
    """Leave no daemon behind, whatever the test did."""
    info = read_pidfile(Home(home))
    if info and running(Home(home)):
        os.kill(info["pid"], signal.SIGKILL)
        _wait(lambda: running(Home(home)) is None, 10)


def _store(home: Path) -> Store:
    return Store(home / "store.db")


def _intact(home: Path, active: str | None) -> None:
    with _store(home) as store:
        assert store.active_adapter_id(KNOWLEDGE) == active
        if active:
            row = store.adapter(active)
            assert row["sha256"] == file_sha(home / "adapters" / row["path"])
            assert (home / "adapters" / row["path"] / files.CONFIG_NAME).is_file()
        known = {a["path"] for a in store.adapters()}
    on_disk = {p.name for p in (home / "adapters").iterdir() if not p.name.startswith(".tmp-")}
    assert on_disk <= known | set(), "a folder the store does not know"


@pytest.mark.process
def test_a_real_daemon_starts_learns_its_inbox_reports_status_and_stops(home, tiny_dir):
    log = home / "logs" / "daemon.log"
    try:
        r = _run(_cli(home, tiny_dir, "daemon", "start"))
        info = read_pidfile(Home(home))
        assert r.stdout.strip() == f"seal daemon started: pid {info['pid']}, log {log}"
        assert info["home"] == str(home) and info["model"] == str(tiny_dir)

        # a second daemon on the same home is refused, in one line naming the holder
        for args in (("daemon", "start"), ("daemon", "run")):
            second = _run(_cli(home, tiny_dir, *args), ok=False)
            assert second.returncode == 1
            lines = [ln for ln in (second.stdout + second.stderr).splitlines() if ln.strip()]
            assert len(lines) == 1 and f"already runs on {home}: pid {info['pid']}, started" in lines[0], lines

        drop(home, "varn.json", json.dumps(record(*VARN)), age_s=0)

        def learned():
            with _store(home) as s:
                return s.queue_summary()["done"] == 1 and s.active_adapter_id(KNOWLEDGE)

        active = _wait(learned, 60, log)
        assert (home / "inbox" / "done" / "varn.json").is_file()

        st = _run(_cli(home, tiny_dir, "daemon", "status", "--json"))
        s = json.loads(st.stdout)
        assert s["running"] and s["pid"] == info["pid"] and s["model"] == str(tiny_dir)
        assert s["active_adapter"] == active and s["queue"]["done"] == 1
        assert s["heartbeat_age_s"] is not None and s["heartbeat_age_s"] < 30 and s["uptime_s"] > 0
        assert s["next_sleep"]["reason"].startswith("schedule.policy = never")
        text = _run(_cli(home, tiny_dir, "daemon", "status")).stdout
        assert f"running, pid {info['pid']}" in text and active in text and "1 done" in text

        stop = _run(_cli(home, tiny_dir, "daemon", "stop"))
        assert stop.stdout.strip() == f"seal daemon stopped (warm): pid {info['pid']}"
        assert running(Home(home)) is None and read_pidfile(Home(home)) is None
        st = _run(_cli(home, tiny_dir, "daemon", "status"), ok=False)
        assert st.returncode == 3 and "not running" in st.stdout
        again = _run(_cli(home, tiny_dir, "daemon", "stop"), ok=False)
        assert again.returncode == 1 and "no seal daemon runs" in again.stderr
        text = log.read_text()
        assert "config schedule.policy = 'never'" in text and "inbox: ingested varn.json" in text
    finally:
        _kill(home)


@pytest.mark.process
def test_a_daemon_that_cannot_load_its_model_fails_to_start_in_one_line(home, tmp_path):
    cmd = [sys.executable, "-m", "agent.cli", "--home", str(home), "--model", str(tmp_path / "missing"), "daemon", "start"]
    r = _run(cmd, ok=False)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("Error: the daemon exited at start (status 1): ") and "missing' does not exist" in lines[0]
    assert running(Home(home)) is None and read_pidfile(Home(home)) is None


@pytest.mark.process
def test_stop_now_stops_a_busy_daemon_cold(home, tiny_dir):
    """`seal daemon stop --now` (stop_daemon(now=True)) on a daemon that is busy loading
    its model: the first SIGTERM asks for a warm stop, the second ends it at once."""
    log = home / "logs" / "daemon.log"
    proc = start_cli(_cli(home, tiny_dir, "daemon", "run"), stderr=subprocess.DEVNULL)
    try:
        def loading():
            return log.exists() and "starting on" in log.read_text()

        _wait(loading, 60, log)
        pid, how = stop_daemon(Home(home), timeout_s=60, now=True)
        assert (pid, how) == (proc.pid, "cold")
        assert proc.wait(timeout=20) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    text = log.read_text()
    assert "SIGTERM: stopping warm" in text and "SIGTERM again: stopping cold" in text
    assert "ready:" not in text  # it never finished loading
    assert running(Home(home)) is None and read_pidfile(Home(home)) is None


def _started_mid(home: Path, tiny_dir: Path, needle: str, *flags: str) -> int:
    """Start a daemon with slow steps; return its pid once ``needle`` is in its log."""
    log = home / "logs" / "daemon.log"
    _run(_cli(home, tiny_dir, *flags, "daemon", "start"))
    pid = read_pidfile(Home(home))["pid"]

    def reached():
        return log.exists() and needle in log.read_text()

    _wait(reached, 90, log)
    return pid


def _ingest(home: Path, tiny_dir: Path, *docs) -> None:
    folder = home.parent / "docs"
    folder.mkdir(exist_ok=True)
    for title, text, qas in docs:
        (folder / f"{title}.json").write_text(json.dumps(record(title, text, qas)), encoding="utf-8")
    _run(_cli(home, tiny_dir, "ingest", str(folder)))


@pytest.mark.process
def test_sigterm_mid_cycle_stops_warm_and_gives_the_claim_back(home, tiny_dir):
    _ingest(home, tiny_dir, VARN)
    try:
        pid = _started_mid(home, tiny_dir, "trial 1: passage", "--set", "lora.epochs=3000")
        stop = _run(_cli(home, tiny_dir, "daemon", "stop", "--timeout", "60"))
        assert stop.stdout.strip() == f"seal daemon stopped (warm): pid {pid}"
    finally:
        _kill(home)
    with _store(home) as store:
        (job,) = store.jobs(limit=5)
        assert (job["state"], job["attempts"], job["claimed_by"]) == ("pending", 0, None)
        assert store.cycles() == [] and store.adapters() == []
        assert store.get_state("daemon.activity") == "stopped"
    assert "gave back passage" in (home / "logs" / "daemon.log").read_text()


@pytest.mark.process
def test_kill_9_mid_cycle_then_restart_resumes_and_loses_nothing(home, tiny_dir):
    _ingest(home, tiny_dir, VARN, BRISK)
    _run(_cli(home, tiny_dir, "--set", "wake.candidates=1", "learn", "--max-passages", "1"))
    _intact(home, "knowledge-0001")
    with _store(home) as store:
        before = store.counts()
        second = next(j for j in store.jobs(limit=5) if j["state"] == "pending")["passage_id"]
    try:
        pid = _started_mid(home, tiny_dir, "trial 1: passage", "--set", "lora.epochs=3000")
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: running(Home(home)) is None, 10)
    finally:
        _kill(home)
    _intact(home, "knowledge-0001")
    with _store(home) as store:
        job = next(j for j in store.jobs(limit=5) if j["passage_id"] == second)
        assert (job["state"], job["attempts"]) == ("claimed", 1) and job["claimed_by"].endswith(f":{pid}")
        assert store.cycles(passage_id=second) == [] and store.candidates(second) == []
        assert {t: store.counts()[t] for t in ("documents", "passages", "questions")} == \
            {t: before[t] for t in ("documents", "passages", "questions")}

    r = _run(_cli(home, tiny_dir, "daemon", "run", "--burst"))  # restart: recover, then learn it
    assert "learned 1 of 1 passage(s)" in r.stdout
    with _store(home) as store:
        job = next(j for j in store.jobs(limit=5) if j["passage_id"] == second)
        assert (job["state"], job["attempts"]) == ("done", 2)
        (cycle,) = store.cycles(passage_id=second)
        assert cycle["outcome"] == "committed" and cycle["parent_adapter"] == "knowledge-0001"
        assert store.queue_summary() == {"pending": 0, "claimed": 0, "done": 2, "failed": 0}
    _intact(home, "knowledge-0002")
    assert not [p for p in (home / "adapters").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.process
def test_kill_9_mid_sleep_then_restart_keeps_the_committed_version_and_sleeps_again(home, tiny_dir):
    _ingest(home, tiny_dir, VARN)
    sleepy = ["--set", "schedule.policy=commits", "--set", "schedule.every_commits=1", "--set", "sleep.restem=false",
              "--set", "sleep.dreams=0"]
    try:
        pid = _started_mid(home, tiny_dir, "consolidating: ", *sleepy, "--set", "sleep.epochs=5000")
        with _store(home) as store:
            active = store.active_adapter_id(KNOWLEDGE)
            assert active == "knowledge-0001" and store.sleeps() == []
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: running(Home(home)) is None, 10)
    finally:
        _kill(home)
    _intact(home, "knowledge-0001")
    with _store(home) as store:
        assert store.sleeps() == [] and store.commits_since(store.last_sleep_at()) == 1

    r = _run(_cli(home, tiny_dir, *sleepy, "--set", "sleep.epochs=1", "daemon", "run", "--burst"))
    assert "1 sleep(s)" in r.stdout, r.stdout
    with _store(home) as store:
        (row,) = store.sleeps()
        assert row["trigger"] == "commits" and row["outcome"] in ("kept", "rolled_back", "skipped")
        assert row["parent_adapter"] == "knowledge-0001"
        active = store.active_adapter_id(KNOWLEDGE)
        assert active == (row["adapter_id"] if row["outcome"] == "kept" else "knowledge-0001")
    _intact(home, active)

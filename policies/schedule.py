"""When to sleep: the schedule policies, by name.

Each policy answers, for a given ``now`` (injectable, so tests need no real waiting)
and the store's truth (the last sleep, the commits since it, the last activity),
whether a sleep is due and when the next one will be. Nothing is kept in memory: a
daemon that restarts, or a scheduler that missed a run while the machine slept, asks
again and gets the same answer (so a sleep that was interrupted by a crash is due
again after the restart, because it recorded nothing).

A sleep consolidates what was learned since the last one, so the time-based policies
(interval, idle, cron) are due only once something was committed since the last sleep;
``commits`` counts those commits itself.

- ``never``: only ``seal sleep`` sleeps;
- ``commits``: after every ``every_commits`` wake commits;
- ``interval``: ``interval_s`` after the last sleep (or after the first commit, if it
  never slept); a sleep missed while the daemon was down runs once when it is back;
- ``idle``: once nothing was ingested or learned for ``idle_s``;
- ``cron``: at the times of a crontab expression; a fire time missed by more than
  ``misfire_grace_s`` (the daemon was down) is skipped, several missed ones count once.

Fire times of ``interval`` and ``cron`` come from APScheduler 3.x triggers
(``get_next_fire_time``), the same code that runs the daemon's jobs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from adapters.names import KNOWLEDGE

from .registry import Registry


@dataclass(frozen=True)
class ScheduleConfig:
    policy: str = field(default="commits", metadata={"help": "when to sleep: never | commits | interval | idle | cron"})
    every_commits: int = field(default=4, metadata={"help": "commits: sleep after this many wake commits"})
    interval_s: float = field(default=6 * 3600.0, metadata={"help": "interval: seconds from one sleep to the next"})
    idle_s: float = field(default=900.0, metadata={"help": "idle: sleep once nothing was ingested or learned for this long (s)"})
    cron: str = field(default="0 3 * * *", metadata={"help": "cron: crontab expression (minute hour day month weekday)"})
    timezone: str = field(default="", metadata={"help": "cron: time zone of the expression, e.g. Europe/Paris; empty = the local one"})
    misfire_grace_s: float = field(
        default=3600.0,
        metadata={"help": "cron: a fire time missed by more than this (daemon down) is skipped until the next one (s)"},
    )

    def __post_init__(self) -> None:
        SCHEDULES.get(self.policy)  # unknown: "unknown schedule policy 'x' (known: ...)"
        if self.every_commits < 1:
            raise ValueError(f"every_commits must be at least 1, got {self.every_commits}")
        for name in ("interval_s", "idle_s", "misfire_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        cron_trigger(self)  # a bad expression or time zone fails here, at load time


@dataclass(frozen=True)
class Due:
    """A policy's answer: is a sleep due now, and when is the next one (Unix time;
    ``now`` when due; None when it does not depend on the clock alone)."""

    due: bool
    next_at: float | None
    reason: str


class ScheduleStore(Protocol):
    """What a policy reads from the store (``store.Store`` has it)."""

    def last_sleep_at(self) -> float | None: ...

    def commits_since(self, at: float | None, name: str = KNOWLEDGE) -> int: ...

    def first_commit_since(self, at: float | None, name: str = KNOWLEDGE) -> float | None: ...

    def last_activity_at(self) -> float | None: ...


Policy = Callable[[ScheduleConfig, ScheduleStore, float], Due]


def _tz(cfg: ScheduleConfig) -> dt.tzinfo:
    if not cfg.timezone:
        return dt.datetime.now().astimezone().tzinfo or dt.UTC
    try:
        return ZoneInfo(cfg.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {cfg.timezone!r}") from None


def cron_trigger(cfg: ScheduleConfig) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(cfg.cron, timezone=_tz(cfg))
    except ValueError as e:
        raise ValueError(f"cron {cfg.cron!r}: {e}") from None


def _at(t: float, tz: dt.tzinfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz)


def _nothing_new(store: ScheduleStore, last: float | None) -> Due | None:
    if store.commits_since(last) == 0:
        return Due(False, None, "nothing learned since the last sleep" if last is not None else "nothing learned yet")
    return None


def never(cfg: ScheduleConfig, store: ScheduleStore, now: float) -> Due:
    return Due(False, None, "schedule.policy = never (seal sleep sleeps now)")


def commits(cfg: ScheduleConfig, store: ScheduleStore, now: float) -> Due:
    n = store.commits_since(store.last_sleep_at())
    if n >= cfg.every_commits:
        return Due(True, now, f"{n} commit(s) since the last sleep (sleeps every {cfg.every_commits})")
    return Due(False, None, f"after {cfg.every_commits - n} more commit(s)")


def interval(cfg: ScheduleConfig, store: ScheduleStore, now: float) -> Due:
    last = store.last_sleep_at()
    if (none := _nothing_new(store, last)) is not None:
        return none
    anchor = last if last is not None else store.first_commit_since(None)
    start = _at(anchor, dt.UTC)
    trigger = IntervalTrigger(seconds=cfg.interval_s, start_date=start, timezone=dt.UTC)
    nxt = trigger.get_next_fire_time(start, _at(now, dt.UTC)).timestamp()
    since = "the last sleep" if last is not None else "the first commit"
    if now >= nxt:
        return Due(True, now, f"{cfg.interval_s:g} s since {since}")
    return Due(False, nxt, f"{cfg.interval_s:g} s after {since}")


def idle(cfg: ScheduleConfig, store: ScheduleStore, now: float) -> Due:
    last = store.last_sleep_at()
    if (none := _nothing_new(store, last)) is not None:
        return none
    active = store.last_activity_at() or now
    nxt = active + cfg.idle_s
    if now >= nxt:
        return Due(True, now, f"idle for {now - active:.0f} s (sleeps after {cfg.idle_s:g} s)")
    return Due(False, nxt, f"after {cfg.idle_s:g} s without ingest or learning")


def cron(cfg: ScheduleConfig, store: ScheduleStore, now: float) -> Due:
    """Due when a fire time lies after the last sleep (or the first commit) and at
    most ``misfire_grace_s`` before now: the first fire time after
    max(anchor, now - grace) is at or before now."""
    trigger, tz = cron_trigger(cfg), _tz(cfg)
    last = store.last_sleep_at()
    nothing = _nothing_new(store, last)
    anchor = last if last is not None else store.first_commit_since(None)
    tick = dt.timedelta(microseconds=1)  # fire times strictly after a moment

    def first_after(t: float) -> float | None:
        f = trigger.get_next_fire_time(None, _at(t, tz) + tick)
        return f.timestamp() if f else None

    nxt = first_after(now)
    if nothing is not None:
        return Due(False, None, f"{nothing.reason}; then at the next '{cfg.cron}'")
    f = first_after(max(anchor, now - cfg.misfire_grace_s))
    if f is not None and f <= now:
        return Due(True, now, f"cron '{cfg.cron}' fired at {_at(f, tz):%Y-%m-%d %H:%M %Z}")
    return Due(False, nxt, f"cron '{cfg.cron}'")


SCHEDULES: Registry[Policy] = Registry("schedule policy", {
    "never": never,
    "interval": interval,
    "commits": commits,
    "idle": idle,
    "cron": cron,
})


def due(cfg: ScheduleConfig, store: ScheduleStore, now: float) -> Due:
    """Ask the configured policy."""
    return SCHEDULES.get(cfg.policy)(cfg, store, now)

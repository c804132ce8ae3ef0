"""The schedule policies with an injected clock and a store that says what happened
(last sleep, commits, activity): no model, no waiting."""

from __future__ import annotations

import datetime as dt

import pytest

from adapters.names import KNOWLEDGE
from policies.schedule import SCHEDULES, ScheduleConfig, cron_trigger, due

T0 = dt.datetime(2025, 3, 10, 0, 0, tzinfo=dt.UTC).timestamp()  # a Monday, midnight UTC
H = 3600.0


class History:
    """The store's answers, from lists of times."""

    def __init__(self, commits=(), sleeps=(), ingests=()):
        self.commits, self.sleeps, self.ingests = list(commits), list(sleeps), list(ingests)

    def last_sleep_at(self):
        return max(self.sleeps, default=None)

    def commits_since(self, at, name=KNOWLEDGE):
        return sum(1 for c in self.commits if at is None or c > at)

    def first_commit_since(self, at, name=KNOWLEDGE):
        return min((c for c in self.commits if at is None or c > at), default=None)

    def last_activity_at(self):
        return max(self.commits + self.ingests, default=None)


def test_the_policies_are_named():
    assert set(SCHEDULES) == {"never", "interval", "commits", "idle", "cron"}
    assert ScheduleConfig().policy == "commits" and ScheduleConfig().every_commits == 4


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"policy": "weekly"}, "weekly"),
        ({"every_commits": 0}, "every_commits"),
        ({"interval_s": 0}, "interval_s"),
        ({"idle_s": -1}, "idle_s"),
        ({"misfire_grace_s": 0}, "misfire_grace_s"),
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "every day"}, "cron"),
        ({"timezone": "Mars/Olympus"}, "Mars/Olympus"),
    ],
)
def test_bad_settings_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ScheduleConfig(**kwargs)


def test_a_bad_schedule_setting_is_a_one_line_cli_error(seal):
    for override, needle in (("schedule.cron=61 * * * *", "schedule: cron"), ("schedule.policy=weekly", "weekly")):
        r = seal("--set", override, "config", "show")
        assert r.exit_code != 0
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], r.output


def test_never():
    d = due(ScheduleConfig(policy="never"), History(commits=[T0] * 50), T0 + 1e6)
    assert (d.due, d.next_at) == (False, None)


def test_commits_counts_the_commits_since_the_last_sleep():
    cfg = ScheduleConfig(policy="commits", every_commits=3)
    h = History(commits=[T0 + 1, T0 + 2])
    d = due(cfg, h, T0 + 10)
    assert not d.due and d.next_at is None and "1 more commit" in d.reason
    h.commits.append(T0 + 3)
    d = due(cfg, h, T0 + 10)
    assert d.due and d.next_at == T0 + 10
    h.sleeps.append(T0 + 11)  # the sleep resets the count
    assert not due(cfg, h, T0 + 12).due
    h.commits += [T0 + 20, T0 + 21, T0 + 22, T0 + 23]  # more than enough: one sleep, not two
    assert due(cfg, h, T0 + 30).due


def test_interval_runs_from_the_last_sleep_or_the_first_commit():
    cfg = ScheduleConfig(policy="interval", interval_s=2 * H)
    h = History()
    d = due(cfg, h, T0)
    assert not d.due and d.next_at is None and "nothing learned" in d.reason
    h.commits.append(T0 + 10)
    d = due(cfg, h, T0 + H)
    assert not d.due and d.next_at == T0 + 10 + 2 * H
    assert due(cfg, h, T0 + 10 + 2 * H).due
    h.sleeps.append(T0 + 3 * H)
    assert not due(cfg, h, T0 + 6 * H).due, "nothing learned since the sleep: nothing to consolidate"
    h.commits.append(T0 + 4 * H)
    d = due(cfg, h, T0 + 4 * H)
    assert not d.due and d.next_at == T0 + 5 * H
    # missed while the daemon was down: due once, at once (coalesced)
    assert due(cfg, h, T0 + 50 * H).due


def test_idle_waits_for_quiet_after_the_last_activity():
    cfg = ScheduleConfig(policy="idle", idle_s=600)
    h = History(ingests=[T0])
    assert not due(cfg, h, T0 + 10 * H).due, "ingested but nothing learned yet"
    h.commits.append(T0 + 100)
    d = due(cfg, h, T0 + 200)
    assert not d.due and d.next_at == T0 + 700
    assert due(cfg, h, T0 + 700).due
    h.ingests.append(T0 + 650)  # new activity pushes it back
    d = due(cfg, h, T0 + 700)
    assert not d.due and d.next_at == T0 + 1250
    h.sleeps.append(T0 + 1300)
    assert not due(cfg, h, T0 + 5 * H).due


def test_cron_fires_at_its_times_within_the_misfire_grace():
    cfg = ScheduleConfig(policy="cron", cron="0 3 * * *", timezone="UTC", misfire_grace_s=H)
    h = History(commits=[T0 + 60], sleeps=[T0 + 30])  # slept at 00:00:30, learned at 00:01
    d = due(cfg, h, T0 + 2 * H + 59 * 60)  # 02:59
    assert not d.due and d.next_at == T0 + 3 * H
    assert due(cfg, h, T0 + 3 * H).due  # 03:00 sharp
    assert due(cfg, h, T0 + 3.5 * H).due  # 03:30: late, within the grace
    d = due(cfg, h, T0 + 5 * H)  # 05:00: missed by two hours -> skipped until tomorrow
    assert not d.due and d.next_at == T0 + 27 * H
    h.sleeps.append(T0 + 3 * H + 5)  # it slept at 03:00:05
    d = due(cfg, h, T0 + 3.5 * H)
    assert not d.due and d.next_at is None and "nothing learned since the last sleep" in d.reason
    h.commits.append(T0 + 4 * H)
    d = due(cfg, h, T0 + 4 * H)
    assert not d.due and d.next_at == T0 + 27 * H
    assert due(cfg, h, T0 + 27 * H + 1).due
    # nothing learned since the last sleep: the fire time passes by
    h.sleeps.append(T0 + 27 * H + 2)
    d = due(cfg, h, T0 + 51 * H)
    assert not d.due and "nothing learned" in d.reason


def test_cron_never_slept_counts_from_the_first_commit():
    cfg = ScheduleConfig(policy="cron", cron="*/15 * * * *", timezone="UTC", misfire_grace_s=H)
    h = History(commits=[T0 + 20 * 60])  # first commit at 00:20
    assert not due(cfg, h, T0 + 25 * 60).due  # 00:15 fired before anything was learned
    assert due(cfg, h, T0 + 30 * 60).due


def test_cron_uses_its_time_zone():
    paris = ScheduleConfig(policy="cron", cron="0 3 * * *", timezone="Europe/Paris")
    h = History(commits=[T0 + 1], sleeps=[T0])
    d = due(paris, h, T0)
    assert d.next_at == T0 + 2 * H  # 03:00 in Paris is 02:00 UTC in March (CET)
    assert cron_trigger(paris).timezone.key == "Europe/Paris"

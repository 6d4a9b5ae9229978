"""Cron arithmetic for the `schedule` trigger: the due times of a cron string in its time zone, as UTC.

Due times are computed in the schedule's time zone, so `0 9 * * 1-5` in Europe/Berlin is 09:00 there in winter
and in summer. A wall-clock time that does not exist (clocks go forward) fires at the first minute after the gap;
a wall-clock time that happens twice (clocks go back) fires once, the first time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from croniter import croniter

from bot.engine.triggers.config import ScheduleTrigger

# A cron string names at most a time per minute; anything finer than this is the same due time.
_JUST_AFTER = timedelta(microseconds=1)


def next_due(config: ScheduleTrigger, after: datetime) -> datetime:
    """The first due time strictly after `after`, in UTC."""
    times = croniter(config.cron, after.astimezone(config.zone))
    while True:
        candidate: datetime = times.get_next(datetime)
        if candidate.fold == 0 or _unambiguous(candidate):
            return candidate.astimezone(UTC)


def latest_due(config: ScheduleTrigger, now: datetime) -> datetime:
    """The last due time at or before `now`, in UTC."""
    times = croniter(config.cron, (now + _JUST_AFTER).astimezone(config.zone))
    while True:
        candidate: datetime = times.get_prev(datetime)
        if candidate.fold == 0 or _unambiguous(candidate):
            return candidate.astimezone(UTC)


def _unambiguous(moment: datetime) -> bool:
    """False for the second pass through a wall-clock time repeated when clocks go back."""
    return moment.replace(fold=0).utcoffset() == moment.utcoffset()


@dataclass(frozen=True)
class Plan:
    """What a schedule does when its due time has come."""

    fire_for: datetime | None  # the due time to fire now, if any
    missed_from: datetime | None  # the oldest due time that will not fire (too old, or superseded)
    next_at: datetime  # the next due time after now


def plan(config: ScheduleTrigger, *, due: datetime, now: datetime, grace: timedelta) -> Plan:
    """`due` (≤ now) has come. Only the newest due time up to now may fire, and only within `grace` of it:
    after downtime, one run for the latest missed time rather than a burst of stale ones. Only cron times fire:
    a `due` of a retry after a failure (a backoff's time) fires the cron time before it, under its delivery id,
    so an event that was stored before the failure is not stored again."""
    latest = latest_due(config, now)
    fire_for = latest if now - latest <= grace else None
    missed_from = due if due < latest or fire_for is None else None
    return Plan(fire_for=fire_for, missed_from=missed_from, next_at=next_due(config, now))


def first_due(config: ScheduleTrigger, *, subscribed_at: datetime, now: datetime, grace: timedelta) -> datetime:
    """When a new subscription's schedule is first due.

    Counted from the moment of `/relay enable` when that was moments ago (so a due time between the enable and
    this process noticing it still fires), otherwise from now: a trigger added to an old subscription by a new
    version of the workflow starts with the next due time, not with one from before it existed.
    """
    start = subscribed_at if now - grace <= subscribed_at <= now else now
    return next_due(config, start)

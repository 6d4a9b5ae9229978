"""One line per subscription about its poll and schedule triggers, for `/relay list`."""

from __future__ import annotations

from sqlalchemy import select

from bot.slack.messages import escape, slack_date
from bot.store.db import Database
from bot.store.models import Subscription, TriggerState


def status_line(state: TriggerState) -> str:
    """How one trigger of a subscription stands, in one line (dates shown in the reader's time zone)."""
    if state.trigger == "schedule":
        text = f":alarm_clock: schedule: next run {slack_date(state.next_at)}"
        if state.last_fired_for is not None:
            text += f", last {slack_date(state.last_fired_for)}"
        return text
    if state.failures:
        when = slack_date(state.last_error_at) if state.last_error_at else "recently"
        times = "once" if state.failures == 1 else f"{state.failures} times in a row"
        return (f":warning: poll failed {times} (last {when}): {escape(state.last_error or 'unknown error')} "
                f"· next try {slack_date(state.next_at)}")
    if state.baseline_at is None:
        return f":satellite_antenna: poll: first check {slack_date(state.next_at)} (it sets the baseline)"
    checked = slack_date(state.last_success_at) if state.last_success_at else "not yet"
    return f":satellite_antenna: poll: last checked {checked}, next {slack_date(state.next_at)}"


async def trigger_statuses(db: Database, *, team_id: str, channel_id: str) -> dict[str, str]:
    """workflow name → the status line of its poll/schedule triggers in this channel (only those that have one)."""
    async with db.read() as session:
        rows = (await session.execute(
            select(Subscription.workflow, TriggerState)
            .join(TriggerState, TriggerState.subscription_id == Subscription.id)
            .where(Subscription.team_id == team_id, Subscription.channel_id == channel_id)
            .order_by(Subscription.workflow, TriggerState.trigger))).all()
    lines: dict[str, list[str]] = {}
    for workflow, state in rows:
        lines.setdefault(workflow, []).append(status_line(state))
    return {workflow: " · ".join(parts) for workflow, parts in lines.items()}

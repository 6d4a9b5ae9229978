"""Telling a person what relaybot cannot do by itself (it cannot post in a channel it is not in)."""

from __future__ import annotations

import logging

from sqlalchemy import select

from bot.slack import messages
from bot.slack.client import SlackApi
from bot.store.db import Database
from bot.store.models import OutboxMessage, Run, Subscription

log = logging.getLogger(__name__)
CHANNEL_ERRORS = ("not_in_channel", "channel_not_found", "is_archived", "channel_is_archived")


async def tell_subscriber(db: Database, slack: SlackApi, message: OutboxMessage, reason: str) -> None:
    """A run's card could not be posted: a direct message to whoever enabled the workflow there."""
    if message.run_id is None or not any(error in reason for error in CHANNEL_ERRORS):
        return
    async with db.read() as session:
        run = await session.get(Run, message.run_id)
        if run is None or run.subscription_id is None:
            return
        subscription = (await session.execute(select(Subscription).where(
            Subscription.id == run.subscription_id))).scalar_one_or_none()
    if subscription is None:
        return
    error = next(error for error in CHANNEL_ERRORS if error in reason)
    text = messages.CARD_UNDELIVERABLE.format(workflow=run.workflow, channel=run.channel_id, run_id=run.id,
                                              error=error)
    await slack.call(run.team_id, "chat.postMessage", channel=subscription.created_by, text=text)
    log.warning("run %s: its card cannot be posted in %s (%s); told %s", run.id, run.channel_id, error,
                subscription.created_by)

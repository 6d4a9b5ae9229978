"""Telling a person what relaybot cannot do by itself (it cannot post in a channel it is not in)."""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta

from sqlalchemy import select

from bot.slack import messages
from bot.slack.client import SlackApi
from bot.store.db import Database
from bot.store.models import OutboxMessage, Run, Subscription

log = logging.getLogger(__name__)
CHANNEL_ERRORS = ("not_in_channel", "channel_not_found", "is_archived", "channel_is_archived")


class UndeliverableNotices:
    """When a run's card cannot be posted: a direct message to whoever enabled the workflow there, at most once
    per workflow and channel every `quiet` (a burst of webhooks would otherwise send one per run). Kept per
    process: with several processes, each may send one."""

    def __init__(self, *, db: Database, slack: SlackApi, quiet: timedelta = timedelta(hours=1)) -> None:
        self.db = db
        self.slack = slack
        self.quiet = quiet
        self._last_told: dict[tuple[str, str, str], float] = {}

    async def __call__(self, message: OutboxMessage, reason: str) -> None:
        if message.run_id is None or not any(error in reason for error in CHANNEL_ERRORS):
            return
        async with self.db.read() as session:
            run = await session.get(Run, message.run_id)
            if run is None or run.subscription_id is None:
                return
            subscription = (await session.execute(select(Subscription).where(
                Subscription.id == run.subscription_id))).scalar_one_or_none()
        if subscription is None:
            return
        error = next(error for error in CHANNEL_ERRORS if error in reason)
        key = (run.team_id, run.channel_id, run.workflow)
        now = time.monotonic()
        if now - self._last_told.get(key, -math.inf) < self.quiet.total_seconds():
            log.warning("run %s: its card cannot be posted in %s (%s); %s was told less than %s ago", run.id,
                        run.channel_id, error, subscription.created_by, self.quiet)
            return
        self._last_told[key] = now
        text = messages.card_undeliverable(workflow=run.workflow, channel=run.channel_id, run_id=run.id,
                                           error=error, quiet=messages.span(self.quiet))
        await self.slack.call(run.team_id, "chat.postMessage", channel=subscription.created_by, text=text)
        log.warning("run %s: its card cannot be posted in %s (%s); told %s", run.id, run.channel_id, error,
                    subscription.created_by)

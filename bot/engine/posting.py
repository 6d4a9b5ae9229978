"""`slack.post` into a run's thread, in order with the thread replies the outbox is still delivering."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import Select, func, select

from bot.store.db import Database
from bot.store.models import OutboxMessage
from integrations.base import SlackPoster


def newest_pending(lane: str) -> Select[int]:
    """The newest message of a lane not yet delivered: read through the pending index, not every message sent."""
    return select(func.max(OutboxMessage.id)).where(OutboxMessage.state == "pending", OutboxMessage.lane == lane)


class ThreadInOrder:
    """A poster whose thread replies wait for the run's earlier replies still in the outbox (up to a few
    seconds), so a `slack.post` into the thread reads after "step started", not before it."""

    def __init__(self, inner: SlackPoster, *, db: Database, run_id: str, patience: float = 10.0) -> None:
        self.inner = inner
        self.db = db
        self.run_id = run_id
        self.patience = patience

    async def _earlier_pending(self, up_to: int | None) -> tuple[int | None, int]:
        """The run's pending messages up to message `up_to` (first call: up to its newest pending one). Only
        pending messages are looked at, through the pending index: the outbox keeps every message sent."""
        async with self.db.read() as session:
            limit = up_to
            if limit is None:
                limit = await session.scalar(newest_pending(self.run_id))
            if limit is None:
                return None, 0
            pending = await session.scalar(select(func.count()).select_from(OutboxMessage).where(
                OutboxMessage.lane == self.run_id, OutboxMessage.state == "pending", OutboxMessage.id <= limit))
            return limit, pending or 0

    async def post_message(self, *, channel: str, text: str, blocks: list[dict[str, Any]] | None = None,
                           thread_ts: str | None = None) -> dict[str, Any]:
        if thread_ts:
            deadline = time.monotonic() + self.patience
            up_to, pending = await self._earlier_pending(None)
            while pending and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                _, pending = await self._earlier_pending(up_to)
        return await self.inner.post_message(channel=channel, text=text, blocks=blocks, thread_ts=thread_ts)

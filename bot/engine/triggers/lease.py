"""Claiming due trigger states across processes, and giving them back.

A state is claimed by a conditional update of its lease (due, and nobody holds it or the holder's lease has
run out), as housekeeping claims its jobs: of several processes sharing the database exactly one gets it. A
process that dies while holding one only delays it until the lease runs out. Times come from the caller's clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, or_, select, update

from bot.store.db import Database
from bot.store.models import TriggerState, Workspace

StateKey = tuple[int, str]  # (subscription id, trigger name)


async def claim_due(db: Database, *, owner: str, now: datetime, lease: timedelta, limit: int) -> list[StateKey]:
    """Up to `limit` due states of installed workspaces, now leased to `owner`."""
    free = or_(TriggerState.lease_until.is_(None), TriggerState.lease_until < now)
    uninstalled = exists().where(Workspace.team_id == TriggerState.team_id, Workspace.uninstalled_at.is_not(None))
    # Most rounds find nothing due: a read says so without taking SQLite's write lock every second.
    async with db.read() as session:
        if await session.scalar(select(TriggerState.subscription_id)
                                .where(TriggerState.next_at <= now, free, ~uninstalled).limit(1)) is None:
            return []
    async with db.write() as session:
        query = (select(TriggerState.subscription_id, TriggerState.trigger)
                 .where(TriggerState.next_at <= now, free, ~uninstalled)
                 .order_by(TriggerState.next_at).limit(limit))
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        candidates = [(row.subscription_id, row.trigger) for row in (await session.execute(query)).all()]
        claimed: list[StateKey] = []
        for subscription_id, trigger in candidates:
            result = await session.execute(
                update(TriggerState)
                .where(TriggerState.subscription_id == subscription_id, TriggerState.trigger == trigger,
                       TriggerState.next_at <= now, free)
                .values(lease_owner=owner, lease_until=now + lease))
            if result.rowcount:  # type: ignore[attr-defined]
                claimed.append((subscription_id, trigger))
    return claimed


async def release(db: Database, state: TriggerState, owner: str, **values: Any) -> bool:
    """Give the state back with `values` written, if `owner` still holds it; False if the lease was lost."""
    async with db.write() as session:
        result = await session.execute(
            update(TriggerState)
            .where(TriggerState.subscription_id == state.subscription_id, TriggerState.trigger == state.trigger,
                   TriggerState.lease_owner == owner)
            .values(lease_owner=None, lease_until=None, **values))
        return bool(result.rowcount)  # type: ignore[attr-defined]


async def release_all(db: Database, owner: str) -> None:
    """On shutdown: what this process still holds can be taken by another at once."""
    async with db.write() as session:
        await session.execute(update(TriggerState).where(TriggerState.lease_owner == owner)
                              .values(lease_owner=None, lease_until=None))

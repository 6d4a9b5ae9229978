"""One transition, written once: the audit record, the thread reply and the card refresh, in the caller's
transaction together with the state change itself. Nothing is posted to Slack from here; the outbox does that.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from bot import audit
from bot.audit import Actor
from bot.store.db import insert_later
from bot.store.models import OutboxMessage, Run

CARD = "card"
REPLY = "reply"
POST = "post"


def enqueue(session: AsyncSession, *, team_id: str, channel_id: str, kind: str, payload: dict[str, Any],
            run_id: str | None = None, now: datetime | None = None) -> None:
    moment = now or datetime.now(UTC)
    # A message of no run waits only behind its own workspace's in that channel (a failure ends a lane).
    row = {"team_id": team_id, "channel_id": channel_id, "run_id": run_id,
           "lane": run_id or f"{team_id}:{channel_id}", "kind": kind, "payload": payload, "state": "pending",
           "attempts": 0, "not_before": moment, "created_at": moment}
    if not insert_later(session, OutboxMessage, row):
        session.add(OutboxMessage(**row))


async def transition(
    session: AsyncSession,
    run: Run,
    *,
    actor: Actor,
    action: str,
    thread: str | None,
    refresh_card: bool = True,
    step: str | None = None,
    outcome: str | None = None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> None:
    """Record a run's transition: audit record, then the thread reply, then the card refresh (in that order)."""
    moment = now or datetime.now(UTC)
    await audit.append(session, team_id=run.team_id, actor=actor, action=action, run_id=run.id,
                       workflow=run.workflow, workflow_hash=run.workflow_hash, step=step, outcome=outcome,
                       reason=reason, details=details, at=moment)
    if thread:
        enqueue(session, team_id=run.team_id, channel_id=run.channel_id, kind=REPLY, payload={"text": thread},
                run_id=run.id, now=moment)
    if refresh_card:
        enqueue(session, team_id=run.team_id, channel_id=run.channel_id, kind=CARD, payload={}, run_id=run.id,
                now=moment)

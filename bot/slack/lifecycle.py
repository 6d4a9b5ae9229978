"""Installing and uninstalling: what happens to a workspace's data.

Uninstalling (`app_uninstalled`, or the bot token revoked) stops the workspace: its connection URLs answer
404, its active runs are cancelled, undelivered Slack messages are dropped (there is no token to send them
with) and its tokens are deleted. Its audit log, connections and subscriptions are kept, so reinstalling brings
everything back with the same URLs and secrets: through the OAuth callback, or, in single-workspace mode, when
the bot starts with a token that Slack accepts for that workspace (`restore_single_workspace`).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from sqlalchemy import select, update

from bot import audit
from bot.audit import Actor
from bot.engine import journal, states
from bot.engine.concurrency import wake_queued
from bot.services import Services
from bot.slack import messages
from bot.store.models import OutboxMessage, Run, Step, Workspace

log = logging.getLogger(__name__)


async def cancel_run(services: Services, *, run_id: str, team_id: str, actor: Actor, reason: str,
                     notify: bool = True) -> bool:
    """Cancel one active run (conditionally: a run that already ended stays as it is). True if cancelled."""
    now = datetime.now(UTC)
    async with services.db.write() as session:
        result = await session.execute(
            update(Run).where(Run.id == run_id, Run.team_id == team_id, Run.state.in_(states.ACTIVE_RUN_STATES))
            .values(state=states.CANCELLED, outcome=states.CANCELLED, cancelled_by=actor.id, finished_at=now,
                    wake_at=None))
        if not result.rowcount:  # type: ignore[attr-defined]
            return False
        # A step in flight finishes and records its own outcome; the others will never run (one whose outcome
        # is unknown included: its Retry button must not start it again).
        await session.execute(update(Step).where(
            Step.run_id == run_id,
            Step.state.in_([states.PENDING, states.STEP_WAITING, states.APPROVED, states.UNKNOWN]))
            .values(state=states.STEP_CANCELLED, finished_at=now))
        run = await session.get(Run, run_id, populate_existing=True)
        assert run is not None
        await wake_queued(session, run.concurrency_key)
        await journal.transition(session, run, actor=actor, action="run.cancelled", outcome=states.CANCELLED,
                                 reason=reason, now=now, refresh_card=notify,
                                 thread=messages.thread_run_cancelled(user_id=actor.id, name=actor.name)
                                 if notify else None)
    services.metrics.runs_finished.labels(outcome=states.CANCELLED).inc()
    services.wake()
    return True


async def uninstall(services: Services, *, team_id: str, reason: str) -> None:
    now = datetime.now(UTC)
    async with services.db.write() as session:
        workspace = await session.get(Workspace, team_id)
        if workspace is None:
            session.add(Workspace(team_id=team_id, name=None, installed_at=now, uninstalled_at=now))
        elif workspace.uninstalled_at is not None:
            return
        else:
            workspace.uninstalled_at = now
        await audit.append(session, team_id=team_id, actor=Actor.system(), action="app.uninstalled",
                           outcome="ok", reason=reason, at=now)
        active = list((await session.execute(select(Run.id).where(
            Run.team_id == team_id, Run.finished_at.is_(None), Run.state.in_(states.ACTIVE_RUN_STATES)))).scalars())
    for run_id in active:
        await cancel_run(services, run_id=run_id, team_id=team_id, actor=Actor.system(),
                         reason=f"the app was removed from the workspace ({reason})", notify=False)
    async with services.db.write() as session:
        await session.execute(update(OutboxMessage).where(OutboxMessage.team_id == team_id,
                                                          OutboxMessage.state == "pending")
                              .values(state="failed", last_error=f"workspace uninstalled ({reason})"))
    if services.installations is not None:
        await services.installations.async_delete_all(enterprise_id=None, team_id=team_id)
    services.connections.forget()
    services.people.forget(team_id)
    log.info("workspace %s uninstalled (%s): %d runs cancelled", team_id, reason, len(active))


async def restore_single_workspace(services: Services, *, timeout: float = 5.0) -> None:
    """Single-workspace mode, at start-up: a workspace marked uninstalled whose token (`SLACK_BOT_TOKEN`) Slack
    accepts again has been reinstalled, so it is brought back. Asks Slack only when some workspace is marked
    uninstalled; an unreachable Slack delays the start by `timeout` at most and changes nothing."""
    async with services.db.read() as session:
        if await session.scalar(select(Workspace.team_id).where(Workspace.uninstalled_at.is_not(None)).limit(1)) \
                is None:
            return
    try:
        identity = await asyncio.wait_for(services.slack.call("", "auth.test"), timeout)
    except Exception as exc:
        log.warning("could not ask Slack which workspace SLACK_BOT_TOKEN belongs to (%s: %s); a workspace that "
                    "uninstalled the app stays stopped", type(exc).__name__, exc)
        return
    team_id = identity.get("team_id")
    now = datetime.now(UTC)
    async with services.db.write() as session:
        workspace = await session.get(Workspace, team_id) if team_id else None
        if workspace is None or workspace.uninstalled_at is None:
            return
        workspace.uninstalled_at = None
        workspace.installed_at = now
        await audit.append(session, team_id=workspace.team_id, actor=Actor.system(), action="app.reinstalled",
                           outcome="ok", reason="the bot started with a token Slack accepts for the workspace",
                           at=now)
    services.connections.forget()
    log.info("workspace %s was reinstalled: its connections, subscriptions and triggers are back", team_id)

"""Approve / Skip clicks on a run card.

The click is acknowledged at once. The decision is a conditional update — `… WHERE state = 'waiting'` — in the
same transaction as its audit record, thread reply and card refresh, so exactly one click wins on any number
of processes; every other click (a second one, a stale card, someone not allowed) changes nothing and gets an
ephemeral explanation.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from bot.audit import Actor
from bot.engine import journal, states
from bot.engine.cards import render_card
from bot.engine.loader import CompiledWorkflow
from bot.errors import NotAllowed, NotFound, UserError
from bot.services import Services
from bot.slack import messages
from bot.slack.blocks import APPROVE_ACTION, RETRY_ACTION, parse_button_value
from bot.slack.people import LookupFailed
from bot.store.models import Event, Run, Step, WorkflowVersion


async def workflow_of(services: Services, run: Run) -> CompiledWorkflow:
    """The workflow as the run started it (the file may have changed since)."""
    try:
        return services.catalog.version(run.workflow_hash)
    except KeyError:
        async with services.db.read() as session:
            version = await session.get(WorkflowVersion, run.workflow_hash)
        if version is None:
            raise
        return services.catalog.version(run.workflow_hash, source=version.source, path=version.path,
                                        name=version.name)


def _user_name(body: dict[str, Any]) -> str | None:
    user = body.get("user") or {}
    return user.get("name") or user.get("username")


async def decide(services: Services, body: dict[str, Any], action: dict[str, Any]) -> str | None:
    """Apply one click; returns an ephemeral explanation when nothing was changed, else None."""
    team_id = (body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id")
    user_id = (body.get("user") or {}).get("id")
    parsed = parse_button_value(action.get("value") or "")
    if not team_id or not user_id or parsed is None:
        raise UserError(messages.CLICK_UNKNOWN_RUN)
    run_id, step_id = parsed
    choice = str(action.get("action_id") or "")
    # Approve acts on a step waiting for approval, Retry on one whose outcome is unknown, Skip on either.
    decidable: tuple[str, ...] = {APPROVE_ACTION: (states.STEP_WAITING,), RETRY_ACTION: (states.UNKNOWN,)}.get(
        choice, (states.STEP_WAITING, states.UNKNOWN))
    async with services.db.read() as session:
        run = (await session.execute(select(Run).where(Run.id == run_id, Run.team_id == team_id))
               ).scalar_one_or_none()
        step = None
        if run is not None:
            step = (await session.execute(select(Step).where(Step.run_id == run.id, Step.step_id == step_id))
                    ).scalar_one_or_none()
    if run is None or step is None:
        raise NotFound(messages.CLICK_UNKNOWN_RUN)
    if step.state not in decidable:
        if run.state == states.CANCELLED:
            return messages.CLICK_RUN_CANCELLED.format(who=messages.user(run.cancelled_by))
        if step.decision and step.decided_by and step.state != states.UNKNOWN:
            who = messages.user(step.decided_by, step.decided_by_name)
            return messages.CLICK_ALREADY_DECIDED.format(state=f"{step.decision} by {who}")
        return messages.CLICK_STALE
    workflow = await workflow_of(services, run)
    compiled = workflow.step(step_id)
    try:
        refusal = await services.people.may_approve(team_id, user_id, compiled.approvers, run.started_by,
                                                    channel_id=run.channel_id)
    except LookupFailed as exc:
        raise NotAllowed(messages.CLICK_LOOKUP_FAILED.format(error=exc)) from None
    if refusal:
        approvers = compiled.approvers
        who = messages.approvers_text(approvers.users if approvers else [], approvers.groups if approvers else [])
        return refusal.format(title=messages.escape(step.title), approvers=who)
    person = await services.people.person(team_id, user_id)
    name = person.name or _user_name(body)
    try:
        return await _apply(services, run=run, step=step, workflow=workflow, choice=choice, user_id=user_id,
                            name=name)
    except _ClickLost as lost:
        return lost.explanation


class _ClickLost(Exception):
    """The click lost a race; its transaction is rolled back and the person told why."""

    def __init__(self, explanation: str) -> None:
        super().__init__(explanation)
        self.explanation = explanation


async def _apply(services: Services, *, run: Run, step: Step, workflow: CompiledWorkflow, choice: str,
                 user_id: str, name: str | None) -> str | None:
    """The click's change, in one transaction; an explanation instead when the run has ended meanwhile."""
    now = datetime.now(UTC)
    approve = choice in (APPROVE_ACTION, RETRY_ACTION)
    retry = choice == RETRY_ACTION
    async with services.db.write() as session:
        # The run first, and only while it is active: a click racing `/relay cancel` (or a stale card of a run
        # cancelled since) must not bring the run back. With a `concurrency:` pool the runner first checks for
        # a free slot; a queued run goes through it.
        revived = await session.execute(
            update(Run).where(Run.id == run.id, Run.state.in_(states.ACTIVE_RUN_STATES))
            .values(state=states.QUEUED if run.concurrency_key else states.RUNNING, wake_at=now))
        if not revived.rowcount:  # type: ignore[attr-defined]
            ended = await session.get(Run, run.id, populate_existing=True)
            if ended is not None and ended.state == states.CANCELLED:
                return messages.CLICK_RUN_CANCELLED.format(who=messages.user(ended.cancelled_by))
            return messages.CLICK_STALE
        values: dict[str, Any] = {"state": states.APPROVED if approve else states.SKIPPED}
        if not retry:  # a retry keeps the record of who approved the step in the first place
            values |= {"decision": "approved" if approve else "skipped", "decided_by": user_id,
                       "decided_by_name": name, "decided_at": now}
        if not approve:
            values["finished_at"] = now
        won = await session.execute(update(Step).where(Step.id == step.id, Step.state == step.state)
                                    .values(**values))
        if not won.rowcount:  # type: ignore[attr-defined]
            fresh = await session.get(Step, step.id, populate_existing=True)
            who_text = (messages.user(fresh.decided_by, fresh.decided_by_name)
                        if fresh and fresh.decided_by else None)
            if fresh is not None and who_text:
                raise _ClickLost(messages.CLICK_ALREADY_DECIDED.format(state=f"{fresh.decision} by {who_text}"))
            raise _ClickLost(messages.CLICK_STALE)
        revived_run = await session.get(Run, run.id, populate_existing=True)
        assert revived_run is not None
        run = revived_run
        event = await session.get(Event, run.event_id)
        assert event is not None
        steps = list((await session.execute(select(Step).where(Step.run_id == run.id).order_by(Step.position)
                                            .execution_options(populate_existing=True))).scalars())
        run.card = render_card(workflow=workflow, run=run, event=event, steps=steps)
        if retry:
            thread = messages.thread_step_retry_requested(title=step.title, user_id=user_id, name=name)
            action_name, outcome, reason = "step.retry_requested", "retry", "outcome was unknown"
        elif approve:
            thread = messages.thread_step_approved(title=step.title, user_id=user_id, name=name)
            action_name, outcome, reason = "step.approved", "approved", None
        else:
            thread = messages.thread_step_skipped_by(title=step.title, user_id=user_id, name=name)
            action_name, outcome, reason = "step.skipped", states.SKIPPED, "skipped by a person"
        await journal.transition(session, run, actor=Actor(user_id, name), action=action_name, step=step.step_id,
                                 outcome=outcome, now=now, thread=thread, reason=reason)
    services.wake()
    return None

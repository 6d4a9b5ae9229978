"""The App Home tab: workflows enabled in the workspace, runs waiting for this user's approval (with the buttons),
and the latest runs. Built with slack-sdk's model classes, which check Block Kit's limits.
"""

from __future__ import annotations

from typing import Any

from slack_sdk.models.blocks import (
    Block,
    ContextBlock,
    DividerBlock,
    HeaderBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)
from slack_sdk.models.views import View
from sqlalchemy import Select, select

from bot.engine import states
from bot.engine.context import run_url
from bot.services import Services
from bot.slack import messages
from bot.slack.blocks import decision_buttons
from bot.slack.people import LookupFailed
from bot.store.models import Run, Step, Subscription

MAX_WAITING = 15
MAX_LATEST = 10
MAX_WAITING_LOOKED_AT = 1000
MAX_ENABLED = 25


def _when(run: Run) -> str:
    return messages.slack_date(run.created_at)


async def _may_approve(services: Services, team_id: str, user_id: str, run: Run, step: Step) -> bool:
    from bot.slack.actions import workflow_of

    try:
        workflow = await workflow_of(services, run)
        compiled = workflow.step(step.step_id)
        return await services.people.may_approve(team_id, user_id, compiled.approvers, run.started_by,
                                                 channel_id=run.channel_id, fresh=False) is None
    except (KeyError, LookupFailed):
        return False


def last_runs_query(team_id: str, subscription_ids: list[int]) -> Select[Run]:
    """The latest run of each of these subscriptions' workflow in its channel: one index lookup each
    (`ix_runs_team_workflow`), however many runs the workspace has."""
    latest = (select(Run.id).where(Run.team_id == team_id, Run.workflow == Subscription.workflow,
                                   Run.channel_id == Subscription.channel_id)
              .order_by(Run.created_at.desc()).limit(1).correlate(Subscription).scalar_subquery())
    return select(Run).where(Run.id.in_(select(latest).where(Subscription.id.in_(subscription_ids))))


def waiting_query(team_id: str) -> Select[Run, Step]:
    """The workspace's runs waiting for a decision, newest first (`ix_runs_state`, which holds only runs with
    no `finished_at`). Far more than the tab shows: the viewer's own are picked from them, and for a run whose
    card could not be posted the tab is the only place to decide it (50 of other people's hid them)."""
    return (select(Run, Step).join(Step, Step.run_id == Run.id)
            .where(Run.finished_at.is_(None), Run.state == states.WAITING, Run.team_id == team_id,
                   Step.state.in_([states.STEP_WAITING, states.UNKNOWN]))
            .order_by(Run.created_at.desc()).limit(MAX_WAITING_LOOKED_AT))


def latest_query(team_id: str, channels: set[str]) -> Select[Run]:
    """The latest runs in these channels of the workspace (`ix_runs_team_created`)."""
    return (select(Run).where(Run.team_id == team_id, Run.channel_id.in_(sorted(channels)))
            .order_by(Run.created_at.desc()).limit(MAX_LATEST))


async def build_home(services: Services, *, team_id: str, user_id: str, notice: str | None = None) -> View:
    # The tab shows what happens in the channels this person is in: a private channel's runs are its own.
    try:
        channels = await services.people.channels_of(team_id, user_id)
    except LookupFailed as exc:
        channels = set()
        notice = "\n".join(filter(None, [notice, messages.HOME_CHANNELS_UNKNOWN.format(error=exc)]))
    async with services.db.read() as session:
        subscriptions = list((await session.execute(
            select(Subscription).where(Subscription.team_id == team_id,
                                       Subscription.channel_id.in_(sorted(channels)))
            .order_by(Subscription.workflow, Subscription.channel_id).limit(MAX_ENABLED))).scalars())
        last_runs: dict[tuple[str, str], Run] = {}
        if subscriptions:
            rows = await session.execute(last_runs_query(team_id, [s.id for s in subscriptions]))
            last_runs = {(run.workflow, run.channel_id): run for run in rows.scalars()}
        waiting_rows = list((await session.execute(waiting_query(team_id))).all())
        latest = list((await session.execute(latest_query(team_id, channels))).scalars())

    blocks: list[Block | dict[str, Any]] = [HeaderBlock(text=PlainTextObject(text="relaybot"))]
    if notice:
        blocks.append(SectionBlock(text=MarkdownTextObject(text=notice[:3000])))
    blocks.append(HeaderBlock(text=PlainTextObject(text="Waiting for your approval")))
    shown = 0
    for run, step in waiting_rows:
        if shown >= MAX_WAITING or not await _may_approve(services, team_id, user_id, run, step):
            continue
        shown += 1
        summary = messages.escape(run.card.get("summary") or run.title)
        blocks.append(SectionBlock(text=MarkdownTextObject(
            text=f"*{messages.escape(step.title)}* · `{run.workflow}` in <#{run.channel_id}> · run `{run.id}`\n"
                 f"{summary}\n<{run_url(run)}|Open the thread>"[:3000])))
        blocks.append(decision_buttons(run.id, step.step_id, unknown=step.state == states.UNKNOWN,
                                       block_id=f"home:{run.id}:{step.step_id}"))
    if not shown:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text="Nothing is waiting for you.")]))

    blocks += [DividerBlock(), HeaderBlock(text=PlainTextObject(text="Enabled workflows"))]
    if not subscriptions:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(
            text=f"No workflow is enabled yet: `{services.settings.command} enable <workflow>` in a channel.")]))
    for subscription in subscriptions:
        workflow = services.catalog.get(subscription.workflow)
        triggers = ", ".join(workflow.triggers) if workflow else "(no longer in the catalog)"
        last = last_runs.get((subscription.workflow, subscription.channel_id))
        last_text = (f"last run `{last.id}` {messages.STATUS_TEXT.get(last.state, last.state)} {_when(last)}"
                     if last else "no runs yet")
        blocks.append(SectionBlock(text=MarkdownTextObject(
            text=f"`{subscription.workflow}` in <#{subscription.channel_id}> · on {triggers} · {last_text}")))

    blocks += [DividerBlock(), HeaderBlock(text=PlainTextObject(text="Latest runs"))]
    if not latest:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text="No runs yet.")]))
    for run in latest:
        summary = messages.escape(run.card.get("summary") or run.title)
        blocks.append(SectionBlock(text=MarkdownTextObject(
            text=f"`{run.id}` {messages.STATUS_TEXT.get(run.state, run.state)} · `{run.workflow}` in "
                 f"<#{run.channel_id}> · {_when(run)}\n{summary} · <{run_url(run)}|thread>"[:3000])))
    return View(type="home", blocks=blocks[:100])


async def publish_home(services: Services, *, team_id: str, user_id: str, notice: str | None = None) -> None:
    view = await build_home(services, team_id=team_id, user_id=user_id, notice=notice)
    await services.slack.call(team_id, "views.publish", user_id=user_id, view=view.to_dict())


def home_click(body: dict[str, Any]) -> bool:
    return (body.get("container") or {}).get("type") == "view" or (body.get("view") or {}).get("type") == "home"

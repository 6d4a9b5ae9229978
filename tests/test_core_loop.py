"""The core loop through the real doors: signed webhook → run card → Approve/Skip → steps → audit thread."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bot.store.models import AuditRecord, Run, Step
from tests.conftest import (
    ALICE,
    BOB,
    BOTH_DATABASES,
    CHANNEL,
    CORPORA,
    TEAM,
    block_texts,
    buttons,
    write_workflow,
)

pytestmark = BOTH_DATABASES

DEPLOY = """
name: deploy
title: Deploy merged pull requests
params:
  env: {default: staging, choices: [staging, production]}
on:
  github: {events: [pull_request]}
if: event.action == "closed" && event.pull_request.merged
card:
  title: "Merged: ${{ event.pull_request.title }}"
  fields:
    Repository: "${{ event.repository.full_name }}"
    Environment: "${{ params.env }}"
steps:
  - id: deploy
    title: Deploy to ${{ params.env }}
    approval: required
    uses: http.request
    with:
      method: POST
      url: TARGET/deploy
      json: {sha: "${{ event.pull_request.merge_commit_sha }}", env: "${{ params.env }}"}
  - id: notify
    if: steps.deploy.outcome == "succeeded"
    uses: slack.post
    with:
      text: >-
        Deployed ${{ event.pull_request.number }} to ${{ params.env }},
        approved by ${{ steps.deploy.approved_by }}.
      thread: true
"""


def merged_pr() -> dict[str, Any]:
    payload = json.loads((CORPORA / "github/pull_request/closed.payload.json").read_text())
    payload["pull_request"]["merged"] = True
    return payload


async def setup_deploy(make_bot: Any, workflows: Path, target: Any, **env: Any) -> tuple[Any, str, str]:
    write_workflow(workflows, "deploy", DEPLOY.replace("TARGET", target.url))
    bot = await make_bot(**env)
    reply = await bot.command("enable deploy env=production")
    assert "`deploy` enabled" in reply
    url = bot.slack.responses[-1]["text"].split("URL: `")[1].split("`")[0]
    secret = reply.split("Secret: `")[1].split("`")[0]
    return bot, url, secret


async def test_approve_runs_the_step_and_the_thread_tells_the_story(make_bot, workflows, target):
    bot, url, secret = await setup_deploy(make_bot, workflows, target)
    status, body = await bot.github(url, secret, merged_pr(), delivery="delivery-1")
    assert status == 202 and body["duplicate"] is False

    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    text = block_texts(card)
    assert "Merged: Update the README with new information" in text
    assert "Codertocat/Hello-World #2 merged by Codertocat" in text
    assert "Deploy to production" in text
    assert "production" in text

    assert await bot.click(card, "approve", user=ALICE) is None
    thread = await bot.wait_thread(card, "Run succeeded")
    await bot.settle()
    thread = bot.thread_texts(card)
    expected_order = ["started by a github event `pull_request.closed`, delivery `delivery-1`",
                      "is waiting for approval", "approved by <@U0ALICE01>", "*Deploy to production* started",
                      "*Deploy to production* succeeded", "*notify* started", "Deployed 2 to production",
                      "*notify* succeeded", "Run succeeded"]
    positions = [next(i for i, line in enumerate(thread) if needle in line) for needle in expected_order]
    assert positions == sorted(positions), thread
    assert any("Deployed 2 to production, approved by alice." in line for line in thread)

    [request] = target.requests_to("/deploy")
    assert request.method == "POST"
    assert request.json() == {"sha": "c4295bd74fb0f4fda03689c3df3f2803b658fd85", "env": "production"}
    assert request.headers["Idempotency-Key"].endswith(":deploy")

    final = bot.slack.message(TEAM, CHANNEL, card.ts)
    assert final is not None and buttons(final) == []
    assert "succeeded" in block_texts(final) and "approved by <@U0ALICE01>" in block_texts(final)

    async with bot.services.db.read() as session:
        run = (await session.execute(select(Run))).scalar_one()
        assert run.state == "succeeded" and run.card_ts == card.ts
        actions = [r.action for r in (await session.execute(
            select(AuditRecord).where(AuditRecord.run_id == run.id).order_by(AuditRecord.seq))).scalars()]
    assert actions == ["run.started", "step.waiting", "step.approved", "step.started", "step.finished",
                       "step.started", "step.finished", "run.finished"]


async def test_skip_skips_the_step_and_the_condition_of_the_next(make_bot, workflows, target):
    bot, url, secret = await setup_deploy(make_bot, workflows, target)
    await bot.github(url, secret, merged_pr())
    card = await bot.wait_card(lambda m: "skip" in buttons(m))
    await bot.click(card, "skip", user=BOB)
    thread = await bot.wait_thread(card, "Run succeeded")
    assert any("skipped by <@U0BOB0001>" in line for line in thread)
    assert any("*notify* skipped: its condition `steps.deploy.outcome == \"succeeded\"` is false" in line
               for line in thread)
    assert target.requests_to("/deploy") == []


async def test_a_second_click_and_a_stale_card_change_nothing(make_bot, workflows, target):
    bot, url, secret = await setup_deploy(make_bot, workflows, target)
    await bot.github(url, secret, merged_pr())
    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    stale = copy.deepcopy(card)
    assert await bot.click(card, "approve", user=ALICE) is None
    # The same card again (as a slow client would still show it): a second decision is refused.
    reply = await bot.click(card, "skip", user=BOB, snapshot=stale)
    assert reply is not None and "already decided" in reply and "approved" in reply
    await bot.wait_thread(card, "Run succeeded")
    await bot.settle()
    assert len(target.requests_to("/deploy")) == 1
    async with bot.services.db.read() as session:
        step = (await session.execute(select(Step).where(Step.step_id == "deploy"))).scalar_one()
        assert step.decided_by == ALICE and step.attempt == 1


async def test_duplicate_delivery_starts_one_run(make_bot, workflows, target):
    bot, url, secret = await setup_deploy(make_bot, workflows, target)
    first = await bot.github(url, secret, merged_pr(), delivery="same-delivery")
    second = await bot.github(url, secret, merged_pr(), delivery="same-delivery")
    assert first[0] == second[0] == 202
    assert second[1]["duplicate"] is True and second[1]["event"] == first[1]["event"]
    await bot.wait_card()
    await bot.settle()
    assert len(bot.cards()) == 1


async def test_event_that_does_not_match_starts_nothing(make_bot, workflows, target):
    bot, url, secret = await setup_deploy(make_bot, workflows, target)
    opened = json.loads((CORPORA / "github/pull_request/opened.payload.json").read_text())
    status, _ = await bot.github(url, secret, opened)
    assert status == 202
    push = json.loads((CORPORA / "github/push/payload.json").read_text())
    status, _ = await bot.github(url, secret, push, event="push")
    assert status == 202
    await bot.settle()
    assert bot.cards() == []

"""`concurrency:` — at most N runs per key hold a slot; approval waits hold none; queue or skip."""

from __future__ import annotations

import asyncio
import json

from sqlalchemy import select

from bot.store.models import Run
from tests.conftest import BOTH_DATABASES, buttons, connection_from, write_workflow
from tests.fakes.http_target import Reply

pytestmark = BOTH_DATABASES


async def setup(make_bot, workflows, text: str):
    write_workflow(workflows, "pool", text)
    bot = await make_bot()
    url, secret = connection_from(await bot.command("enable pool"), "webhook")

    async def fire(payload: dict, delivery: str) -> None:
        status, _ = await bot.post(url, json.dumps(payload).encode(),
                                   {"Authorization": f"Bearer {secret}", "X-Request-Id": delivery})
        assert status == 202

    return bot, fire


async def runs(bot) -> list[Run]:
    async with bot.services.db.read() as session:
        return list((await session.execute(select(Run).order_by(Run.created_at))).scalars())


async def test_queue_keeps_at_most_limit_running_per_key(make_bot, workflows, target):
    for _ in range(6):
        target.queue("/deploy/prod", Reply(delay=0.6))
    bot, fire = await setup(make_bot, workflows, f"""
        name: pool
        on: webhook
        concurrency: {{limit: 1, key: event.env}}
        steps:
          - id: deploy
            uses: http.request
            with: {{url: "{target.url}/deploy/${{{{ event.env }}}}", method: PUT}}
        """)
    for index in range(3):
        await fire({"env": "prod"}, f"p{index}")
    await fire({"env": "staging"}, "s0")
    await bot.slack.wait_for(lambda: len(target.received) >= 2, timeout=15)
    # Staging has its own pool: it does not wait behind production.
    assert {r.path for r in target.received[:2]} == {"/deploy/prod", "/deploy/staging"}
    await bot.slack.wait_for(lambda: len(target.requests_to("/deploy/prod")) == 3, timeout=20)
    await bot.settle(timeout=20)
    prod = [r for r in target.received if r.path == "/deploy/prod"]
    assert len(prod) == 3
    assert all(state == "succeeded" for state in [run.state for run in await runs(bot)])
    queued = [card for card in bot.cards() if any("Queued until a slot is free" in line
                                                  for line in bot.thread_texts(card))]
    assert len(queued) == 2


async def test_runs_waiting_for_approval_hold_no_slot(make_bot, workflows, target):
    bot, fire = await setup(make_bot, workflows, f"""
        name: pool
        on: webhook
        concurrency: {{limit: 1}}
        steps:
          - id: gate
            approval: required
            uses: http.request
            with: {{url: "{target.url}/go/${{{{ event.n }}}}", method: PUT}}
        """)
    await fire({"n": 1}, "a")
    await fire({"n": 2}, "b")
    await bot.slack.wait_for(lambda: len([c for c in bot.cards() if "approve" in buttons(c)]) == 2, timeout=15)
    assert {run.state for run in await runs(bot)} == {"waiting"}
    for card in bot.cards():
        await bot.click(card, "approve")
    for card in bot.cards():
        await bot.wait_thread(card, "Run succeeded", timeout=20)
    assert len(target.received) == 2


async def test_skip_does_not_run_when_the_pool_is_full(make_bot, workflows, target):
    target.queue("/slow", Reply(delay=1.5))
    bot, fire = await setup(make_bot, workflows, f"""
        name: pool
        on: webhook
        concurrency: {{limit: 1, on_conflict: skip}}
        steps:
          - id: slow
            uses: http.request
            with: {{url: "{target.url}/slow", method: PUT}}
        """)
    await fire({}, "first")
    await bot.slack.wait_for(lambda: target.received, timeout=15)
    await fire({}, "second")
    await bot.slack.wait_for(lambda: len(bot.cards()) == 2, timeout=15)
    await asyncio.sleep(0.1)
    await bot.settle(timeout=20)
    states = sorted(run.state for run in await runs(bot))
    assert states == ["cancelled", "succeeded"]
    assert len(target.received) == 1
    skipped = [card for card in bot.cards() if any("Not run:" in line for line in bot.thread_texts(card))]
    assert len(skipped) == 1

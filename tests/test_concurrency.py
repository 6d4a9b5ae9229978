"""`concurrency:` — at most N runs per key hold a slot; approval waits hold none; queue or skip."""

from __future__ import annotations

import asyncio
import json

from sqlalchemy import select

from bot.store.models import Run
from tests.conftest import BOTH_DATABASES, buttons, connection_from, write_workflow
from tests.fakes.http_target import Reply

pytestmark = BOTH_DATABASES


async def setup(make_bot, workflows, text: str, *, name: str = "pool"):
    write_workflow(workflows, name, text)
    bot = await make_bot()
    url, secret = connection_from(await bot.command(f"enable {name}"), "webhook")

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


async def test_a_run_waiting_for_its_card_to_reply_in_takes_its_slot_first(make_bot, workflows, target, slack):
    """A first step that replies in the card's thread waits for the card's ts; the run was set running while it
    waited, without taking a slot, and the next round took `running` for a slot held: the limit let all through."""
    for _ in range(3):
        target.queue("/deploy", Reply(delay=1.0))
    bot, fire = await setup(make_bot, workflows, f"""
        name: pool
        on: webhook
        concurrency: {{limit: 1}}
        steps:
          - id: note
            uses: slack.post
            with: {{text: "deploying ${{{{ event.n }}}}", thread: true}}
          - id: deploy
            uses: http.request
            with: {{url: "{target.url}/deploy", method: PUT}}
        """)
    slack.answer_slowly("chat.postMessage", seconds=1.0, times=3)  # the cards' ts come late
    for index in range(3):
        await fire({"n": index}, f"d{index}")
    await bot.slack.wait_for(lambda: target.requests_to("/deploy"), timeout=20)
    await asyncio.sleep(0.5)
    assert len(target.requests_to("/deploy")) == 1, "a second deploy started while the first held the only slot"
    await bot.slack.wait_for(lambda: len(target.requests_to("/deploy")) == 3, timeout=30)
    await bot.settle(timeout=20)
    assert all(run.state == "succeeded" for run in await runs(bot))


async def test_a_long_workflow_name_and_key_still_make_a_pool_the_database_takes(make_bot, workflows, target):
    """A pool key longer than its column is hashed; the hash once left the workflow name whole, and a long name
    (up to 63 characters) made a key PostgreSQL refused: the event was set aside and no run started."""
    name = "deploy-" + "x" * 56
    bot, fire = await setup(make_bot, workflows, f"""
        name: {name}
        on: webhook
        concurrency: {{limit: 1, key: event.ref}}
        steps:
          - id: deploy
            uses: http.request
            with: {{url: "{target.url}/deploy", method: PUT}}
        """, name=name)
    for index in range(2):
        await fire({"ref": f"refs/heads/feature-{index}-" + "y" * 80}, f"long-{index}")
    await bot.slack.wait_for(lambda: len(target.requests_to("/deploy")) == 2, timeout=20)
    await bot.settle(timeout=20)
    pools = [run.concurrency_key for run in await runs(bot)]
    assert all(run.state == "succeeded" for run in await runs(bot))
    assert len(set(pools)) == 2 and all(len(key) <= 100 for key in pools), pools


async def test_a_run_cancelled_mid_step_keeps_its_slot_until_the_step_ends(make_bot, workflows, target):
    """`/relay cancel` freed the slot at once while the cancelled run's request was still in flight: the queued
    deploy started beside it, with `limit: 1` meant as a mutex."""
    target.queue("/deploy/1", Reply(delay=2.0))
    bot, fire = await setup(make_bot, workflows, f"""
        name: pool
        on: webhook
        concurrency: {{limit: 1}}
        steps:
          - id: deploy
            uses: http.request
            with: {{url: "{target.url}/deploy/${{{{ event.n }}}}", method: PUT}}
        """)
    await fire({"n": 1}, "first")
    await bot.slack.wait_for(lambda: target.requests_to("/deploy/1"), timeout=15)
    await fire({"n": 2}, "second")
    for _ in range(200):  # the second run queued behind the first
        if [run.state for run in await runs(bot)] == ["running", "queued"]:
            break
        await asyncio.sleep(0.05)
    first, second = await runs(bot)
    assert (first.state, second.state) == ("running", "queued")
    assert "cancelled" in (await bot.command(f"cancel {first.id}")).lower()
    await asyncio.sleep(1.0)
    assert not target.requests_to("/deploy/2"), "the queued run started while the cancelled one still deployed"
    await bot.slack.wait_for(lambda: target.requests_to("/deploy/2"), timeout=15)
    await bot.settle(timeout=20)
    assert [run.state for run in await runs(bot)] == ["cancelled", "succeeded"]

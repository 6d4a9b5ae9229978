"""The `schedule` trigger through the running app, on a fake clock: once per due time, across restarts and
processes; a time missed while the bot was down fires on start only within the grace period."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from bot.store.models import Event, TriggerState
from tests.conftest import BOTH_DATABASES, ROOT, block_texts, write_workflow
from tests.fakes import clock as fake_clock

pytestmark = BOTH_DATABASES
WORKFLOW = """
name: standup
title: Weekday standup
on:
  schedule: {cron: "0 9 * * 1-5", timezone: Europe/Berlin}
card:
  title: "Standup ${{ event.scheduled_at }}"
steps:
  - id: remind
    uses: slack.post
    with: {text: "Standup time (${{ trigger.kind }})", thread: true}
"""
# Monday 2 March 2026, 08:50 in Berlin (CET, UTC+1): ten minutes before the first due time.
MONDAY_0850 = datetime(2026, 3, 2, 7, 50, tzinfo=UTC)


@pytest.fixture
def clock(monkeypatch):
    return fake_clock.install(monkeypatch, MONDAY_0850)


async def run_triggers(*bots) -> None:
    await asyncio.gather(*(bot.services.triggers.tick() for bot in bots))
    for bot in bots:
        while not await bot.services.triggers.idle():
            await asyncio.sleep(0.02)
        await bot.settle()


async def start(make_bot, workflows, **env):
    write_workflow(workflows, "standup", WORKFLOW)
    bot = await make_bot(**env)
    await bot.command("enable standup")
    await run_triggers(bot)
    return bot


async def fired(bot) -> list[str]:
    async with bot.services.db.read() as session:
        return list((await session.execute(select(Event.delivery_id).where(Event.source == "schedule")
                                           .order_by(Event.id))).scalars())


async def next_at(bot) -> datetime:
    async with bot.services.db.read() as session:
        return (await session.execute(select(TriggerState.next_at))).scalar_one()


async def test_each_due_time_fires_once_also_across_a_restart(make_bot, workflows, clock):
    bot = await start(make_bot, workflows)
    assert await next_at(bot) == datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    assert "schedule: next run" in await bot.command("list")
    clock.set(datetime(2026, 3, 2, 7, 59, 59, tzinfo=UTC))
    await run_triggers(bot)
    assert bot.cards() == []

    clock.set(datetime(2026, 3, 2, 8, 0, 0, tzinfo=UTC))
    await run_triggers(bot)
    card = await bot.wait_card()
    assert "Standup 2026-03-02T09:00:00+01:00" in block_texts(card)
    thread = await bot.wait_thread(card, "Run succeeded")
    assert any("schedule event `schedule`" in line for line in thread)
    assert any("Standup time (schedule)" in line for line in thread)
    for _ in range(3):
        clock.advance(seconds=20)
        await run_triggers(bot)
    assert len(bot.cards()) == 1

    await bot.stop()
    again = await make_bot()
    await run_triggers(again)
    assert len(again.cards()) == 1
    # Tuesday 09:00 Berlin.
    clock.set(datetime(2026, 3, 3, 8, 0, 5, tzinfo=UTC))
    await run_triggers(again)
    await again.slack.wait_for(lambda: len(again.cards()) == 2)
    assert [delivery.split("@")[1] for delivery in await fired(again)] == ["2026-03-02T08:00Z", "2026-03-03T08:00Z"]
    listing = await again.command("list")
    assert "schedule: next run" in listing and ", last " in listing


async def test_a_missed_time_fires_on_start_only_within_the_grace_period(make_bot, workflows, clock, caplog):
    bot = await start(make_bot, workflows)
    await bot.stop()

    clock.set(datetime(2026, 3, 2, 8, 10, tzinfo=UTC))  # down through 09:00 Berlin; up at 09:10
    second = await make_bot()
    await run_triggers(second)
    await second.slack.wait_for(lambda: len(second.cards()) == 1)
    await run_triggers(second)
    assert len(second.cards()) == 1
    await second.stop()

    clock.set(datetime(2026, 3, 3, 8, 20, tzinfo=UTC))  # Tuesday: up 20 minutes late, past the 15-minute grace
    caplog.set_level(logging.WARNING, logger="bot.engine.triggers.loop")
    third = await make_bot()
    await run_triggers(third)
    assert len(third.cards()) == 1
    assert any("skipped the due times from 2026-03-03T08:00:00+00:00" in record.getMessage()
               and "missed by more than the grace period" in record.getMessage() for record in caplog.records)
    assert await next_at(third) == datetime(2026, 3, 4, 8, 0, tzinfo=UTC)
    await third.stop()

    clock.set(datetime(2026, 3, 4, 8, 40, tzinfo=UTC))  # Wednesday, 40 minutes late, with a longer grace
    fourth = await make_bot(schedule_grace="1h")
    await run_triggers(fourth)
    await fourth.slack.wait_for(lambda: len(fourth.cards()) == 2)
    assert [delivery.split("@")[1] for delivery in await fired(fourth)] == ["2026-03-02T08:00Z", "2026-03-04T08:00Z"]


async def test_two_bots_on_one_database_fire_once(make_bot, workflows, clock):
    one = await start(make_bot, workflows)
    two = await make_bot()
    for day in (2, 3, 4):
        clock.set(datetime(2026, 3, day, 8, 0, 1, tzinfo=UTC))
        for _ in range(3):
            await run_triggers(one, two)
    await one.slack.wait_for(lambda: len(one.cards()) == 3)
    async with one.services.db.read() as session:
        assert await session.scalar(select(func.count()).select_from(Event).where(Event.source == "schedule")) == 3
    assert len(one.cards()) == 3


async def test_the_inbox_lets_one_due_time_through_even_without_the_lease(make_bot, workflows, clock):
    """The last line of defence: two processes that both believe they hold the lease store one event."""
    bot = await start(make_bot, workflows)
    clock.set(datetime(2026, 3, 2, 8, 0, 1, tzinfo=UTC))
    await run_triggers(bot)
    async with bot.services.db.write() as session:  # as if the state had never been moved on
        state = (await session.execute(select(TriggerState))).scalar_one()
        state.next_at = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    await run_triggers(bot)
    assert len(await fired(bot)) == 1
    assert len(bot.cards()) == 1


async def test_the_weekday_standup_example(make_bot, clock):
    bot = await make_bot(workflows_dir=ROOT / "workflows")
    await bot.command("enable weekday-standup call_url=https://meet.example.com/ops")
    await run_triggers(bot)
    # Saturday 09:00 in Berlin is not a due time, and the week's due times are too old to fire now.
    clock.set(datetime(2026, 3, 7, 8, 0, 1, tzinfo=UTC))
    await run_triggers(bot)
    assert bot.cards() == []
    clock.set(datetime(2026, 3, 9, 8, 0, 1, tzinfo=UTC))  # Monday 9 March, 09:00 in Berlin
    await run_triggers(bot)
    card = await bot.wait_card()
    assert "Standup at 09:00" in block_texts(card) and "https://meet.example.com/ops" in block_texts(card)
    await bot.wait_thread(card, ":wave: Standup now: https://meet.example.com/ops")

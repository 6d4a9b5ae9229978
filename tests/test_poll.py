"""The `poll` trigger through the running app, on a fake clock, against a scriptable HTTP endpoint."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from bot.store.models import Event, PollSeenKey, TriggerState, Workspace
from tests.conftest import (
    ALICE,
    BOTH_DATABASES,
    CHANNEL,
    ROOT,
    TEAM,
    block_texts,
    buttons,
    free_socket,
    write_workflow,
)
from tests.fakes import clock as fake_clock
from tests.fakes.http_target import Reply

pytestmark = BOTH_DATABASES
PATH = "/repos/acme/api/releases"
WORKFLOW = """
name: releases
title: New releases
params:
  repo: {default: acme/api}
on:
  poll:
    every: 1m
    request:
      url: "TARGET/repos/${{ params.repo }}/releases"
      headers: {Authorization: "Bearer ${{ secrets.API_TOKEN }}"}
      query: {per_page: 5}
    items: response.json.releases
    key: item.id
card:
  title: "Release ${{ event.name }}"
steps:
  - id: note
    uses: slack.post
    with: {text: "released ${{ event.name }}", thread: true}
"""


@pytest.fixture
def clock(monkeypatch):
    return fake_clock.install(monkeypatch, datetime(2026, 3, 2, 8, 0, tzinfo=UTC))


def releases(*ids: int, **headers: str) -> Reply:
    return Reply(body={"releases": [{"id": i, "name": f"v{i}"} for i in ids]}, headers=headers)


async def state_of(bot) -> TriggerState | None:
    async with bot.services.db.read() as session:
        return (await session.execute(select(TriggerState).where(TriggerState.trigger == "poll"))).scalar_one_or_none()


async def run_triggers(*bots) -> None:
    """One round of every bot's trigger loop, and wait until what it started has finished."""
    await asyncio.gather(*(bot.services.triggers.tick() for bot in bots))
    for bot in bots:
        while not await bot.services.triggers.idle():
            await asyncio.sleep(0.02)


async def poll_now(clock, target, *bots, **advance) -> None:
    """Move the clock on and let the bots poll; fail if no request was made."""
    before = len(target.received)
    if advance:
        clock.advance(**advance)
    await run_triggers(*bots)
    assert len(target.received) > before, "no poll was made"
    for bot in bots:
        await bot.settle()


async def start(make_bot, workflows, target, *, secret: str | None = "tok-123", text: str = WORKFLOW):
    write_workflow(workflows, "releases", text.replace("TARGET", target.url))
    bot = await make_bot()
    if secret:
        await bot.set_secret("API_TOKEN", secret)
    reply = await bot.command("enable releases")
    assert "Enabled" in reply or "enabled" in reply
    return bot


async def cards_with(bot, text: str) -> list:
    return [card for card in bot.cards() if text in block_texts(card)]


async def test_baseline_then_each_new_item_starts_one_run_with_conditional_requests(make_bot, workflows, target,
                                                                                       clock):
    target.queue(PATH, releases(1, 2, ETag='"e1"'))
    bot = await start(make_bot, workflows, target)
    await poll_now(clock, target, bot)
    [first] = target.requests_to(PATH)
    assert first.headers["Authorization"] == "Bearer tok-123" and first.query == {"per_page": "5"}
    assert "If-None-Match" not in first.headers
    state = await state_of(bot)
    assert state.baseline_at == clock.now() and state.etag == '"e1"'
    assert bot.cards() == []  # the baseline starts nothing

    target.queue(PATH, releases(3, 1, 2, ETag='"e2"', **{"Last-Modified": "Mon, 02 Mar 2026 08:00:30 GMT"}))
    await poll_now(clock, target, bot, minutes=1)
    card = await bot.wait_card()
    assert "Release v3" in block_texts(card) and "New item 3" in block_texts(card)
    thread = await bot.wait_thread(card, "Run succeeded")
    assert any("poll event `poll`" in line and "delivery `" in line for line in thread)
    assert any("released v3" in line for line in thread)
    assert target.requests_to(PATH)[1].headers["If-None-Match"] == '"e1"'

    # Not modified: the validators of the last answer are sent, and a 304 starts nothing.
    target.queue(PATH, Reply(status=304, body=""))
    await poll_now(clock, target, bot, minutes=1)
    third = target.requests_to(PATH)[2]
    assert third.headers["If-None-Match"] == '"e2"'
    assert third.headers["If-Modified-Since"] == "Mon, 02 Mar 2026 08:00:30 GMT"
    assert len(bot.cards()) == 1
    assert (await state_of(bot)).last_success_at == clock.now()

    # Two new items at once: one run each, stored in the answer's order (cards may be posted in any order).
    target.queue(PATH, releases(5, 4, 3, 2, 1, ETag='"e3"'))
    await poll_now(clock, target, bot, minutes=1)
    await bot.slack.wait_for(lambda: len(bot.cards()) == 3)
    assert sorted(block_texts(card).split("\n")[0] for card in bot.cards()[1:]) == ["Release v4", "Release v5"]
    async with bot.services.db.read() as session:
        events = list((await session.execute(select(Event).where(Event.source == "poll").order_by(Event.id)))
                      .scalars())
    assert [event.payload for event in events] == [{"id": 3, "name": "v3"}, {"id": 5, "name": "v5"},
                                                   {"id": 4, "name": "v4"}]
    assert {event.kind for event in events} == {"poll"}
    assert "tok-123" not in str([call.args for call in bot.slack.calls])


async def test_the_poll_is_not_due_before_its_interval(make_bot, workflows, target, clock):
    target.queue(PATH, releases(1), releases(1, 2))
    bot = await start(make_bot, workflows, target)
    await poll_now(clock, target, bot)
    clock.advance(seconds=59)
    await run_triggers(bot)
    assert len(target.requests_to(PATH)) == 1
    await poll_now(clock, target, bot, seconds=1)
    await bot.wait_card(lambda card: "Release v2" in block_texts(card))


async def test_a_restart_starts_nothing_twice(make_bot, workflows, target, clock):
    target.queue(PATH, releases(1), releases(2, 1))
    first = await start(make_bot, workflows, target)
    await poll_now(clock, target, first)
    await poll_now(clock, target, first, minutes=1)
    await first.wait_card(lambda card: "Release v2" in block_texts(card))
    await first.stop()

    second = await make_bot()  # the same database, a new process
    target.queue(PATH, releases(2, 1), releases(3, 2, 1))
    await poll_now(clock, target, second, minutes=1)
    assert len(second.cards()) == 1
    await poll_now(clock, target, second, minutes=1)
    await second.wait_card(lambda card: "Release v3" in block_texts(card))
    await second.settle()
    assert [block_texts(card).split("\n")[0] for card in second.cards()] == ["Release v2", "Release v3"]


async def test_errors_back_off_and_show_in_the_channel_list(make_bot, workflows, target, clock):
    bot = await start(make_bot, workflows, target, secret=None)
    # No secret yet: the poll fails before any request, and says what to do.
    await run_triggers(bot)
    assert target.received == []
    state = await state_of(bot)
    assert state.failures == 1 and "API_TOKEN is not set" in state.last_error
    listing = await bot.command("list")
    assert "poll failed once" in listing and "`/relay secret set API_TOKEN`" in listing

    await bot.set_secret("API_TOKEN", "tok-123")
    target.queue(PATH, releases(1))
    await poll_now(clock, target, bot, minutes=2)  # the first backoff is twice the interval
    state = await state_of(bot)
    assert state.failures == 0 and state.baseline_at is not None and state.last_error is None

    target.queue(PATH, Reply(status=500, body="upstream exploded tok-123"))
    await poll_now(clock, target, bot, minutes=1)
    state = await state_of(bot)
    assert state.failures == 1 and state.next_at == clock.now() + timedelta(minutes=2)
    assert f"GET {target.url}{PATH} answered 500: upstream exploded ***" == state.last_error
    listing = await bot.command("list")
    assert "poll failed once" in listing and "answered 500" in listing and "tok-123" not in listing

    clock.advance(minutes=1)  # still backing off
    await run_triggers(bot)
    assert len(target.requests_to(PATH)) == 2

    target.queue(PATH, Reply(body={"releases": "not a list"}))
    await poll_now(clock, target, bot, minutes=1)
    state = await state_of(bot)
    assert state.failures == 2 and "items: `response.json.releases` gave str, not a list" in state.last_error
    assert "poll failed 2 times in a row" in await bot.command("list")

    clock.advance(minutes=3)
    await run_triggers(bot)
    assert len(target.requests_to(PATH)) == 3  # the second backoff is four times the interval
    target.queue(PATH, Reply(body={"releases": [{"id": 1}, {"name": "no id"}]}))
    await poll_now(clock, target, bot, minutes=1)
    assert "key: `item.id`: no such key" in (await state_of(bot)).last_error

    target.queue(PATH, releases(9, 1))
    await poll_now(clock, target, bot, minutes=8)
    await bot.wait_card(lambda card: "Release v9" in block_texts(card))
    state = await state_of(bot)
    assert state.failures == 0 and state.last_success_at == clock.now()
    listing = await bot.command("list")
    assert "poll: last checked" in listing and "failed" not in listing
    await bot.settle()
    assert len(bot.cards()) == 1


async def test_a_network_error_is_a_failure_with_the_address(make_bot, workflows, target, clock):
    sock = free_socket()
    closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    bot = await start(make_bot, workflows, target, text=WORKFLOW.replace("TARGET", closed))
    await run_triggers(bot)
    state = await state_of(bot)
    assert state.failures == 1 and state.baseline_at is None
    assert state.last_error.startswith(f"GET {closed}{PATH} failed")  # the request named once
    assert "poll failed once" in await bot.command("list")


async def test_two_bots_on_one_database_poll_once(make_bot, workflows, target, clock):
    target.queue(PATH, releases(1), releases(2, 1), releases(3, 2, 1))
    one = await start(make_bot, workflows, target)
    two = await make_bot()
    for minutes in (0, 1, 1):
        before = len(target.requests_to(PATH))
        await poll_now(clock, target, one, two, minutes=minutes)
        assert len(target.requests_to(PATH)) == before + 1
    await one.slack.wait_for(lambda: len(one.cards()) == 2)
    await one.settle()
    await two.settle()
    assert len(one.cards()) == 2
    async with one.services.db.read() as session:
        assert await session.scalar(select(func.count()).select_from(Event).where(Event.source == "poll")) == 2


async def test_an_uninstalled_workspace_polls_nothing_and_disable_forgets_the_keys(make_bot, workflows, target,
                                                                                   clock):
    target.queue(PATH, releases(1))
    bot = await start(make_bot, workflows, target)
    await poll_now(clock, target, bot)
    async with bot.services.db.read() as session:
        assert await session.scalar(select(func.count()).select_from(PollSeenKey)) == 1
    await bot.command("disable releases")
    await run_triggers(bot)
    assert await state_of(bot) is None
    async with bot.services.db.read() as session:
        assert await session.scalar(select(func.count()).select_from(PollSeenKey)) == 0

    await bot.command("enable releases")
    target.queue(PATH, releases(1))
    await poll_now(clock, target, bot, minutes=1)  # a new subscription takes a new baseline
    assert bot.cards() == []
    status, _ = await bot.slack.send_event(TEAM, {"type": "app_uninstalled", "event_ts": "1.0"})
    assert status == 200

    async def uninstalled() -> bool:
        async with bot.services.db.read() as session:
            workspace = await session.get(Workspace, TEAM)
            return workspace is not None and workspace.uninstalled_at is not None

    for _ in range(200):
        if await uninstalled():
            break
        await asyncio.sleep(0.05)
    assert await uninstalled()
    count = len(target.received)
    target.queue(PATH, releases(2, 1))
    clock.advance(hours=1)
    await run_triggers(bot)
    assert len(target.received) == count
    assert bot.slack.channel_messages(TEAM, CHANNEL) == []


def release(number: int, tag: str, **flags: bool) -> dict:
    return {"id": number, "tag_name": tag, "draft": flags.get("draft", False),
            "prerelease": flags.get("prerelease", False), "author": {"login": "octocat"},
            "published_at": "2026-03-02T08:00:00Z", "html_url": f"https://github.com/grafana/loki/releases/tag/{tag}"}


async def test_the_poll_new_releases_example(make_bot, target, github_api, clock):
    bot = await make_bot(workflows_dir=ROOT / "workflows", github_api_url=github_api.url)
    await bot.set_secret("GITHUB_TOKEN", github_api.token)
    path = "/repos/grafana/loki/releases"
    target.queue(path, Reply(body=[release(1, "v3.0.0")]),
                 Reply(body=[release(3, "v3.1.0-rc.1", prerelease=True), release(4, "v3.2.0", draft=True),
                             release(2, "v3.1.0"), release(1, "v3.0.0")]))
    await bot.command(f"enable poll-new-releases upstream=grafana/loki repo=acme/api api_url={target.url}")
    await poll_now(clock, target, bot)
    clock.advance(minutes=9)
    await run_triggers(bot)
    assert len(target.requests_to(path)) == 1  # every 10 minutes
    await poll_now(clock, target, bot, minutes=1)
    card = await bot.wait_card(lambda message: "approve" in buttons(message))
    text = block_texts(card)
    assert "grafana/loki v3.1.0" in text and "octocat" in text
    await bot.click(card, "approve", user=ALICE)
    thread = await bot.wait_thread(card, "Run succeeded")
    [issue] = github_api.issues
    assert issue["title"] == "Upgrade grafana/loki to v3.1.0" and issue["labels"] == [{"name": "dependencies"}]
    assert any("Opened https://github.com/acme/api/issues/1" in line for line in thread)
    polled = target.requests_to(path)[-1]
    assert polled.headers["Authorization"] == f"Bearer {github_api.token}" and polled.query == {"per_page": "20"}
    assert len(bot.cards()) == 1  # neither the pre-release nor the draft


async def test_enabling_again_with_other_parameters_takes_a_new_baseline(make_bot, workflows, target, clock):
    """`/relay enable releases repo=…` again changes the request the poll makes; its baseline was kept, so every
    item of the new repository was taken for new and started a run."""
    other = "/repos/acme/web/releases"
    target.queue(PATH, releases(1, 2))
    target.queue(other, releases(7, 8, 9), releases(10, 7, 8, 9))
    bot = await start(make_bot, workflows, target)
    await poll_now(clock, target, bot)
    assert "now with `repo=acme/web`" in await bot.command("enable releases repo=acme/web")
    await bot.services.triggers.sync(clock.now())
    await poll_now(clock, target, bot, minutes=1)
    assert target.requests_to(other) and bot.cards() == [], "the new repository's releases were taken for new"
    await poll_now(clock, target, bot, minutes=1)
    await bot.wait_card(lambda card: "Release v10" in block_texts(card))
    await bot.settle()
    assert len(bot.cards()) == 1

"""The Slack outbox: Slack saying 429 and 500 for a while, pacing per channel, and the metrics it leaves."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter

from tests.conftest import BOTH_DATABASES, CHANNEL, TEAM, connection_from, write_workflow

WORKFLOW = """
name: notify
on: webhook
steps:
  - id: a
    uses: http.request
    with: {url: "TARGET/a"}
"""


async def setup(make_bot, workflows, target, **env):
    write_workflow(workflows, "notify", WORKFLOW.replace("TARGET", target.url))
    bot = await make_bot(**env)
    url, secret = connection_from(await bot.command("enable notify"), "webhook")

    async def fire(index: int) -> None:
        status, _ = await bot.post(url, json.dumps({"summary": f"event {index}"}).encode(),
                                   {"Authorization": f"Bearer {secret}", "X-Request-Id": f"e{index}"})
        assert status == 202

    return bot, fire


def assert_five_whole_runs_in_order(bot) -> None:
    """Five cards, one per event, each with its whole thread in the order things happened."""
    expected = ["Run `", "*a* started", "*a* succeeded", "Run succeeded"]
    for card in bot.cards():
        thread = bot.thread_texts(card)
        assert len(thread) == len(expected), thread
        assert all(needle in line for needle, line in zip(expected, thread, strict=True)), thread
    summaries = Counter(re.search(r"event \d", message.text).group(0) for message in bot.cards())
    assert len(summaries) == 5 and set(summaries.values()) == {1}

async def test_slack_refusing_for_a_while_then_everything_arrives_once_and_in_order(make_bot, workflows, target,
                                                                                     slack):
    bot, fire = await setup(make_bot, workflows, target)
    slack.fail("chat.postMessage", status=429, headers={"Retry-After": "1"}, times=12)
    slack.fail("chat.postMessage", status=500, error="internal_error", times=8)
    for index in range(5):
        await fire(index)
    await bot.slack.wait_for(lambda: len(bot.cards()) == 5, timeout=60)
    for card in bot.cards():
        await bot.wait_thread(card, "Run succeeded", timeout=60)
    await bot.settle(timeout=60)
    assert_five_whole_runs_in_order(bot)
    refused = [call for call in slack.calls if call.method == "chat.postMessage" and call.status in (429, 500)]
    assert len(refused) == 20
    async with bot.http().get(f"{bot.url}/metrics") as response:
        metrics = await response.text()
    assert 'relaybot_slack_api_retries_total{method="chat.postMessage",reason="429"} 12.0' in metrics
    assert 'relaybot_slack_api_retries_total{method="chat.postMessage",reason="5xx"} 8.0' in metrics
    assert "relaybot_outbox_depth 0.0" in metrics


async def test_a_429_pauses_the_channel_for_as_long_as_slack_says(make_bot, workflows, target, slack):
    """Slack spells the header `retry-after`; it was looked up as `Retry-After`, missed, and every 429 waited the
    1 s fallback, so the outbox kept asking while Slack said to wait longer."""
    bot, fire = await setup(make_bot, workflows, target)
    slack.fail("chat.postMessage", status=429, headers={"retry-after": "3"}, times=1)
    await fire(0)
    await bot.slack.wait_for(lambda: len(bot.cards()) == 1, timeout=30)
    posts = [call for call in slack.calls if call.method == "chat.postMessage"]
    assert posts[0].status == 429 and posts[1].status == 200
    assert posts[1].at - posts[0].at >= 2.9, posts[1].at - posts[0].at


async def test_a_post_answered_with_a_5xx_after_slack_made_it_is_not_made_twice(make_bot, workflows, target,
                                                                                   slack):
    """A 502 from a proxy after Slack posted the message: the retry posted it again (a second card, whose first
    copy kept its buttons for good; a reply twice). A post that may have arrived is now looked for first."""
    bot, fire = await setup(make_bot, workflows, target)
    slack.fail("chat.postMessage", status=502, times=2, carried_out=True)  # the card, then its first reply
    await fire(0)
    await bot.slack.wait_for(lambda: bot.cards() and "Run succeeded" in " ".join(bot.thread_texts(bot.cards()[0])),
                             timeout=30)
    await bot.settle(timeout=30)
    [card] = bot.cards()
    thread = bot.thread_texts(card)
    expected = ["Run `", "*a* started", "*a* succeeded", "Run succeeded"]
    assert len(thread) == len(expected), thread
    assert all(needle in line for needle, line in zip(expected, thread, strict=True)), thread
    looked_up = {call.method for call in slack.calls}
    assert {"conversations.history", "conversations.replies"} <= looked_up


async def test_a_minute_of_slack_outage_then_the_outbox_drains_once_and_in_order(make_bot, workflows, target,
                                                                                 slack):
    """Slack answers every post with 429 (Retry-After) or 500 for a whole minute; afterwards every card and
    thread reply arrives, once each, in order."""
    bot, fire = await setup(make_bot, workflows, target)
    slack.fail_for("chat.postMessage", seconds=60, statuses=(429, 429, 429, 500))
    started = time.monotonic()
    for index in range(5):
        await fire(index)
    await asyncio.sleep(5)
    assert bot.cards() == [], "nothing gets through while Slack refuses"
    await bot.slack.wait_for(lambda: len(bot.cards()) == 5, timeout=180)
    assert time.monotonic() - started >= 59
    for card in bot.cards():
        await bot.wait_thread(card, "Run succeeded", timeout=120)
    await bot.settle(timeout=120)
    assert_five_whole_runs_in_order(bot)
    refused = [call for call in slack.calls if call.method == "chat.postMessage" and call.status in (429, 500)]
    assert {call.status for call in refused} == {429, 500}


async def test_messages_are_paced_per_channel(make_bot, workflows, target, slack):
    bot, fire = await setup(make_bot, workflows, target, slack_channel_rate=4)
    for index in range(4):
        await fire(index)
    await bot.slack.wait_for(lambda: len(bot.cards()) == 4, timeout=30)
    for card in bot.cards():
        await bot.wait_thread(card, "Run succeeded", timeout=30)
    await bot.settle(timeout=30)
    posts = sorted(call.at for call in slack.calls
                   if call.method in ("chat.postMessage", "chat.update") and call.args.get("channel") == CHANNEL)
    assert len(posts) >= 16
    # A burst of 3, then no more than 4 a second: 16+ messages need at least (16 - 3) / 4 seconds.
    assert posts[-1] - posts[0] >= (len(posts) - 3) / 4 - 0.3
    for first, second in zip(posts[3:], posts[7:], strict=False):
        assert second - first >= 0.9, "more than 4 messages in a second in one channel"


async def test_metrics_cover_the_whole_path(make_bot, workflows, target, slack):
    bot, fire = await setup(make_bot, workflows, target)
    await fire(1)
    await fire(1)  # a duplicate
    await bot.post(bot.url + "/hooks/c_unknown", b"{}", {})
    await bot.slack.wait_for(lambda: bot.cards())
    await bot.wait_thread(bot.cards()[0], "Run succeeded")
    await bot.settle()
    started = time.monotonic()
    async with bot.http().get(f"{bot.url}/metrics") as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        metrics = await response.text()
    assert time.monotonic() - started < 5
    for line in ('relaybot_events_received_total{source="webhook"} 1.0',
                 'relaybot_events_duplicate_total{source="webhook"} 1.0',
                 'relaybot_events_rejected_total{reason="unknown_connection",source="unknown"} 1.0',
                 'relaybot_runs_finished_total{outcome="succeeded"} 1.0',
                 'relaybot_step_duration_seconds_count{action="http.request"} 1.0',
                 'relaybot_slack_api_calls_total{method="chat.postMessage",result="ok"}',
                 "relaybot_outbox_depth 0.0", "relaybot_inbox_depth 0.0"):
        assert line in metrics, line
    assert TEAM not in metrics  # no workspace ids in label values


@BOTH_DATABASES
async def test_a_stalled_deliverer_that_lost_its_lane_posts_nothing_more(make_bot, workflows, target, slack):
    """Process A posts a card and stalls past its lease (its answer is slow and its lease is not renewed);
    process B takes the lane over, finds the card already in the channel and delivers the rest; when A wakes
    up it must notice and stop, so no message is posted twice."""
    first, fire = await setup(make_bot, workflows, target, outbox_lease_seconds=1)
    stalled = asyncio.Event()

    async def never_renew(delivery) -> None:  # a process whose event loop is stuck renews nothing
        await stalled.wait()

    first.services.outbox._keep_lease = never_renew
    slack.answer_slowly("chat.postMessage", seconds=3)
    await fire(0)
    card = await first.wait_card(timeout=10)  # posted; the answer has not reached process A yet
    second = await make_bot(outbox_lease_seconds=1)
    await second.wait_thread(card, "Run succeeded", timeout=20)
    await asyncio.sleep(3)  # A has its answer now and would go on posting
    await second.settle(timeout=20)
    await first.settle(timeout=20)
    assert len(first.cards()) == 1
    thread = first.thread_texts(card)
    assert len(thread) == len(set(thread)) == 4, thread
    cards_posted = [call for call in slack.calls if call.method == "chat.postMessage"
                    and (call.args.get("metadata") or {}).get("event_payload", {}).get("card")]
    assert len(cards_posted) == 1


@BOTH_DATABASES
async def test_lanes_behind_a_long_held_up_queue_are_still_claimed(database_url, monkeypatch):
    """Lanes are found among the oldest pending messages; when those all belong to lanes that must wait (a
    message postponed after a 429, a lane another process holds), every lane's head is looked at instead."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text as sql_text

    from bot.slack import outbox
    from bot.store import migrate
    from bot.store.db import Database
    from bot.store.models import OutboxMessage

    monkeypatch.setattr(outbox, "SCAN_ROWS", 4)
    monkeypatch.setattr(outbox, "SCAN_PAGE", 2)
    db = Database(database_url)
    await migrate.upgrade(db)
    now = datetime.now(UTC)

    def message(lane: str, *, due: datetime, leased: bool = False) -> OutboxMessage:
        return OutboxMessage(team_id=TEAM, channel_id=CHANNEL, run_id=None, lane=lane, kind="post", payload={},
                             state="pending", attempts=0, not_before=due, created_at=now,
                             lease_owner="other" if leased else None,
                             lease_until=now + timedelta(minutes=1) if leased else None)

    def lanes(session, *, wanted: int, exclude: set[str]):
        return outbox.Outbox._claimable_lanes(session, now=now, wanted=wanted, exclude=exclude,
                                              postgres=not db.is_sqlite)

    try:
        async with db.write() as session:
            session.add_all([message("postponed", due=now + timedelta(minutes=5)) for _ in range(3)])
            session.add_all([message("held", due=now, leased=True) for _ in range(3)])
            session.add(message("free-1", due=now))
            session.add(message("postponed", due=now))  # behind its lane's postponed head
            session.add(message("free-2", due=now))
        async with db.read() as session:
            assert list(await lanes(session, wanted=10, exclude=set())) == ["free-1", "free-2"]
            assert list(await lanes(session, wanted=1, exclude={"free-1"})) == ["free-2"]
            if not db.is_sqlite:  # the scan's planner settings end with it
                assert (await session.execute(sql_text("SHOW enable_sort"))).scalar() == "on"
        monkeypatch.setattr(outbox, "SCAN_ROWS", 100)  # found by reading the oldest messages
        async with db.read() as session:
            assert list(await lanes(session, wanted=10, exclude=set())) == ["free-1", "free-2"]
    finally:
        await db.dispose()


@BOTH_DATABASES
async def test_two_processes_that_saw_the_same_lanes_never_both_claim_one(database_url):
    """Lanes are looked for outside the claiming transaction, so two processes often find the same ones. Each
    lane must still go to one of them, with all its pending messages; and on PostgreSQL, while one process's
    claim is open, the other skips the lanes it is taking instead of waiting for it."""
    from datetime import UTC, datetime

    from sqlalchemy import select

    from bot.metrics import Metrics
    from bot.slack.client import SlackApi
    from bot.slack.outbox import Outbox
    from bot.store import migrate
    from bot.store.db import Database
    from bot.store.models import OutboxMessage

    db = Database(database_url)
    await migrate.upgrade(db)
    metrics = Metrics()
    slack = SlackApi(base_url="http://127.0.0.1:9/api/", tokens=None, metrics=metrics)  # never called
    first, second = (Outbox(db=db, slack=slack, metrics=metrics, owner=owner, rate=1.0)
                     for owner in ("first", "second"))
    now = datetime.now(UTC)

    async def add_lanes(*lanes: str) -> None:
        async with db.write() as session:
            session.add_all([OutboxMessage(team_id=TEAM, channel_id=CHANNEL, run_id=None, lane=lane, kind="post",
                                           payload={}, state="pending", attempts=0, not_before=now,
                                           created_at=now) for lane in lanes for _ in range(2)])

    async def scan() -> dict[str, int]:
        async with db.read() as session:
            return await Outbox._claimable_lanes(session, now=now, wanted=10, exclude=set(),
                                                 postgres=not db.is_sqlite)

    async def owners() -> dict[str, set[str | None]]:
        found: dict[str, set[str | None]] = {}
        async with db.read() as session:
            for lane, owner in await session.execute(select(OutboxMessage.lane, OutboxMessage.lease_owner)):
                found.setdefault(lane, set()).add(owner)
        return found

    try:
        await add_lanes("a", "b", "c", "d")
        seen_by_first, seen_by_second = await scan(), await scan()
        assert list(seen_by_first) == list(seen_by_second) == ["a", "b", "c", "d"]
        taken = {lane: seen_by_first[lane] for lane in ("a", "c")}
        lanes, _, deliveries = await db.transaction(lambda session: first._claim(session, heads=taken, now=now))
        assert lanes == ["a", "c"] and all(len(deliveries[lane].rows) == 2 for lane in lanes)
        lanes, _, deliveries = await db.transaction(
            lambda session: second._claim(session, heads=seen_by_second, now=now))
        assert lanes == ["b", "d"] and all(len(deliveries[lane].rows) == 2 for lane in lanes)
        assert await owners() == {"a": {"first"}, "b": {"second"}, "c": {"first"}, "d": {"second"}}

        if not db.is_sqlite:  # SQLite's claims cannot overlap: they take its write lock
            await add_lanes("e", "f")
            heads = await scan()
            assert list(heads) == ["e", "f"]
            async with db.write() as session:
                lanes, _, _ = await first._claim(session, heads=heads, now=now)
                assert lanes == ["e", "f"]
                # Still uncommitted: the second process neither waits for it nor takes its lanes.
                lanes, _, _ = await asyncio.wait_for(
                    db.transaction(lambda session: second._claim(session, heads=heads, now=now)), 5)
                assert lanes == []
            lanes, _, _ = await db.transaction(lambda session: second._claim(session, heads=heads, now=now))
            assert lanes == []  # committed now: their heads are leased
            found = await owners()
            assert found["e"] == found["f"] == {"first"}
    finally:
        await db.dispose()


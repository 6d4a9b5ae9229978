"""The intake: an event it fails on, on its own, is set aside and does not hold up the events after it."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError

from bot.cli.events import list_set_aside, retry
from bot.engine import intake
from bot.store.db import database_unavailable
from bot.store.inbox import NewEvent
from bot.store.models import AuditRecord, Event, Run
from tests.conftest import BOTH_DATABASES, TEAM, write_workflow

CATCH = """
name: catch
on: {webhook: {}}
steps: []
"""


async def store_together(bot, payloads: list[dict]) -> list[int]:
    """Events written in one transaction, so that the intake takes them in one batch."""
    now = datetime.now(UTC)
    async with bot.services.db.write() as session:
        events = [Event(**NewEvent(team_id=TEAM, source="webhook", delivery_id=f"d-{index}", kind="webhook",
                                   payload=payload, received_at=now, summary=f"event {index}").row())
                  for index, payload in enumerate(payloads)]
        session.add_all(events)
        await session.flush()
        ids = [event.id for event in events]
    bot.services.engine.events_stored()
    return ids


@BOTH_DATABASES
async def test_an_event_the_intake_fails_on_is_set_aside_and_the_others_start(make_bot, workflows, monkeypatch):
    write_workflow(workflows, "catch", CATCH)
    bot = await make_bot()
    await bot.command("enable catch")
    real_render_card = intake.render_card

    def render_card(**kwargs):
        if kwargs["event"].payload.get("poison"):
            raise KeyError("a bug met by this payload only")
        return real_render_card(**kwargs)

    monkeypatch.setattr(intake, "render_card", render_card)
    first, poison, last = await store_together(bot, [{"n": 1}, {"poison": True}, {"n": 3}])
    await bot.slack.wait_for(lambda: len(bot.cards()) == 2)
    await bot.settle()
    async with bot.services.db.read() as session:
        set_aside = await session.get(Event, poison)
        started = set((await session.execute(select(Run.event_id))).scalars())
        [record] = (await session.execute(select(AuditRecord).where(AuditRecord.action == "event.set_aside"))
                    ).scalars()
    assert started == {first, last}
    assert set_aside.processed_at is not None and set_aside.intake_error.startswith("KeyError: ")
    ref = set_aside.intake_error.rsplit("[ref ", 1)[1].rstrip("]")
    assert record.details == {"event_id": poison, "source": "webhook", "kind": "webhook", "delivery": "d-1",
                              "error": "KeyError", "ref": ref}
    async with bot.http().get(f"{bot.url}/metrics") as response:
        assert 'relaybot_events_set_aside_total{source="webhook"} 1.0' in await response.text()

    listed = io.StringIO()
    assert await list_set_aside(bot.services.settings, team=None, out=listed) == 0
    assert listed.getvalue().startswith(f"{poison}\t{TEAM}\twebhook\twebhook\td-1\t") and ref in listed.getvalue()

    monkeypatch.setattr(intake, "render_card", real_render_card)  # the fix is deployed
    told = io.StringIO()
    assert await retry(bot.services.settings, ids=[poison, 999999], team=None, out=told) == 1
    assert "event 999999 is not set aside" in told.getvalue() and "1 event(s) back in the inbox" in told.getvalue()
    bot.services.engine.events_stored()
    await bot.slack.wait_for(lambda: len(bot.cards()) == 3)
    await bot.settle()
    async with bot.services.db.read() as session:
        assert set((await session.execute(select(Run.event_id))).scalars()) == {first, poison, last}
        assert (await session.get(Event, poison)).intake_error is None
    listed = io.StringIO()
    await list_set_aside(bot.services.settings, team=None, out=listed)
    assert listed.getvalue() == "no events are set aside\n"


async def test_a_database_that_fails_sets_nothing_aside(make_bot, workflows, monkeypatch):
    write_workflow(workflows, "catch", CATCH)
    bot = await make_bot()
    await bot.command("enable catch")
    real_take = intake.Intake._take
    failures = {"left": 6}

    async def take(self, pending, pending_locked):
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("SELECT …", {}, Exception("server closed the connection unexpectedly"))
        return await real_take(self, pending, pending_locked)

    monkeypatch.setattr(intake.Intake, "_take", take)
    await store_together(bot, [{"n": 1}, {"n": 2}])
    await bot.slack.wait_for(lambda: len(bot.cards()) == 2, timeout=20)
    async with bot.services.db.read() as session:
        assert (await session.execute(select(Event).where(Event.intake_error.is_not(None)))).scalars().all() == []


def test_what_counts_as_the_database_being_unavailable():
    assert database_unavailable(OperationalError("x", {}, Exception("database is locked")))
    assert database_unavailable(InterfaceError("x", {}, Exception("connection is closed")))
    assert database_unavailable(ConnectionRefusedError()) and database_unavailable(TimeoutError())
    assert not database_unavailable(DataError("x", {}, Exception("value too long for type character varying")))
    assert not database_unavailable(IntegrityError("x", {}, Exception("duplicate key")))
    assert not database_unavailable(KeyError("payload"))


@BOTH_DATABASES
async def test_a_workflow_version_whose_transaction_failed_is_stored_again(make_bot, workflows, monkeypatch):
    """The intake stores each workflow version once per process; one stored by a transaction that then failed
    was never stored, and the runs of the next transaction must not name it as if it were."""
    write_workflow(workflows, "catch", CATCH)
    bot = await make_bot()
    await bot.command("enable catch")
    real_store_version = intake.Intake._store_version
    failures = {"left": 1}

    async def store_version(self, session, workflow, now):
        await real_store_version(self, session, workflow, now)
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("INSERT …", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(intake.Intake, "_store_version", store_version)
    await store_together(bot, [{"n": 1}, {"n": 2}])
    await bot.slack.wait_for(lambda: len(bot.cards()) == 2, timeout=20)
    await bot.settle()
    assert failures["left"] == 0
    async with bot.services.db.read() as session:
        assert (await session.execute(select(Event).where(Event.intake_error.is_not(None)))).scalars().all() == []


async def test_a_payload_the_default_card_cannot_read_still_starts_its_run(make_bot, workflows):
    """PagerDuty's `assignees` as a number: the door accepts the signed event, and its run starts with a card
    of the summary only (the card once failed the intake, and the event was set aside)."""
    import hashlib
    import hmac
    import json

    from bot.audit import Actor
    from bot.slack.secrets import store_connection_secret
    from tests.conftest import CORPORA

    write_workflow(workflows, "pd", "name: pd\non: {pagerduty: {}}\nsteps: []\n")
    bot = await make_bot()
    await bot.command("enable pd")
    connection, _ = await store_connection_secret(bot.services.db, bot.services.keyring, team_id=TEAM,
                                                  integration="pagerduty", value="pd-secret",
                                                  actor=Actor("U0ADMIN01", "ada"))
    payload = json.loads((CORPORA / "pagerduty/incident.priority_updated.json").read_text())
    payload["event"]["data"]["assignees"] = 3
    body = json.dumps(payload).encode()
    digest = hmac.new(b"pd-secret", body, hashlib.sha256).hexdigest()
    status, _ = await bot.post(f"{bot.url}/hooks/{connection}", body, {
        "Content-Type": "application/json", "X-Webhook-Id": "w1", "X-PagerDuty-Signature": f"v1={digest}"})
    assert status == 202
    card = await bot.wait_card()
    await bot.settle()
    async with bot.services.db.read() as session:
        event = (await session.execute(select(Event))).scalar_one()
        run = (await session.execute(select(Run))).scalar_one()
    assert event.intake_error is None and run.state == "succeeded"
    assert run.card["title"] == "pd" and card.text

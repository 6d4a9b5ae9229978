"""Deliveries through the running app: a redelivery starts one run, a ping is answered and starts nothing, a body
the integration cannot read is a 400 that starts nothing."""

from __future__ import annotations

import json

from sqlalchemy import func, select

from bot.store.models import Event, Run
from tests.conftest import CORPORA, write_workflow
from tests.integrations.conftest import alertmanager_headers, dumps, gitlab_headers, pagerduty_headers

WORKFLOW = """
    name: {name}
    on: [{trigger}]
    """


async def runs(bot) -> int:
    async with bot.services.db.read() as session:
        return (await session.execute(select(func.count()).select_from(Run))).scalar_one()


async def events(bot) -> int:
    async with bot.services.db.read() as session:
        return (await session.execute(select(func.count()).select_from(Event))).scalar_one()


async def enable(bot, name: str) -> tuple[str, str]:
    from tests.integrations.conftest import enable_and_connect

    return await enable_and_connect(bot, name)


async def test_a_gitlab_redelivery_starts_one_run(make_bot, workflows):
    write_workflow(workflows, "gl", WORKFLOW.format(name="gl", trigger="gitlab"))
    bot = await make_bot()
    url, secret = await enable(bot, "gl")
    payload = json.loads((CORPORA / "gitlab/push.json").read_text())
    first = await bot.post(url, dumps(payload), gitlab_headers(secret, payload, event_uuid="same-uuid"))
    second = await bot.post(url, dumps(payload), gitlab_headers(secret, payload, event_uuid="same-uuid"))
    assert first[0] == second[0] == 202
    assert second[1]["duplicate"] is True and second[1]["event"] == first[1]["event"]
    # Another hook fired by the same GitLab request shares the UUID but is another event.
    note = json.loads((CORPORA / "gitlab/note_issue.json").read_text())
    third = await bot.post(url, dumps(note), gitlab_headers(secret, note, event_uuid="same-uuid"))
    assert third[0] == 202 and third[1]["duplicate"] is False
    # GitLab 17.4+: "Resend request" sends a new event UUID with the first delivery's Idempotency-Key.
    mr = json.loads((CORPORA / "gitlab/merge_request.json").read_text())
    sent = await bot.post(url, dumps(mr), gitlab_headers(secret, mr, event_uuid="u-1", idempotency_key="idem-1"))
    resent = await bot.post(url, dumps(mr), gitlab_headers(secret, mr, event_uuid="u-2", idempotency_key="idem-1"))
    assert sent[1]["duplicate"] is False and resent[1]["duplicate"] is True
    await bot.slack.wait_for(lambda: len(bot.cards()) >= 3)
    await bot.settle()
    assert await runs(bot) == 3


async def test_a_pagerduty_redelivery_starts_one_run_and_a_ping_none(make_bot, workflows):
    write_workflow(workflows, "pd", WORKFLOW.format(name="pd", trigger="pagerduty"))
    bot = await make_bot()
    url, secret = await enable(bot, "pd")
    body = (CORPORA / "pagerduty/incident.priority_updated.json").read_bytes()
    first = await bot.post(url, body, pagerduty_headers(secret, body, webhook_id="wh-1"))
    second = await bot.post(url, body, pagerduty_headers(secret, body, webhook_id="wh-1"))
    assert first[0] == second[0] == 202 and second[1]["duplicate"] is True
    ping = dumps({"event": {"id": "ping-1", "event_type": "pagey.ping", "resource_type": "pagey",
                            "occurred_at": "2026-01-01T00:00:00Z", "data": {"message": "Hello from your friend Pagey!",
                                                                              "type": "ping"}}})
    answered = await bot.post(url, ping, pagerduty_headers(secret, ping))
    assert answered[0] == 200  # a test event, answered like GitHub's ping
    await bot.wait_card()
    await bot.settle()
    assert await runs(bot) == 1 and len(bot.cards()) == 1


async def test_bodies_an_integration_cannot_read_are_400_and_start_nothing(make_bot, workflows):
    for name, trigger in (("gl", "gitlab"), ("pd", "pagerduty"), ("am", "alertmanager")):
        write_workflow(workflows, name, WORKFLOW.format(name=name, trigger=trigger))
    bot = await make_bot()
    gl, pd, am = [await enable(bot, name) for name in ("gl", "pd", "am")]
    status, answer = await bot.post(gl[0], b'{"no": "kind"}', gitlab_headers(gl[1], {}))
    assert status == 400 and "object_kind" in answer["error"]
    body = b'{"event": {}}'
    status, answer = await bot.post(pd[0], body, pagerduty_headers(pd[1], body))
    assert status == 400 and "event_type" in answer["error"]
    status, answer = await bot.post(am[0], b'{"status": "firing"}', alertmanager_headers(am[1]))
    assert status == 400 and "alerts" in answer["error"]
    status, _ = await bot.post(am[0], b"not json", alertmanager_headers(am[1]))
    assert status == 400
    # Well formed but nothing to act on (a hand-made test notification): answered 200, starts nothing.
    status, _ = await bot.post(am[0], b'{"status": "firing", "alerts": []}', alertmanager_headers(am[1]))
    assert status == 200
    await bot.settle()
    assert await events(bot) == 1 and await runs(bot) == 0 and bot.cards() == []

"""Every corpus payload, signed as the real tool signs it, through the running app: each starts one run whose card
has a summary naming the repository, project, service or alert; a one-byte change is rejected and starts nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bot.emulator.webapi import Message
from bot.store.models import Event, Run
from tests.conftest import CORPORA, block_texts, github_headers, write_workflow
from tests.integrations.conftest import (
    alertmanager_headers,
    dumps,
    enable_and_connect,
    gitlab_headers,
    pagerduty_headers,
)

GITHUB_FILES = sorted((CORPORA / "github").rglob("*.json"))
GITLAB_FILES = sorted((CORPORA / "gitlab").glob("*.json"))
PAGERDUTY_FILES = sorted((CORPORA / "pagerduty").glob("*.json"))
ALERTMANAGER_FILES = sorted((CORPORA / "alertmanager").glob("*.json"))


def catch_all(name: str, trigger: str, events: list[str] | None = None) -> str:
    """A workflow that starts for every event of `trigger` and shows the delivery id on its card."""
    filters = f"{{events: [{', '.join(events)}]}}" if events else "{}"
    return f"""
        name: {name}
        on:
          {trigger}: {filters}
        card:
          fields:
            Delivery: "${{{{ trigger.delivery }}}}"
        steps:
          - id: note
            uses: slack.post
            with:
              text: "seen ${{{{ trigger.kind }}}}"
              thread: true
        """


def summary_of(card: Message) -> str:
    """The card's summary line: the section that links to the source (or the plain one under the header)."""
    for block in card.blocks or []:
        if block.get("type") == "section" and isinstance(block.get("text"), dict):
            text = block["text"]["text"]
            match = re.fullmatch(r"<[^|>]+\|(.*)>", text, flags=re.S)
            return match.group(1) if match else text
    return ""


def delivery_of(card: Message) -> str:
    match = re.search(r"\*Delivery\*\n(\S+)", block_texts(card))
    return match.group(1) if match else ""


async def enable(bot: Any, workflow: str) -> tuple[str, str]:
    return await enable_and_connect(bot, workflow)


async def cards_by_delivery(bot: Any, expected: int, timeout: float) -> dict[str, Message]:
    await bot.slack.wait_for(lambda: len([c for c in bot.cards() if delivery_of(c)]) >= expected, timeout=timeout)
    await bot.settle(timeout=timeout)
    return {delivery_of(card): card for card in bot.cards()}


async def count(bot: Any, model: Any, **where: Any) -> int:
    async with bot.services.db.read() as session:
        query = select(func.count()).select_from(model)
        for column, value in where.items():
            query = query.where(getattr(model, column) == value)
        return (await session.execute(query)).scalar_one()


# ------------------------------------------------------------------------------------------------ GitHub


def github_owner(payload: dict[str, Any]) -> str:
    return (payload.get("repository") or {}).get("full_name") or payload["organization"]["login"]


async def test_every_github_payload_starts_a_run_with_a_summary_naming_the_repository(make_bot, workflows):
    events = sorted({path.relative_to(CORPORA / "github").parts[0] for path in GITHUB_FILES})
    # `ping` only runs when subscribed: the workflow names every event so each file starts a run.
    write_workflow(workflows, "github-corpus", catch_all("github-corpus", "github", events))
    bot = await make_bot()
    url, secret = await enable(bot, "github-corpus")
    expected: dict[str, str] = {}
    for index, path in enumerate(GITHUB_FILES):
        body = path.read_bytes()  # the bytes as published: the signature covers them exactly
        delivery = f"gh-{index:03d}"
        status, answer = await bot.post(url, body, github_headers(secret, body, event=path.parent.name,
                                                                  delivery=delivery))
        assert status == (200 if path.parent.name == "ping" else 202), (path, answer)  # SPEC: a ping is 200
        expected[delivery] = github_owner(json.loads(body))
    cards = await cards_by_delivery(bot, len(GITHUB_FILES), timeout=240)
    problems = []
    for delivery, owner in expected.items():
        summary = summary_of(cards[delivery]) if delivery in cards else ""
        if not summary.strip() or owner not in summary:
            problems.append((GITHUB_FILES[int(delivery[3:])].relative_to(CORPORA), summary))
    assert problems == []
    assert await count(bot, Run) == len(GITHUB_FILES)


# ------------------------------------------------------------------------------------------------ GitLab


def gitlab_project(payload: dict[str, Any]) -> str:
    if payload.get("project"):
        return payload["project"]["path_with_namespace"]
    return payload["repository"]["homepage"].split("://", 1)[1].split("/", 1)[1]  # job events


async def test_every_gitlab_payload_starts_a_run_with_a_summary_naming_the_project(make_bot, workflows):
    write_workflow(workflows, "gitlab-corpus", catch_all("gitlab-corpus", "gitlab"))
    bot = await make_bot()
    url, secret = await enable(bot, "gitlab-corpus")
    expected: dict[str, tuple[Path, str]] = {}
    for index, path in enumerate(GITLAB_FILES):
        body = path.read_bytes()
        event_uuid = f"00000000-0000-4000-8000-{index:012d}"
        status, answer = await bot.post(url, body, gitlab_headers(secret, json.loads(body), event_uuid=event_uuid))
        assert status == 202, (path, answer)
        expected[event_uuid] = (path, gitlab_project(json.loads(body)))
    cards = await cards_by_delivery(bot, len(GITLAB_FILES), timeout=60)
    by_uuid = {delivery.split(":")[0]: card for delivery, card in cards.items()}
    for event_uuid, (path, project) in expected.items():
        summary = summary_of(by_uuid[event_uuid])
        assert summary.strip() and project in summary, (path.name, summary)
    assert await count(bot, Run) == len(GITLAB_FILES)


async def test_gitlab_kinds_and_events_filter(make_bot, workflows):
    write_workflow(workflows, "gitlab-mr", """
        name: gitlab-mr
        on:
          gitlab: {events: [merge_request, note]}
        if: trigger.kind == "merge_request.open" || event.object_attributes.noteable_type == "MergeRequest"
        card:
          fields: {Kind: "${{ trigger.kind }}"}
        """)
    bot = await make_bot()
    url, secret = await enable(bot, "gitlab-mr")
    for path in GITLAB_FILES:
        body = path.read_bytes()
        status, _ = await bot.post(url, body, gitlab_headers(secret, json.loads(body)))
        assert status == 202
    await bot.slack.wait_for(lambda: len(bot.cards()) >= 2, timeout=30)
    await bot.settle()
    kinds = sorted(re.search(r"\*Kind\*\n(\S+)", block_texts(card)).group(1) for card in bot.cards())
    assert kinds == ["merge_request.open", "note.create"]


# ------------------------------------------------------------------------------------------------ PagerDuty


async def test_every_pagerduty_payload_starts_a_run_with_a_summary_naming_the_service(make_bot, workflows):
    write_workflow(workflows, "pagerduty-corpus", catch_all("pagerduty-corpus", "pagerduty"))
    bot = await make_bot()
    url, secret = await enable(bot, "pagerduty-corpus")
    expected = {}
    for index, path in enumerate(PAGERDUTY_FILES):
        body = path.read_bytes()
        webhook_id = f"pd-{index}"
        status, answer = await bot.post(url, body, pagerduty_headers(secret, body, webhook_id=webhook_id))
        assert status == 202, (path, answer)
        data = json.loads(body)["event"]["data"]
        expected[webhook_id] = data["service"]["summary"]
    cards = await cards_by_delivery(bot, len(PAGERDUTY_FILES), timeout=30)
    for webhook_id, service in expected.items():
        summary = summary_of(cards[webhook_id])
        assert service in summary, summary
    assert "API Service: incident #2 priority updated to P1 by Tenex Engineer: A little bump in the road" in \
        summary_of(cards["pd-0"])
    assert await count(bot, Run) == len(PAGERDUTY_FILES)


async def test_pagerduty_events_filter_on_event_type(make_bot, workflows):
    write_workflow(workflows, "pd-ack", """
        name: pd-ack
        on:
          pagerduty: {events: [incident.triggered]}
        """)
    bot = await make_bot()
    url, secret = await enable(bot, "pd-ack")
    priority = PAGERDUTY_FILES[0].read_bytes()
    status, _ = await bot.post(url, priority, pagerduty_headers(secret, priority))
    assert status == 202
    triggered = json.loads(priority)
    triggered["event"]["event_type"] = "incident.triggered"
    body = dumps(triggered)
    status, _ = await bot.post(url, body, pagerduty_headers(secret, body))
    assert status == 202
    card = await bot.wait_card()
    await bot.settle()
    assert len(bot.cards()) == 1 and "incident #2 triggered" in summary_of(card)


# ------------------------------------------------------------------------------------------------ Alertmanager


async def test_every_alertmanager_notification_starts_one_run_naming_the_alert(make_bot, workflows):
    write_workflow(workflows, "alert-corpus", catch_all("alert-corpus", "alertmanager"))
    bot = await make_bot()
    url, secret = await enable(bot, "alert-corpus")
    for index, path in enumerate(ALERTMANAGER_FILES):
        status, answer = await bot.post(url, path.read_bytes(), alertmanager_headers(secret, basic=index % 2 == 1))
        assert status == 202, (path, answer)
    await bot.slack.wait_for(lambda: len(bot.cards()) >= len(ALERTMANAGER_FILES), timeout=30)
    await bot.settle()
    summaries = sorted(summary_of(card) for card in bot.cards())
    assert summaries == ["[FIRING:2] HighErrorRate (job=api, severity=page): API 5xx ratio above 5%",
                         "[RESOLVED:1] HighErrorRate (job=api, severity=page): API 5xx ratio above 5%"]
    async with bot.services.db.read() as session:
        kinds = sorted((await session.execute(select(Event.kind))).scalars())
    assert kinds == ["alert.firing", "alert.resolved"]


async def test_an_identical_alertmanager_notification_within_five_minutes_is_a_duplicate(make_bot, workflows):
    write_workflow(workflows, "alert-corpus", catch_all("alert-corpus", "alertmanager"))
    bot = await make_bot()
    url, secret = await enable(bot, "alert-corpus")
    firing = json.loads((CORPORA / "alertmanager/firing.json").read_text())
    first = await bot.post(url, dumps(firing), alertmanager_headers(secret))
    # The other peer of an HA pair sends the same notification with its own external URL.
    peer = {**firing, "externalURL": "http://alertmanager-1.example.com:9093"}
    second = await bot.post(url, dumps(peer), alertmanager_headers(secret, basic=True))
    assert first[0] == second[0] == 202
    assert second[1]["duplicate"] is True and second[1]["event"] == first[1]["event"]
    # A new alert in the group is a new notification.
    grown = {**firing, "alerts": [*firing["alerts"], {**firing["alerts"][0], "fingerprint": "0000000000000001"}]}
    third = await bot.post(url, dumps(grown), alertmanager_headers(secret))
    assert third[0] == 202 and third[1]["duplicate"] is False
    await bot.slack.wait_for(lambda: len(bot.cards()) >= 2, timeout=20)
    await bot.settle()
    assert len(bot.cards()) == 2 and await count(bot, Run) == 2


async def test_the_two_peers_of_an_alertmanager_pair_sending_at_the_same_moment_start_one_run(make_bot, workflows):
    write_workflow(workflows, "alert-corpus", catch_all("alert-corpus", "alertmanager"))
    bot = await make_bot()
    url, secret = await enable(bot, "alert-corpus")
    firing = json.loads((CORPORA / "alertmanager/firing.json").read_text())
    peers = [{**firing, "externalURL": f"http://alertmanager-{peer}.example.com:9093"} for peer in range(2)]
    answers = await asyncio.gather(*(bot.post(url, dumps(body), alertmanager_headers(secret)) for body in peers))
    assert [status for status, _ in answers] == [202, 202]
    assert sorted(bool(answer.get("duplicate")) for _, answer in answers) == [False, True]
    await bot.slack.wait_for(lambda: len(bot.cards()) >= 1, timeout=20)
    await bot.settle()
    assert len(bot.cards()) == 1 and await count(bot, Run) == 1


# ------------------------------------------------------------------------------------------------ tampering


def one_byte_changed(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


async def test_a_one_byte_change_to_body_or_signature_is_rejected_and_starts_nothing(make_bot, workflows):
    for name, trigger in (("gh", "github"), ("gl", "gitlab"), ("pd", "pagerduty"), ("am", "alertmanager")):
        write_workflow(workflows, name, catch_all(name, trigger))
    bot = await make_bot()
    urls = {name: await enable(bot, name) for name in ("gh", "gl", "pd", "am")}

    github_body = (CORPORA / "github/pull_request/opened.payload.json").read_bytes()
    gitlab_body = (CORPORA / "gitlab/merge_request.json").read_bytes()
    pagerduty_body = PAGERDUTY_FILES[0].read_bytes()
    alert_body = (CORPORA / "alertmanager/firing.json").read_bytes()
    url, secret = urls["gh"]
    signed = github_headers(secret, github_body, event="pull_request", delivery="t-1")
    signature = signed["X-Hub-Signature-256"]
    attempts: list[tuple[str, bytes, dict[str, str]]] = [
        (url, one_byte_changed(github_body, 100), signed),
        (url, github_body, {**signed, "X-Hub-Signature-256": signature[:-1] + ("0" if signature[-1] != "0" else "1")}),
        (url, github_body, {k: v for k, v in signed.items() if k != "X-Hub-Signature-256"}),
    ]
    url, secret = urls["pd"]
    signed = pagerduty_headers(secret, pagerduty_body)
    signature = signed["X-PagerDuty-Signature"]
    attempts += [
        (url, one_byte_changed(pagerduty_body, 50), signed),
        (url, pagerduty_body, {**signed, "X-PagerDuty-Signature": signature[:-1] + ("0" if signature[-1] != "0"
                                                                                     else "1")}),
    ]
    url, secret = urls["gl"]
    signed = gitlab_headers(secret, json.loads(gitlab_body))
    attempts += [(url, gitlab_body, {**signed, "X-Gitlab-Token": one_byte_changed(secret.encode(), 3).decode()}),
                 (url, gitlab_body, {k: v for k, v in signed.items() if k != "X-Gitlab-Token"})]
    url, secret = urls["am"]
    attempts += [(url, alert_body, alertmanager_headers(one_byte_changed(secret.encode(), 0).decode())),
                 (url, alert_body, alertmanager_headers(one_byte_changed(secret.encode(), 5).decode(), basic=True)),
                 (url, alert_body, {"Content-Type": "application/json"})]
    for target, body, headers in attempts:
        status, answer = await bot.post(target, body, headers)
        assert status == 401, (target, headers, answer)
    await bot.settle()
    assert bot.cards() == []
    assert await count(bot, Event) == 0 and await count(bot, Run) == 0

    # The same requests, untouched, are accepted: the rejections above were the changed byte's doing.
    url, secret = urls["gh"]
    status, _ = await bot.post(url, github_body, github_headers(secret, github_body, event="pull_request",
                                                                delivery="t-1"))
    assert status == 202
    url, secret = urls["pd"]
    assert (await bot.post(url, pagerduty_body, pagerduty_headers(secret, pagerduty_body)))[0] == 202

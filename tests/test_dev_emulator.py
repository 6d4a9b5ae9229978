"""`relaybot dev` over HTTP: the page and its state endpoint, and every action of the page reaching the bot
the way Slack and the tools would send it (signed), through the real doors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from sqlalchemy import select

from bot.cli import dev
from bot.emulator import senders
from bot.engine.loader import Catalog
from bot.settings import Settings
from bot.store.models import Run, Secret
from integrations.base import IncomingWebhook
from integrations.registry import INTEGRATIONS
from tests.conftest import CORPORA, write_workflow

DEPLOY = """
name: deploy
title: Deploy merged pull requests
on:
  github: {events: [pull_request]}
if: event.action == "closed" && event.pull_request.merged
steps:
  - id: ship
    title: Ship ${{ event.pull_request.number }}
    approval: required
    uses: slack.post
    with:
      text: "Shipping #${{ event.pull_request.number }}"
      thread: true
"""
YOU, ALICE = dev.YOU.id, "U0DEVALICE"
DEPLOYS = dev.CHANNELS[0][0]


class Page:
    """What the browser does, as plain HTTP."""

    def __init__(self, server: dev.DevServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.url = server.url

    async def state(self, user: str = YOU, since: int | None = None) -> dict[str, Any]:
        params = {"user": user} | ({"since": str(since)} if since is not None else {})
        async with self.http.get(f"{self.url}/_emulator/state", params=params) as response:
            assert response.status == 200
            return await response.json()

    async def post(self, path: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.http.post(f"{self.url}/_emulator/{path}", json={"user": YOU, **data}) as response:
            return response.status, await response.json()

    async def type(self, text: str, user: str = YOU) -> tuple[int, dict[str, Any]]:
        return await self.post("command", {"channel": DEPLOYS, "text": text, "user": user})

    async def wait(self, predicate: Callable[[dict[str, Any]], Any], user: str = YOU, timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = await self.state(user)
            found = predicate(state)
            if found:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"the page never showed what was expected; last state: {json.dumps(state)[:2000]}")


def ephemeral_texts(state: dict[str, Any]) -> list[str]:
    return [item["text"] for item in state["ephemeral"].get(DEPLOYS, [])]


def card_with(state: dict[str, Any], action: str | None = None) -> dict[str, Any] | None:
    for message in state["messages"][DEPLOYS]:
        for block in message["blocks"] or []:
            actions = [element.get("action_id") for element in block.get("elements", [])]
            if action is None or (block["type"] == "actions" and action in actions):
                return message
    return None


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    workflows = tmp_path / "workflows"
    write_workflow(workflows, "deploy", DEPLOY)
    settings = Settings(workflows_dir=workflows, worker_poll_interval=0.2, lease_seconds=5)
    directory = tmp_path / ".relaybot-dev"
    directory.mkdir()
    keys = dev.ensure_master_key(directory / "master.key")
    server = await dev.start(settings, Catalog.load([workflows]), directory=directory, master_keys=keys)
    async with aiohttp.ClientSession() as http:
        yield Page(server, http)
    await server.stop()


async def test_the_page_its_files_and_the_state_endpoint_serve(page):
    async with page.http.get(page.url + "/") as response:
        html = await response.text()
        assert response.status == 200 and "/static/app.js" in html and "/static/style.css" in html
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        async with page.http.get(f"{page.url}/static/{name}") as response:
            assert response.status == 200 and kind in response.content_type and len(await response.read()) > 1000
    state = await page.state()
    assert state["team"] == {"id": dev.TEAM_ID, "name": dev.TEAM_NAME}
    assert [channel["name"] for channel in state["channels"]] == ["deploys", "alerts"]
    assert {"id": YOU, "name": "you", "is_admin": True} in state["users"]
    github = next(item for item in state["integrations"] if item["name"] == "github")
    assert "pull_request.closed-merged" in github["examples"] and github["connection"] is None
    async with page.http.get(f"{page.url}/_emulator/examples/github/pull_request.closed-merged") as response:
        assert (await response.json())["pull_request"]["merged"] is True


async def test_the_state_long_poll_answers_at_the_next_change(page):
    first = await page.state()
    waiting = asyncio.create_task(page.state(since=first["version"]))
    await asyncio.sleep(0.3)
    assert not waiting.done(), "a long-poll with the current version must wait for a change"
    await page.type("hello everyone")
    changed = await asyncio.wait_for(waiting, timeout=5)
    assert changed["version"] > first["version"]
    assert changed["messages"][DEPLOYS][-1]["text"] == "hello everyone"


async def test_a_slash_command_typed_on_the_page_reaches_the_bot_signed(page):
    status, answer = await page.type("/relay help")
    assert status == 200 and answer == {"ok": True, "status": 200}
    texts = await page.wait(lambda state: ephemeral_texts(state))
    assert "enable" in texts[0] and "/relay" in texts[0]
    # The bot really checks Slack's signature: the same door refuses a request signed with another secret.
    emulator = page.server.emulator
    status, _ = await emulator.slash_command(dev.TEAM_ID, DEPLOYS, YOU, "help", signing_secret="not-the-secret")
    assert status == 401
    async with page.http.post(page.url + "/slack/events", data=b"command=%2Frelay&text=help") as response:
        assert response.status == 401
    # A command of another app is refused by the page, as Slack would.
    status, answer = await page.type("/deploy now")
    assert status == 400 and "not a command" in answer["error"]


async def test_send_event_signs_like_the_tool_starts_a_run_and_buttons_decide_it(page):
    await page.type("/relay enable deploy")
    state = await page.wait(lambda state: next(
        (state for item in state["integrations"] if item["name"] == "github" and item["connection"]), None))
    github = next(item for item in state["integrations"] if item["name"] == "github")
    assert github["connection"]["has_secret"] and "/hooks/" in github["connection"]["url"]

    status, answer = await page.post("event", {"integration": "github", "example": "pull_request.closed-merged"})
    assert status == 200 and answer["status"] == 202 and answer["answer"]["duplicate"] is False
    card = await page.wait(lambda state: card_with(state, "approve"))
    assert "Deploy merged pull requests" in json.dumps(card["blocks"])

    status, answer = await page.post("click", {"channel": DEPLOYS, "ts": card["ts"], "action_id": "approve",
                                               "user": ALICE})
    assert status == 200 and answer["status"] == 200

    def finished(state: dict[str, Any]) -> dict[str, Any] | None:
        message = next(m for m in state["messages"][DEPLOYS] if m["ts"] == card["ts"])
        replies = " ".join(reply["text"] for reply in message["replies"])
        return message if "Run succeeded" in replies and "succeeded" in json.dumps(message["blocks"]) else None

    final = await page.wait(finished)
    replies = [reply["text"] for reply in final["replies"]]
    assert any("approved by <@U0DEVALICE>" in text for text in replies)
    assert any("Shipping #2" in text for text in replies)
    assert card_with({"messages": {DEPLOYS: [final]}}, "approve") is None, "the buttons are gone"
    async with page.server.sandbox.services.db.read() as session:
        run = (await session.execute(select(Run))).scalar_one()
        assert run.state == "succeeded" and run.card_ts == card["ts"]

    # An edited body is sent as typed, and signed for what is sent.
    body = json.loads(Path(senders.find_example("github", "pull_request.opened").path).read_text())
    body["pull_request"]["title"] = "Edited on the page"
    status, answer = await page.post("event", {"integration": "github", "example": "pull_request.opened",
                                               "body": json.dumps(body)})
    assert answer["status"] == 202


async def test_send_event_before_any_connection_says_what_to_type(page):
    status, answer = await page.post("event", {"integration": "webhook", "example": "deploy-request"})
    assert status == 409 and "/relay connect webhook" in answer["error"]
    await page.type("/relay connect webhook")
    await page.wait(lambda state: next((i for i in state["integrations"]
                                        if i["name"] == "webhook" and i["connection"]), None))
    status, answer = await page.post("event", {"integration": "webhook", "example": "deploy-request"})
    assert answer["status"] == 202  # accepted (Standard Webhooks signature), and no workflow subscribes to it
    # Asked again, the bot shows the URL and how to sign (`webhook-signature` in backticks) but not the secret:
    # the page keeps signing with the one it read the first time.
    replies = len(ephemeral_texts(await page.state()))
    await page.type("/relay connect webhook")
    await page.wait(lambda state: len(ephemeral_texts(state)) > replies)
    status, answer = await page.post("event", {"integration": "webhook", "example": "deploy-request"})
    assert answer["status"] == 202, answer


async def test_a_modal_opens_and_its_submission_is_a_signed_view_submission(page):
    await page.type("/relay secret set DEPLOY_TOKEN")
    modal = await page.wait(lambda state: state["modal"])
    inputs = [block for block in modal["view"]["blocks"] if block["type"] == "input"]
    name_block = next(b for b in inputs if b["element"].get("initial_value") == "DEPLOY_TOKEN")
    value_block = next(b for b in inputs if b is not name_block)

    def values(value: str) -> dict[str, Any]:
        return {name_block["block_id"]: {name_block["element"]["action_id"]: "DEPLOY_TOKEN"},
                value_block["block_id"]: {value_block["element"]["action_id"]: value}}

    view_id = modal["view"]["id"]
    status, answer = await page.post("view/submit", {"view_id": view_id, "values": values("   ")})
    assert status == 200 and answer["response_action"] == "errors" and value_block["block_id"] in answer["errors"]
    assert (await page.state())["modal"]["errors"], "the modal stays open and shows the error"

    status, answer = await page.post("view/submit", {"view_id": view_id, "values": values("s3cret-value")})
    assert status == 200 and answer["response_action"] is None
    await page.wait(lambda state: state["modal"] is None and any("DEPLOY_TOKEN" in text
                                                                  for text in ephemeral_texts(state)))
    async with page.server.sandbox.services.db.read() as session:
        secret = (await session.execute(select(Secret))).scalar_one()
        assert secret.name == "DEPLOY_TOKEN" and b"s3cret-value" not in secret.ciphertext


async def test_a_tool_that_makes_its_own_secret_signs_with_it_once_pasted_into_the_form(page):
    state = await page.state()
    pagerduty = next(item for item in state["integrations"] if item["name"] == "pagerduty")
    own = pagerduty["tool_secret"]
    assert own and pagerduty["connection"] is None
    assert (await page.state())["integrations"] == state["integrations"], "the tool keeps one secret"
    status, answer = await page.post("event", {"integration": "pagerduty", "example": "incident.triggered"})
    assert status == 409 and "/relay connect pagerduty set-secret" in answer["error"]

    await page.type("/relay connect pagerduty set-secret")
    modal = await page.wait(lambda state: state["modal"])
    [field] = [block for block in modal["view"]["blocks"] if block["type"] == "input"]
    status, answer = await page.post("view/submit", {"view_id": modal["view"]["id"], "values": {
        field["block_id"]: {field["element"]["action_id"]: own}}})
    assert status == 200 and answer["response_action"] is None
    state = await page.wait(lambda state: next((item for item in state["integrations"] if item["name"] == "pagerduty"
                                                and item["connection"] and item["connection"]["url"]), None))
    assert state["connection"]["has_secret"]
    status, answer = await page.post("event", {"integration": "pagerduty", "example": "incident.triggered"})
    assert answer["status"] == 202, answer


async def test_the_home_tab_shows_what_the_app_published(page):
    assert (await page.state())["home"] is None
    emulator = page.server.emulator
    token = emulator.teams[dev.TEAM_ID].bot_token
    view = {"type": "home", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*Hello*"}}]}
    async with page.http.post(f"{emulator.api_url}views.publish", json={"user_id": YOU, "view": view},
                              headers={"Authorization": f"Bearer {token}"}) as response:
        assert (await response.json())["ok"] is True
    assert (await page.state())["home"]["blocks"] == view["blocks"]
    assert (await page.state(user=ALICE))["home"] is None
    # Opening the tab sends the bot a signed `app_home_opened`; relaybot answers by publishing alice's Home.
    status, answer = await page.post("home", {"user": ALICE})
    assert status == 200 and answer["status"] == 200
    home = await page.wait(lambda state: state["home"], user=ALICE)
    assert home["type"] == "home" and home["blocks"]


async def test_a_restart_keeps_the_conversation_and_the_connections(tmp_path, page):
    await page.type("/relay enable deploy")
    await page.wait(lambda state: ephemeral_texts(state))
    directory = tmp_path / ".relaybot-dev"
    await page.server.stop()
    saved = json.loads((directory / "slack.json").read_text())
    assert saved["connections"]["known"][dev.TEAM_ID]["github"]["secret"].startswith("whsec_")

    settings = Settings(workflows_dir=tmp_path / "workflows", worker_poll_interval=0.2, lease_seconds=5)
    keys = dev.ensure_master_key(directory / "master.key")
    page.server = await dev.start(settings, Catalog.load([tmp_path / "workflows"]), directory=directory,
                                  master_keys=keys)
    page.url = page.server.url
    state = await page.state()
    assert any("enabled" in text for text in ephemeral_texts(state))
    _status, answer = await page.post("event", {"integration": "github", "example": "pull_request.closed-merged"})
    assert answer["status"] == 202, "the connection secret read before the restart still signs"
    await page.wait(lambda state: card_with(state, "approve"))


# ---------------------------------------------------------------------------------------------- signers


def webhook_integrations() -> list[str]:
    return sorted(name for name, cls in INTEGRATIONS.items() if cls.receives_webhooks)


@pytest.mark.parametrize("integration", webhook_integrations())
def test_every_integration_has_examples_that_its_signer_signs_and_it_accepts(integration):
    examples = senders.list_examples().get(integration, [])
    assert examples, f"integrations/examples/{integration}/ needs example payloads for the dev page"
    assert integration in senders.SIGNERS, f"bot/emulator/senders.py needs a signer for {integration}"
    checker = INTEGRATIONS[integration]()
    for example in examples:
        event = senders.event_name_for(integration, example.name)
        delivery = senders.sign(integration, body=example.body(), secret="s3cret-for-tests", event=event)
        request = IncomingWebhook(body=delivery.body, headers=CIMultiDict(delivery.headers))
        assert checker.verify(secret="s3cret-for-tests", request=request, now=time.time()), example.name
        assert not checker.verify(secret="another-secret", request=request, now=time.time()), example.name
        parsed = checker.parse(request)
        assert parsed.kind and parsed.summary, example.name


def test_signers_reproduce_the_published_vectors():
    vectors = json.loads((CORPORA / "signature-vectors.json").read_text())
    github, pagerduty = vectors["github"], vectors["pagerduty"]
    signed = senders.sign_github(body=github["body"].encode(), secret=github["secret"], event="ping", now=0)
    assert signed.headers[github["header"]] == github["signature"]
    signed = senders.sign_pagerduty(body=pagerduty["body"].encode(), secret=pagerduty["secret"], event=None, now=0)
    assert signed.headers[pagerduty["header"]] in pagerduty["signature"].split(",")

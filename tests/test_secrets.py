"""Secrets through the real doors: the modal (views.open, a signed view_submission), list/delete, connection
secrets, the CLI, use in a workflow, masking everywhere a value could leak, and a master key rotated under a
running bot.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import sys
import time
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, update

from bot.crypto import MasterKey, secret_purpose
from bot.emulator.webapi import SlackEmulator
from bot.slack.secrets import NAME_BLOCK, NAME_INPUT, VALUE_BLOCK, VALUE_INPUT
from bot.store.models import AuditRecord, Connection, Run, Secret, Step
from tests.conftest import ADMIN, ALICE, CHANNEL, MASTER_KEY, TEAM, block_texts, extract, write_workflow
from tests.fakes.http_target import HttpTarget, Received

SECOND_KEY = base64.b64encode(b"r" * 32).decode()


# ------------------------------------------------------------------------------------------ Slack, as Slack does


def view_submission_payload(slack: SlackEmulator, *, team: str, user: str, view: dict[str, Any],
                            values: dict[tuple[str, str], str | None]) -> dict[str, Any]:
    """The `view_submission` Slack sends when `user` presses the modal's submit button."""
    inputs = {(block["block_id"], block["element"]["action_id"]) for block in view.get("blocks", [])
              if block.get("type") == "input"}
    assert set(values) == inputs, f"the modal's inputs are {sorted(inputs)}"
    state = {"values": {}}
    for (block_id, action_id), value in values.items():
        state["values"].setdefault(block_id, {})[action_id] = {"type": "plain_text_input", "value": value}
    person = slack.teams[team].users.get(user)
    return {
        "type": "view_submission",
        "team": {"id": team, "domain": slack.teams[team].name},
        "user": {"id": user, "username": person.name if person else user, "name": person.name if person else user,
                 "team_id": team},
        "api_app_id": "A0RELAYBOT", "token": "legacy-verification-token",
        "trigger_id": f"{int(time.time())}.{secrets.randbelow(10**9)}.{secrets.token_hex(16)}",
        "view": {**view, "team_id": team, "state": state, "hash": f"{int(time.time())}.{secrets.token_hex(4)}",
                 "root_view_id": view["id"], "previous_view_id": None, "app_id": "A0RELAYBOT",
                 "app_installed_team_id": team, "bot_id": "B0RELAYBOT"},
        "response_urls": [], "is_enterprise_install": False, "enterprise": None,
    }


async def submit(slack: SlackEmulator, view: dict[str, Any], values: dict[tuple[str, str], str | None], *,
                 user: str = ADMIN, team: str = TEAM) -> dict[str, Any]:
    """Send the signed submission; return the body of the bot's answer ({} when it just closes the modal)."""
    payload = view_submission_payload(slack, team=team, user=user, view=view, values=values)
    status, text = await slack.send_to_bot(urlencode({"payload": json.dumps(payload)}).encode(),
                                           "application/x-www-form-urlencoded")
    assert status == 200, text
    return json.loads(text) if text.strip() else {}


async def open_form(bot: Any, text: str, *, user: str = ADMIN, channel: str = CHANNEL) -> dict[str, Any]:
    """Type the command; return the modal that views.open showed (read from the emulator's modals)."""
    before = len(bot.slack.calls_of("views.open"))
    status, _ = await bot.slack.slash_command(TEAM, channel, user, text)
    assert status == 200
    await bot.slack.wait_for(lambda: len(bot.slack.calls_of("views.open")) > before)
    call = bot.slack.calls_of("views.open")[-1]
    assert call.response["ok"], call.response
    return bot.slack.teams[TEAM].modals[call.response["view"]["id"]]["view"]


async def wait_ephemeral(slack: SlackEmulator, before: int, *, user: str = ADMIN) -> dict[str, Any]:
    calls = await slack.wait_for(lambda: [call for call in slack.calls_of("chat.postEphemeral")[before:]
                                          if call.args.get("user") == user])
    return calls[0].args


async def set_secret_with_form(bot: Any, name: str, value: str) -> str:
    """The whole modal flow; returns the confirmation's text."""
    view = await open_form(bot, f"secret set {name}")
    before = len(bot.slack.calls_of("chat.postEphemeral"))
    answer = await submit(bot.slack, view, {(NAME_BLOCK, NAME_INPUT): name, (VALUE_BLOCK, VALUE_INPUT): value})
    assert answer == {}, answer
    note = await wait_ephemeral(bot.slack, before)
    assert note["channel"] == CHANNEL
    return str(note["text"])


async def audit_records(bot: Any, prefix: str) -> list[AuditRecord]:
    async with bot.services.db.read() as session:
        return list((await session.execute(select(AuditRecord).where(AuditRecord.action.like(f"{prefix}%"))
                                            .order_by(AuditRecord.seq))).scalars())


# ------------------------------------------------------------------------------------------ the modal flow


async def test_secret_set_opens_a_modal_and_the_submission_stores_it_sealed(make_bot, slack):
    bot = await make_bot()
    trigger_id = f"{int(time.time())}.42.{secrets.token_hex(16)}"
    form = {"token": "legacy", "team_id": TEAM, "team_domain": "acme", "channel_id": CHANNEL, "channel_name": "deploys",
            "user_id": ADMIN, "user_name": "ada", "command": "/relay", "text": "secret set DEPLOY_TOKEN",
            "api_app_id": "A0RELAYBOT", "response_url": f"{slack.base_url}/response/unused", "trigger_id": trigger_id}
    status, _ = await slack.send_to_bot(urlencode(form).encode(), "application/x-www-form-urlencoded")
    assert status == 200
    await slack.wait_for(lambda: slack.calls_of("views.open"))
    [call] = slack.calls_of("views.open")
    assert call.args["trigger_id"] == trigger_id, "the modal is opened with the command's trigger_id"
    view = slack.teams[TEAM].modals[call.response["view"]["id"]]["view"]
    assert view["type"] == "modal" and json.loads(view["private_metadata"]) == {"channel": CHANNEL}
    name_input = next(block for block in view["blocks"] if block.get("block_id") == NAME_BLOCK)
    assert name_input["element"]["initial_value"] == "DEPLOY_TOKEN"

    value = "dtok-" + secrets.token_hex(12)
    answer = await submit(slack, view, {(NAME_BLOCK, NAME_INPUT): "DEPLOY_TOKEN", (VALUE_BLOCK, VALUE_INPUT): value})
    assert answer == {}, "a good submission closes the modal"
    note = await wait_ephemeral(slack, 0)
    assert note["channel"] == CHANNEL and note["user"] == ADMIN
    assert "DEPLOY_TOKEN" in note["text"] and "stored" in note["text"] and value not in note["text"]

    async with bot.services.db.read() as session:
        row = await session.get(Secret, (TEAM, "DEPLOY_TOKEN"))
        assert row is not None and row.set_by == ADMIN and row.set_by_name == "ada"
        assert value.encode() not in row.ciphertext
        opened = await bot.services.keyring.open(session, team_id=TEAM, purpose=secret_purpose("DEPLOY_TOKEN"),
                                                 sealed=row.ciphertext)
    assert opened.decode() == value
    [record] = await audit_records(bot, "secret.")
    assert (record.action, record.actor, record.details) == ("secret.set", ADMIN,
                                                             {"name": "DEPLOY_TOKEN", "replaced": False})

    again = await set_secret_with_form(bot, "DEPLOY_TOKEN", value + "-2")
    assert "replaced" in again
    assert [r.details["replaced"] for r in await audit_records(bot, "secret.")] == [False, True]


async def test_a_form_sent_from_where_relaybot_cannot_post_is_confirmed_by_direct_message(make_bot, slack):
    """From a DM with a colleague (or a channel relaybot is not in) the ephemeral confirmation fails: the modal
    had closed and nothing more was said, success or failure."""
    bot = await make_bot()
    view = await open_form(bot, "secret set DEPLOY_TOKEN", channel="D0DIRECT01")
    answer = await submit(slack, view, {(NAME_BLOCK, NAME_INPUT): "DEPLOY_TOKEN", (VALUE_BLOCK, VALUE_INPUT): "v-1"})
    assert answer == {}
    [note] = await slack.wait_for(lambda: slack.teams[TEAM].messages.get(ADMIN))
    assert "DEPLOY_TOKEN" in note.text and "stored" in note.text and "v-1" not in note.text


@pytest.mark.parametrize(("name", "value", "block", "problem"), [
    ("TOKEN", "", VALUE_BLOCK, "cannot be empty"),
    ("TOKEN", "   \n  ", VALUE_BLOCK, "cannot be empty"),
    ("TOKEN", "x" * (64 * 1024 + 1), VALUE_BLOCK, "at most 65,536 bytes"),
    ("TOKEN", "é" * (32 * 1024 + 1), VALUE_BLOCK, "at most 65,536 bytes"),
    ("1TOKEN", "value", NAME_BLOCK, "cannot be a secret's name"),
    ("DEPLOY-TOKEN", "value", NAME_BLOCK, "cannot be a secret's name"),
    ("", "value", NAME_BLOCK, "cannot be a secret's name"),
])
async def test_a_bad_submission_gets_an_inline_error_and_stores_nothing(make_bot, slack, name, value, block, problem):
    bot = await make_bot()
    view = await open_form(bot, "secret set")
    answer = await submit(slack, view, {(NAME_BLOCK, NAME_INPUT): name, (VALUE_BLOCK, VALUE_INPUT): value or None})
    assert answer["response_action"] == "errors"
    assert list(answer["errors"]) == [block] and problem in answer["errors"][block]
    await bot.settle()
    assert slack.calls_of("chat.postEphemeral") == []
    async with bot.services.db.read() as session:
        assert (await session.execute(select(Secret))).scalars().all() == []
    assert await audit_records(bot, "secret.") == []
    # The same modal, corrected, goes through.
    answer = await submit(slack, view, {(NAME_BLOCK, NAME_INPUT): "TOKEN", (VALUE_BLOCK, VALUE_INPUT): "good-value"})
    assert answer == {}
    await wait_ephemeral(slack, 0)


async def test_exactly_64_kib_is_accepted(make_bot, slack):
    bot = await make_bot()
    value = "y" * (64 * 1024)
    assert "stored" in await set_secret_with_form(bot, "BIG", value)


async def test_list_shows_names_who_and_when_and_delete_removes(make_bot, slack):
    bot = await make_bot()
    assert "no secrets yet" in await bot.command("secret list")
    values = {"DEPLOY_TOKEN": "d-" + secrets.token_hex(8), "API_KEY": "k-" + secrets.token_hex(8)}
    for name, value in values.items():
        await set_secret_with_form(bot, name, value)
    listing = await bot.command("secret list")
    assert listing.index("`API_KEY`") < listing.index("`DEPLOY_TOKEN`")
    assert listing.count(f"<@{ADMIN}>") == 2 and "<!date^" in listing
    assert not any(value in listing for value in values.values())

    assert "deleted" in await bot.command("secret delete API_KEY")
    assert "API_KEY" not in await bot.command("secret list")
    assert "There is no secret `API_KEY`" in await bot.command("secret delete API_KEY")
    assert "Which secret?" in await bot.command("secret delete")
    assert [(r.action, r.details) for r in await audit_records(bot, "secret.")][-1] == (
        "secret.deleted", {"name": "API_KEY"})
    assert "secret set <NAME>" in await bot.command("secret")
    assert "secret set <NAME>" in await bot.command("secret frobnicate")


async def test_only_admins_manage_secrets_even_with_a_forged_submission(make_bot, slack):
    bot = await make_bot()
    for text in ("secret set TOKEN", "secret list", "secret delete TOKEN"):
        assert "Only workspace admins" in await bot.command(text, user=ALICE)
    assert slack.calls_of("views.open") == []
    view = await open_form(bot, "secret set TOKEN")
    answer = await submit(slack, view, {(NAME_BLOCK, NAME_INPUT): "TOKEN", (VALUE_BLOCK, VALUE_INPUT): "sneaky"},
                          user=ALICE)
    assert answer["response_action"] == "errors" and "Only workspace admins" in answer["errors"][VALUE_BLOCK]
    async with bot.services.db.read() as session:
        assert (await session.execute(select(Secret))).scalars().all() == []


async def test_a_value_typed_into_the_command_is_refused_not_stored(make_bot, slack):
    bot = await make_bot()
    for text, user in (("secret set TOKEN hunter2", ADMIN), ("secret set TOKEN=hunter2", ADMIN),
                       ('secret set "TOKEN hunter2"', ADMIN), ("secret set xoxb-hunter2", ADMIN),
                       ("secret set TOKEN hunter2", ALICE)):
        reply = await bot.command(text, user=user)
        assert "Nothing was stored" in reply and "treat it as exposed" in reply and "hunter2" not in reply, text
    token = "ghp_" + "hunter2" * 6  # a GitHub token is a valid name, but it is a value
    reply = await bot.command(f"secret set {token}")
    assert "Nothing was stored" in reply and "treat it as exposed" in reply and token not in reply
    assert slack.calls_of("views.open") == []
    assert "A name is letters, digits and `_`" in await bot.command("secret set 9LIVES")
    assert "`/relay secret set <NAME>` opens a form" in await bot.command("secret delete TOKEN hunter2")
    async with bot.services.db.read() as session:
        assert (await session.execute(select(Secret))).scalars().all() == []


# ------------------------------------------------------------------------------------------ connection secrets


async def test_connect_set_secret_stores_a_secret_the_tool_generated(make_bot, slack):
    bot = await make_bot()
    view = await open_form(bot, "connect pagerduty set-secret")
    assert json.loads(view["private_metadata"]) == {"channel": CHANNEL, "integration": "pagerduty"}
    pagerduty_secret = "pd_" + secrets.token_urlsafe(24)
    answer = await submit(slack, view, {(VALUE_BLOCK, VALUE_INPUT): f"  {pagerduty_secret}\n"})
    assert answer == {}
    note = await wait_ephemeral(slack, 0)
    assert pagerduty_secret not in note["text"]
    url = extract(r"`(http[^`]+/hooks/[^`]+)`", note["text"])

    body = json.dumps({"event": {"id": "01ABC", "event_type": "incident.triggered",
                                 "data": {"type": "incident", "title": "CPU on fire"}}}).encode()

    def signed(secret: str) -> dict[str, str]:
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return {"Content-Type": "application/json", "X-PagerDuty-Signature": f"v1={digest}",
                "X-Webhook-Id": secrets.token_hex(6)}

    assert (await bot.post(url, body, signed(pagerduty_secret)))[0] == 202
    assert (await bot.post(url, body, signed("something-else")))[0] == 401
    [record] = await audit_records(bot, "connection.secret_set")
    assert record.details["integration"] == "pagerduty" and record.details["created"] is True
    assert pagerduty_secret not in json.dumps(record.details)


async def test_set_secret_replaces_the_generated_secret_of_an_existing_connection(make_bot, slack):
    bot = await make_bot()
    reply = await bot.command("connect webhook")
    url, generated = extract(r"URL: `([^`]+)`", reply), extract(r"Secret: `([^`]+)`", reply)
    body = b'{"hello": "world"}'

    async def status_with(secret: str) -> int:
        return (await bot.post(url, body, {"Content-Type": "application/json",
                                           "Authorization": f"Bearer {secret}"}))[0]

    assert await status_with(generated) == 202  # the connection's secret is now cached by the door
    view = await open_form(bot, "connect webhook set-secret")
    own = "own-" + secrets.token_hex(16)
    assert await submit(slack, view, {(VALUE_BLOCK, VALUE_INPUT): own}) == {}
    note = await wait_ephemeral(slack, 0)
    assert url in note["text"] and "new connection" not in note["text"]
    assert await status_with(own) == 202
    assert await status_with(generated) == 401, "the old secret stops working at once"
    async with bot.services.db.read() as session:
        assert len((await session.execute(select(Connection))).scalars().all()) == 1

    empty = await submit(slack, await open_form(bot, "connect webhook set-secret"), {(VALUE_BLOCK, VALUE_INPUT): " "})
    assert "cannot be empty" in empty["errors"][VALUE_BLOCK]
    assert "takes nothing more" in await bot.command("connect webhook set-secret now")
    assert "Only workspace admins" in await bot.command("connect webhook set-secret", user=ALICE)


# ------------------------------------------------------------------------------------------ use in workflows


USE = """
name: use-secret
title: Uses a secret
on: {webhook: {}}
steps:
  - id: call
    uses: http.request
    with:
      url: TARGET/deploy
      headers: {Authorization: "Bearer ${{ secrets.DEPLOY_TOKEN }}"}
"""


async def run_workflow(bot: Any, name: str) -> tuple[Run, list[Step]]:
    before = {message.ts for message in bot.cards()}
    reply = await bot.command(f"run {name}")
    run_id = extract(r"Started run `([^`]+)`", reply)
    await bot.wait_card(lambda message: message.ts not in before)

    async def finished() -> Run | None:
        async with bot.services.db.read() as session:
            run = await session.get(Run, run_id, populate_existing=True)
            return run if run is not None and run.finished_at is not None else None

    deadline = time.monotonic() + 20
    while (run := await finished()) is None:
        assert time.monotonic() < deadline, "the run did not finish"
        await asyncio.sleep(0.05)
    await bot.settle()
    async with bot.services.db.read() as session:
        steps = list((await session.execute(select(Step).where(Step.run_id == run_id).order_by(Step.position)))
                     .scalars())
    return run, steps


async def test_a_missing_secret_fails_its_step_with_a_message_naming_it(make_bot, workflows, target):
    write_workflow(workflows, "use-secret", USE.replace("TARGET", target.url))
    bot = await make_bot()
    run, [step] = await run_workflow(bot, "use-secret")
    assert run.outcome == "failed" and step.state == "failed"
    assert "DEPLOY_TOKEN" in (step.error or "") and "/relay secret set DEPLOY_TOKEN" in (step.error or "")
    card = bot.cards()[-1]
    assert any("DEPLOY_TOKEN" in line for line in bot.thread_texts(card))
    assert target.requests_to("/deploy") == [], "nothing is sent without the secret"


async def test_a_tampered_secret_fails_its_step_loudly(make_bot, workflows, target):
    write_workflow(workflows, "use-secret", USE.replace("TARGET", target.url))
    bot = await make_bot()
    await set_secret_with_form(bot, "DEPLOY_TOKEN", "good-token-value")
    async with bot.services.db.write() as session:
        row = await session.get(Secret, (TEAM, "DEPLOY_TOKEN"))
        assert row is not None
        tampered = bytearray(row.ciphertext)
        tampered[-1] ^= 1
        await session.execute(update(Secret).where(Secret.name == "DEPLOY_TOKEN").values(ciphertext=bytes(tampered)))
    run, [step] = await run_workflow(bot, "use-secret")
    assert run.outcome == "failed"
    assert "DEPLOY_TOKEN cannot be decrypted" in (step.error or "") and "failed authentication" in (step.error or "")
    assert target.requests_to("/deploy") == []


async def test_set_in_the_modal_used_in_a_workflow_then_the_master_key_rotated_under_the_running_bot(
        make_bot, workflows, target, tmp_path):
    """The new user's path: a secret from the modal, a workflow using it, a master key rotation done with
    `relaybot keys rotate` in another process while the bot runs, then the old key retired."""
    write_workflow(workflows, "use-secret", USE.replace("TARGET", target.url))
    first = await make_bot()
    token = "tok-" + secrets.token_hex(16)
    await set_secret_with_form(first, "DEPLOY_TOKEN", token)
    run, _ = await run_workflow(first, "use-secret")
    assert run.outcome == "succeeded"
    await first.stop()

    # Step 2 of a rotation: every process gets the new key first, the old one after it.
    second = await make_bot(master_keys=[SECOND_KEY, MASTER_KEY])
    run, _ = await run_workflow(second, "use-secret")
    assert run.outcome == "succeeded"
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SLACK_", "RELAYBOT_"))}
    env.update({"RELAYBOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'relaybot.db'}",
                "RELAYBOT_MASTER_KEYS": f"{SECOND_KEY},{MASTER_KEY}"})

    async def relaybot(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", *args, env=env, cwd=tmp_path,
                                                       stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode is not None
        return process.returncode, out.decode() + err.decode()

    code, output = await relaybot("keys", "rotate")
    assert code == 0 and "re-wrapped 1 workspace data key(s)" in output, output
    run, _ = await run_workflow(second, "use-secret")  # its cached data key is still the same key
    assert run.outcome == "succeeded"
    code, output = await relaybot("keys", "status")
    old_id = MasterKey.from_text(MASTER_KEY).id
    assert code == 0 and re.search(rf"^{old_id} .* 0  wraps nothing", output, re.MULTILINE), output
    await second.stop()

    # Step 4: the old key is retired.
    third = await make_bot(master_keys=[SECOND_KEY])
    run, _ = await run_workflow(third, "use-secret")
    assert run.outcome == "succeeded"
    assert [request.headers["Authorization"] for request in target.requests_to("/deploy")] == [f"Bearer {token}"] * 4
    # A secret set after the rotation is sealed with the same (re-wrapped) data key and works too.
    await set_secret_with_form(third, "DEPLOY_TOKEN", token + "-new")
    run, _ = await run_workflow(third, "use-secret")
    assert target.requests_to("/deploy")[-1].headers["Authorization"] == f"Bearer {token}-new"


async def test_the_cli_sets_lists_and_deletes_with_the_value_on_stdin(make_bot, workflows, target, tmp_path):
    write_workflow(workflows, "use-secret", USE.replace("TARGET", target.url))
    bot = await make_bot()
    await bot.command("list")  # the workspace is known once someone used /relay
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SLACK_", "RELAYBOT_"))}
    env.update({"RELAYBOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'relaybot.db'}",
                "RELAYBOT_MASTER_KEYS": MASTER_KEY})

    async def relaybot(*args: str, stdin: str = "") -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "secrets", *args, env=env, cwd=tmp_path, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(stdin.encode()), timeout=120)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    token = "cli-" + secrets.token_hex(12)
    code, out, err = await relaybot("set", "--team", TEAM, "DEPLOY_TOKEN", stdin=token + "\n")
    assert code == 0 and "DEPLOY_TOKEN stored" in out and token not in out + err, err
    run, _ = await run_workflow(bot, "use-secret")
    assert run.outcome == "succeeded"
    assert target.requests_to("/deploy")[-1].headers["Authorization"] == f"Bearer {token}", "one newline removed"

    code, out, _ = await relaybot("list", "--team", TEAM)
    assert code == 0 and "DEPLOY_TOKEN" in out and "(command line)" in out and token not in out
    assert "(command line)" in await bot.command("secret list")
    code, _, err = await relaybot("set", "--team", TEAM, "DEPLOY_TOKEN", "the-value-as-an-argument")
    assert code == 2 and "unrecognized arguments" in err
    code, _, err = await relaybot("set", "--team", TEAM, "DEPLOY_TOKEN", stdin="")
    assert code == 1 and "cannot be empty" in err
    code, _, err = await relaybot("set", "--team", TEAM, "BAD-NAME", stdin="x")
    assert code == 1 and "cannot be a secret's name" in err
    code, _, err = await relaybot("set", "--team", TEAM, "AKIA" + "HUNTER2" * 2 + "XY", stdin="x")
    assert code == 1 and "looks like a token" in err and "AKIAHUNTER2" not in err
    code, out, _ = await relaybot("delete", "--team", TEAM, "DEPLOY_TOKEN")
    assert code == 0 and "deleted" in out
    code, _, err = await relaybot("delete", "--team", TEAM, "DEPLOY_TOKEN")
    assert code == 1 and "no secret DEPLOY_TOKEN" in err
    actions = [(r.action, r.actor) for r in await audit_records(bot, "secret.")]
    assert actions == [("secret.set", "cli"), ("secret.deleted", "cli")]

    # A workspace Slack never showed relaybot, but whose secrets were stored here before, is known.
    code, _, err = await relaybot("set", "--team", "T0CLIONLY1", "FIRST", stdin="one")
    assert code == 0 and "has not used relaybot yet" in err
    code, _, err = await relaybot("set", "--team", "T0CLIONLY1", "SECOND", stdin="two")
    assert code == 0 and "has not used relaybot yet" not in err
    # The wrong master key (mid-rotation, say): one line saying so, not a traceback.
    env["RELAYBOT_MASTER_KEYS"] = base64.b64encode(b"o" * 32).decode()
    code, _, err = await relaybot("set", "--team", TEAM, "OTHER", stdin="x")
    assert code == 1 and "Traceback" not in err, err
    assert err.startswith("relaybot: cannot decrypt: the data key of workspace T0ACME001 is wrapped by master key")
    assert "relaybot keys status" in err


# ------------------------------------------------------------------------------------------ the canary


def canary_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class EchoEveryForm(HttpTarget):
    """Answers with the request body in every form a careless tool might echo it in."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(method=request.method, path=request.path, headers=dict(request.headers),
                                      body=body, query=dict(request.query)))
        text = body.decode()
        if request.path == "/exact":
            return web.Response(body=body, content_type="application/json")
        if request.path == "/fail":
            # An error answer: relaybot keeps its first 300 characters, which cuts into the value.
            return web.Response(status=500, text="E" * 250 + text, content_type="text/plain")
        lines = [f"raw: {text}", *(f"line: {line}" for line in text.splitlines())]
        for prefix in (b"", b"x", b"xy"):
            lines.append("base64: " + base64.b64encode(prefix + body).decode())
            lines.append("base64url: " + base64.urlsafe_b64encode(prefix + body).decode())
        lines.append("echo|base64: " + base64.b64encode(body + b"\n").decode())
        lines += [f"url: {quote(text, safe='')}", f"url-plus: {quote_plus(text)}", f"json: {json.dumps(text)}",
                  f"headers: {json.dumps(dict(request.headers))}"]
        return web.Response(text="\n".join(lines), content_type="text/plain")


@pytest.fixture
async def echo() -> Any:
    server = EchoEveryForm()
    await server.start()
    yield server
    await server.stop()


CANARY = """
name: canary
title: Canary
on: {webhook: {}}
steps:
  - id: pem
    uses: http.request
    with: {method: POST, url: "TARGET/echo", body: "${{ secrets.CANARY_PEM }}"}
  - id: json_body
    uses: http.request
    with: {method: POST, url: "TARGET/echo", json: {credentials: "${{ secrets.CANARY_JSON }}"}}
  - id: header
    uses: http.request
    with: {url: "TARGET/echo?key=${{ secrets.CANARY_JSON }}", headers: {X-Key: "${{ secrets.CANARY_JSON }}"}}
  - id: parsed
    uses: http.request
    with: {method: POST, url: "TARGET/exact", body: "${{ secrets.CANARY_JSON }}"}
  - id: posted
    uses: slack.post
    with: {text: "the key: ${{ secrets.CANARY_PEM }} and ${{ secrets.CANARY_JSON }}", thread: true}
  - id: reported
    uses: slack.post
    with: {text: "echoed ${{ steps.pem.outputs.text }}", thread: true}
  - id: failing
    uses: http.request
    with: {method: POST, url: "TARGET/fail", body: "${{ secrets.CANARY_PEM }}"}
"""


def canary_forms(value: str) -> set[str]:
    """What must never be seen: the value, its lines, and its base64, URL and JSON forms, computed from the
    encoders (not from the masker)."""
    raw = value.encode()
    forms = {value, json.dumps(value)[1:-1], quote(value, safe=""), quote(value), quote_plus(value)}
    forms |= {line for line in value.splitlines() if len(line) >= 16}
    for prefix_length in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * prefix_length + raw).decode()
            forms.add(encoded[-(-8 * prefix_length // 6):8 * (prefix_length + len(raw)) // 6])
    encoded = base64.b64encode(raw + b"\n").decode()
    forms.add(encoded[:8 * len(raw) // 6])
    return forms


def decoded_base64_runs(text: str) -> str:
    """Every run of base64-looking characters, decoded at each alignment, for a search of what it hides."""
    decoded: list[str] = []
    for run in re.findall(r"[A-Za-z0-9+/_-]{16,}", text):
        for start in range(4):
            chunk = run[start:]
            chunk = chunk[:len(chunk) - len(chunk) % 4]
            try:
                decoded.append(base64.b64decode(chunk.replace("-", "+").replace("_", "/")).decode("latin-1"))
            except ValueError:
                continue
    return "\n".join(decoded)


def leaks(haystack: str, forms: set[str], needles: set[str]) -> list[str]:
    found = [form for form in forms if form in haystack]
    hidden = decoded_base64_runs(haystack)
    found += [f"base64 of {needle}" for needle in needles if needle in hidden]
    return found


async def test_a_canary_echoed_in_every_form_appears_nowhere(make_bot, workflows, echo, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    write_workflow(workflows, "canary", CANARY.replace("TARGET", echo.url))
    bot = await make_bot()
    pem = canary_pem()
    token = "canary-json-token-" + secrets.token_hex(12)
    credentials = json.dumps({"type": "service_account", "client_email": "ci@example.iam",
                              "private_key": canary_pem(), "token": token})
    await set_secret_with_form(bot, "CANARY_PEM", pem)
    await set_secret_with_form(bot, "CANARY_JSON", credentials)
    run, steps = await run_workflow(bot, "canary")

    states = {step.step_id: step.state for step in steps}
    assert states == {"pem": "succeeded", "json_body": "succeeded", "header": "succeeded", "parsed": "succeeded",
                      "posted": "succeeded", "reported": "succeeded", "failing": "failed"}, steps
    # The values really were sent, in every form, so there was something to hide.
    sent = [request.body.decode() for request in echo.requests_to("/echo")]
    assert sent[0] == pem and token in sent[1]
    assert echo.requests_to("/echo")[2].headers["X-Key"] == credentials
    by_id = {step.step_id: step for step in steps}
    assert "***" in by_id["pem"].outputs["text"] and "***" in (by_id["failing"].error or "")
    assert by_id["parsed"].outputs["json"]["token"] == "***"
    # A made-up log line from anywhere in the process after the bot has opened the values.
    logging.getLogger("some.library").warning("connecting with %s / %s", pem.splitlines()[3], token)

    forms = canary_forms(pem) | canary_forms(credentials) | canary_forms(token)
    forms |= canary_forms(json.loads(credentials)["private_key"])
    needles = {line for line in pem.splitlines() if len(line) >= 40} | {token}

    slack_text = "\n".join(json.dumps({"method": call.method, "args": call.args, "response": call.response})
                           + "\n" + "\n".join(str(value) for value in call.args.values())
                           for call in bot.slack.calls)
    team = bot.slack.teams[TEAM]
    stored = [message.text + json.dumps(message.blocks) for messages in team.messages.values() for message in messages]
    slack_text += "\n".join([*stored, json.dumps(team.ephemeral), json.dumps(bot.slack.responses),
                             json.dumps(team.modals)])
    assert "***" in slack_text
    assert leaks(slack_text, forms, needles) == []

    with sqlite3.connect(tmp_path / "relaybot.db") as connection:
        dump = "\n".join(connection.iterdump())
    assert "***" in dump
    assert leaks(dump, forms, needles) == []

    assert "connecting with ***" in caplog.text
    assert leaks(caplog.text, forms, needles) == []

    card = bot.slack.message(TEAM, CHANNEL, run.card_ts or "")
    assert card is not None and "***" in block_texts(card) + "\n".join(bot.thread_texts(card))


async def test_a_value_that_comes_back_in_another_steps_answer_is_masked(make_bot, workflows, target):
    """A step that names no secret still has every secret of the workspace masked in what it returns: an API
    may hand back a value an earlier step (or an earlier run) sent it."""
    write_workflow(workflows, "read-back", f"""
        name: read-back
        on: {{webhook: {{}}}}
        steps:
          - id: store
            uses: http.request
            with: {{method: PUT, url: "{target.url}/config", json: {{token: "${{{{ secrets.DEPLOY_TOKEN }}}}"}}}}
          - id: read
            uses: http.request
            with: {{url: "{target.url}/config"}}
        """)
    bot = await make_bot()
    token = "stored-" + secrets.token_hex(12)
    await set_secret_with_form(bot, "DEPLOY_TOKEN", token)
    from tests.fakes.http_target import Reply

    target.queue("/config", Reply(body={"ok": True}), Reply(body={"config": {"token": token}, "echo": f"t={token}"}))
    run, steps = await run_workflow(bot, "read-back")
    assert run.outcome == "succeeded"
    read = next(step for step in steps if step.step_id == "read")
    assert read.outputs["json"] == {"config": {"token": "***"}, "echo": "t=***"}
    assert token not in json.dumps(read.outputs)

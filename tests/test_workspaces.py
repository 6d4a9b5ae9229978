"""Many workspaces: OAuth installs, isolation between workspaces, uninstall and reinstall, approvers, App Home."""

from __future__ import annotations

import copy
import json
import re
from urllib.parse import parse_qs, urlparse

import aiohttp
import pytest
from slack_sdk.models.views import View
from sqlalchemy import select, text

from bot.store.models import AuditRecord, Run
from tests.conftest import (
    ADMIN,
    ALICE,
    BOB,
    CHANNEL,
    GUEST,
    TEAM,
    block_texts,
    buttons,
    connection_from,
    write_workflow,
)

OTHER = "T0GLOBEX1"
OTHER_CHANNEL = "C0GLOBEX1"
OTHER_ADMIN = "U0GLADMIN"

GATE = """
name: gate
on: webhook
approvers: {users: [U0ALICE01], groups: [oncall], allow_self: false}
steps:
  - id: deploy
    approval: required
    uses: http.request
    with: {url: "TARGET/deploy", method: POST, headers: {X-Token: "${{ secrets.TOKEN }}"}}
"""


@pytest.fixture
async def two_workspaces(slack):
    slack.add_team(OTHER, "globex")
    slack.add_user(OTHER, OTHER_ADMIN, "gladys", is_admin=True)
    slack.add_channel(OTHER, OTHER_CHANNEL, "ops")
    slack.add_usergroup(OTHER, "S0GLONCALL", "oncall", [OTHER_ADMIN])
    return slack


async def install(bot, team_id: str) -> None:
    """The whole OAuth dance, as a browser does it: install page → Slack → redirect with code and state."""
    async with aiohttp.ClientSession() as browser:
        async with browser.get(f"{bot.url}/slack/install", allow_redirects=False) as response:
            page = await response.text()
            cookie = response.headers.get("Set-Cookie", "")
        authorize = re.search(r'href="([^"]+oauth[^"]+)"', page)
        assert authorize, page
        state = parse_qs(urlparse(authorize.group(1).replace("&amp;", "&")).query)["state"][0]
        cookie_pair = cookie.split(";")[0]
        async with browser.get(f"{bot.url}/slack/oauth_redirect?code=code-{team_id}&state={state}",
                               headers={"Cookie": cookie_pair}, allow_redirects=False) as response:
            assert response.status == 200, await response.text()


async def oauth_bot(make_bot, slack):
    return await make_bot(slack_bot_token=None, slack_client_id="1234.5678", slack_client_secret="client-secret",
                          slack_authorize_url=f"{slack.base_url}/oauth/v2/authorize")


async def command(bot, team: str, channel: str, user: str, text_: str) -> str:
    before = len(bot.slack.responses)
    await bot.slack.slash_command(team, channel, user, text_)
    await bot.slack.wait_for(lambda: len(bot.slack.responses) > before)
    return str(bot.slack.responses[before]["text"])


async def test_two_workspaces_are_isolated_and_uninstall_keeps_the_audit_log(make_bot, two_workspaces, workflows,
                                                                             target):
    slack = two_workspaces
    write_workflow(workflows, "gate", GATE.replace("TARGET", target.url))
    bot = await oauth_bot(make_bot, slack)
    await install(bot, TEAM)
    await install(bot, OTHER)
    tokens = {team: slack.teams[team].bot_token for team in (TEAM, OTHER)}
    exchanges = slack.calls_of("oauth.v2.access")
    assert len(exchanges) == 2

    # Tokens are stored sealed, never as they are.
    async with bot.services.db.read() as session:
        stored = " ".join(str(row) for row in (await session.execute(text("SELECT * FROM slack_bots"))).all())
    assert tokens[TEAM] not in stored and "rbenc1:" in stored

    url_a, secret_a = connection_from(await command(bot, TEAM, CHANNEL, ADMIN, "enable gate"), "webhook")
    url_b, secret_b = connection_from(await command(bot, OTHER, OTHER_CHANNEL, OTHER_ADMIN, "enable gate"),
                                      "webhook")
    await bot.set_secret("TOKEN", "team-a-token", team=TEAM)

    headers = {"Content-Type": "application/json"}
    assert (await bot.post(url_a, b"{}", {**headers, "Authorization": f"Bearer {secret_b}"}))[0] == 401
    assert (await bot.post(url_a, b'{"summary": "A"}', {**headers, "Authorization": f"Bearer {secret_a}"}))[0] == 202
    assert (await bot.post(url_b, b'{"summary": "B"}', {**headers, "Authorization": f"Bearer {secret_b}"}))[0] == 202
    card_a = await slack.wait_for(lambda: next(iter(slack.channel_messages(TEAM, CHANNEL)), None))
    card_b = await slack.wait_for(lambda: next(iter(slack.channel_messages(OTHER, OTHER_CHANNEL)), None))
    await bot.settle()
    for call in slack.calls:
        channel = call.args.get("channel")
        if channel == CHANNEL:
            assert call.token == tokens[TEAM], call
        if channel == OTHER_CHANNEL:
            assert call.token == tokens[OTHER], call

    async with bot.services.db.read() as session:
        run_a = (await session.execute(select(Run).where(Run.team_id == TEAM))).scalar_one()

    # Workspace B's people cannot see or touch workspace A's run, by any door.
    payload = slack.block_actions_payload(TEAM, CHANNEL, ALICE, card_a.ts, "approve")
    payload["team"] = {"id": OTHER, "domain": "globex"}
    payload["user"] = {"id": OTHER_ADMIN, "username": "gladys", "name": "gladys", "team_id": OTHER}
    before = len(slack.responses)
    await slack.send_to_bot(("payload=" + json.dumps(payload)).encode(), "application/x-www-form-urlencoded")
    await slack.wait_for(lambda: len(slack.responses) > before)
    assert slack.responses[before]["text"] == "This run does not exist in this workspace."
    assert f"There is no run `{run_a.id}`" in await command(bot, OTHER, OTHER_CHANNEL, OTHER_ADMIN,
                                                             f"status {run_a.id}")
    assert f"There is no run `{run_a.id}`" in await command(bot, OTHER, OTHER_CHANNEL, OTHER_ADMIN,
                                                             f"cancel {run_a.id}")
    assert run_a.id not in await command(bot, OTHER, OTHER_CHANNEL, OTHER_ADMIN, "runs")
    # B's run cannot read A's secret: it fails naming the secret as missing.
    await slack.click(OTHER, OTHER_CHANNEL, OTHER_ADMIN, card_b.ts, "approve")
    thread_b = await slack.wait_for(lambda: [m.text for m in slack.thread(OTHER, OTHER_CHANNEL, card_b.ts)
                                             if "Run failed" in m.text] and
                                    [m.text for m in slack.thread(OTHER, OTHER_CHANNEL, card_b.ts)])
    assert any("the secret TOKEN is not set in this workspace" in line for line in thread_b)
    assert "team-a-token" not in json.dumps([c.args for c in slack.calls])

    # Uninstall A: its URL answers 404, its run is cancelled, its tokens are gone, its audit log stays.
    status, _ = await slack.send_event(TEAM, {"type": "app_uninstalled", "event_ts": "1.0"})
    assert status == 200
    await slack.wait_for(lambda: True)
    await bot.settle()
    for _ in range(50):
        if (await bot.post(url_a, b"{}", {**headers, "Authorization": f"Bearer {secret_a}"}))[0] == 404:
            break
        await slack.wait_for(lambda: True, timeout=0.1)
    assert (await bot.post(url_a, b"{}", {**headers, "Authorization": f"Bearer {secret_a}"}))[0] == 404
    assert await bot.services.installations.async_find_bot(enterprise_id=None, team_id=TEAM) is None
    async with bot.services.db.read() as session:
        run_a = (await session.execute(select(Run).where(Run.id == run_a.id))).scalar_one()
        actions = [r.action for r in (await session.execute(
            select(AuditRecord).where(AuditRecord.team_id == TEAM).order_by(AuditRecord.seq))).scalars()]
    assert run_a.state == "cancelled"
    assert actions[0] == "app.installed" and "app.uninstalled" in actions and "run.cancelled" in actions
    assert (await bot.post(url_b, b'{"summary": "B2"}', {**headers, "Authorization": f"Bearer {secret_b}"}))[0] == 202

    # Reinstall A: same URL and secret, same subscription.
    await install(bot, TEAM)
    bot.services.connections.forget()
    status, _ = await bot.post(url_a, b'{"summary": "again"}', {**headers, "Authorization": f"Bearer {secret_a}"})
    assert status == 202
    await slack.wait_for(lambda: len(slack.channel_messages(TEAM, CHANNEL)) == 2)
    assert ":large_green_circle: `gate`" in await command(bot, TEAM, CHANNEL, ADMIN, "list")
    # Installations are looked up (and cached) per request: `auth.test` when a workspace installs, and once
    # per token after that — not once per click or command (there were dozens above).
    assert len(slack.calls_of("oauth.v2.access")) == 3
    assert len(slack.calls_of("auth.test")) <= 3 + len(tokens)


async def approver_bot(make_bot, workflows, target):
    write_workflow(workflows, "gate", GATE.replace("TARGET", target.url))
    bot = await make_bot()
    url, secret = connection_from(await bot.command("enable gate"), "webhook")
    await bot.set_secret("TOKEN", "t")
    return bot, url, secret


async def waiting_card(bot, url, secret, *, by_command: str | None = None):
    if by_command:
        await bot.command(by_command, user=by_command and ALICE)
    else:
        await bot.post(url, b"{}", {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
    card = await bot.wait_card(lambda m: "approve" in buttons(m) and m.ts not in bot.seen)
    bot.seen.add(card.ts)
    return copy.deepcopy(card)


async def test_single_workspace_reinstall_brings_the_workspace_back(make_bot, workflows, target, slack):
    """SLACK_BOT_TOKEN mode has no OAuth callback: a restart with a token Slack accepts is the reinstall."""
    write_workflow(workflows, "gate", GATE.replace("TARGET", target.url))
    bot = await make_bot()
    url, secret = connection_from(await bot.command("enable gate"), "webhook")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"}
    status, _ = await slack.send_event(TEAM, {"type": "app_uninstalled", "event_ts": "1.0"})
    assert status == 200
    await bot.settle()
    for _ in range(50):
        if (await bot.post(url, b"{}", headers))[0] == 404:
            break
        await slack.wait_for(lambda: True, timeout=0.1)
    assert (await bot.post(url, b"{}", headers))[0] == 404
    path = url.removeprefix(bot.url)
    await bot.stop()

    slack.fail("auth.test", error="invalid_auth")  # the old token, revoked: still stopped
    bot = await make_bot()
    assert (await bot.post(bot.url + path, b"{}", headers))[0] == 404
    await bot.stop()

    bot = await make_bot()  # a token Slack accepts for the workspace
    assert (await bot.post(bot.url + path, b'{"summary": "back"}', headers))[0] == 202
    card = await bot.wait_card(lambda m: "back" in block_texts(m))
    assert "deploy" in block_texts(card)
    async with bot.services.db.read() as session:
        actions = [r.action for r in (await session.execute(
            select(AuditRecord).where(AuditRecord.team_id == TEAM).order_by(AuditRecord.seq))).scalars()]
    assert actions.index("app.uninstalled") < actions.index("app.reinstalled")


async def test_approver_matrix(make_bot, workflows, target, slack):
    bot, url, secret = await approver_bot(make_bot, workflows, target)
    bot.seen = set()
    slack.add_user(TEAM, "U0CAROL01", "carol")

    card = await waiting_card(bot, url, secret)
    assert "not one of the approvers" in await bot.click(card, "approve", user="U0CAROL01", snapshot=card)
    assert "Guests, bots and deactivated accounts" in await bot.click(card, "approve", user=GUEST, snapshot=card)
    assert await bot.click(card, "approve", user=BOB, snapshot=card) is None  # BOB is in @oncall
    await bot.wait_thread(card, "Run succeeded")

    card = await waiting_card(bot, url, secret)
    slack.fail("usergroups.users.list", error="ratelimited", status=429, headers={"Retry-After": "1"})
    refusal = await bot.click(card, "approve", user=BOB, snapshot=card)
    assert refusal is not None and "could not check the approvers with Slack" in refusal
    assert await bot.click(card, "approve", user=ALICE, snapshot=card) is None  # named user: no lookup needed
    await bot.wait_thread(card, "Run succeeded")

    card = await waiting_card(bot, url, secret)
    assert "not whoever started the run" not in block_texts(card)  # a webhook's run has no starter
    await bot.click(card, "skip", user=BOB, snapshot=card)
    await bot.wait_thread(card, "Run succeeded")
    card = await waiting_card(bot, url, secret, by_command="run gate")
    assert "<@U0ALICE01>, @oncall, not whoever started the run" in block_texts(card)
    assert "You started this run" in await bot.click(card, "approve", user=ALICE, snapshot=card)
    assert await bot.click(card, "skip", user=BOB, snapshot=card) is None
    await bot.wait_thread(card, "Run succeeded")
    slack.teams[TEAM].users[BOB].deleted = True
    card = await waiting_card(bot, url, secret)
    assert "deactivated" in await bot.click(card, "approve", user=BOB, snapshot=card)


async def test_approval_timeout_is_enforced_after_a_restart(make_bot, workflows, target, slack):
    write_workflow(workflows, "gate", f"""
        name: gate
        on: webhook
        steps:
          - id: deploy
            approval: {{timeout: 1500ms, on_timeout: fail}}
            uses: http.request
            with: {{url: "{target.url}/deploy", method: POST}}
        """)
    first = await make_bot()
    url, secret = connection_from(await first.command("enable gate"), "webhook")
    await first.post(url, b"{}", {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
    card = await first.wait_card(lambda m: "approve" in buttons(m))
    await first.stop()
    second = await make_bot()
    thread = await second.wait_thread(card, "Run failed", timeout=15)
    assert any("timed out after waiting" in line for line in thread)
    assert target.received == []


async def test_cancel_by_approvers_and_admins_only(make_bot, workflows, target, slack):
    bot, url, secret = await approver_bot(make_bot, workflows, target)
    bot.seen = set()
    slack.add_user(TEAM, "U0CAROL01", "carol")
    card = await waiting_card(bot, url, secret)
    async with bot.services.db.read() as session:
        run = (await session.execute(select(Run))).scalar_one()
    assert "Only admins and the approvers" in await bot.command(f"cancel {run.id}", user="U0CAROL01")
    assert "is cancelled" in await bot.command(f"cancel {run.id}", user=BOB)
    thread = await bot.wait_thread(card, "Run cancelled by <@U0BOB0001>")
    assert thread
    await bot.settle()
    final = slack.message(TEAM, CHANNEL, card.ts)
    assert buttons(final) == [] and "cancelled" in block_texts(final)
    assert "has already ended" in await bot.command(f"cancel {run.id}")
    stale_click = await bot.click(card, "approve", user=ALICE, snapshot=card)
    assert stale_click == ("This run was cancelled by <@U0BOB0001>, so its steps can no longer be decided. "
                           "Nothing was changed.")
    assert f"*Run `{run.id}`* of `gate`" in await bot.command(f"status `{run.id}`")  # as copied from a reply
    assert target.received == []


async def test_app_home_shows_waiting_runs_and_decides_from_the_tab(make_bot, workflows, target, slack):
    bot, url, secret = await approver_bot(make_bot, workflows, target)
    bot.seen = set()
    card = await waiting_card(bot, url, secret)
    await slack.send_event(TEAM, {"type": "app_home_opened", "user": ALICE, "tab": "home", "channel": "D1"})
    view = await slack.wait_for(lambda: slack.teams[TEAM].home_views.get(ALICE))
    View(**view).validate_json()  # slack-sdk's own Block Kit checks
    home_text = json.dumps(view)
    assert "Waiting for your approval" in home_text and '"action_id": "approve"' in home_text
    assert "`gate` in <#C0DEPLOYS>" in home_text
    async with bot.services.db.read() as session:
        run = (await session.execute(select(Run))).scalar_one()
    assert f"last run `{run.id}`" in home_text  # the enabled workflow's line
    assert home_text.count(f"`{run.id}`") == 3  # waiting, enabled workflows, latest runs
    await slack.send_event(TEAM, {"type": "app_home_opened", "user": "U0CAROL01", "tab": "home"})
    slack.add_user(TEAM, "U0CAROL01", "carol")
    await slack.send_event(TEAM, {"type": "app_home_opened", "user": "U0CAROL01", "tab": "home"})
    carol_view = await slack.wait_for(lambda: slack.teams[TEAM].home_views.get("U0CAROL01"))
    assert "Nothing is waiting for you." in json.dumps(carol_view)

    # A click on the Home tab's button: there is no response_url, the tab is refreshed instead.
    actions_block = next(b for b in view["blocks"] if b.get("type") == "actions")
    payload = {"type": "block_actions", "team": {"id": TEAM, "domain": "acme"},
               "user": {"id": ALICE, "username": "alice", "name": "alice", "team_id": TEAM},
               "container": {"type": "view", "view_id": "VHOME"}, "view": {"type": "home", "id": "VHOME"},
               "trigger_id": "1.2.3", "api_app_id": "A0RELAYBOT", "token": "x",
               "actions": [{"type": "button", "action_id": "approve", "block_id": actions_block["block_id"],
                            "value": actions_block["elements"][0]["value"], "action_ts": "1.0"}]}
    slack.teams[TEAM].home_views.pop(ALICE)
    await slack.send_to_bot(("payload=" + json.dumps(payload)).encode(), "application/x-www-form-urlencoded")
    await bot.wait_thread(card, "Run succeeded")
    refreshed = await slack.wait_for(lambda: slack.teams[TEAM].home_views.get(ALICE))
    assert "Nothing is waiting for you." in json.dumps(refreshed)


async def test_anyone_means_anyone_in_the_channel_and_home_shows_only_ones_own_channels(make_bot, workflows,
                                                                                          slack):
    """Without named approvers, only people in the run's channel may decide, from the card or the Home tab; the
    Home tab shows nobody the workflows and runs of a private channel they are not in."""
    slack.add_channel(TEAM, "C0SECRET1", "incident-42", private=True, members=[ADMIN, BOB])
    write_workflow(workflows, "hush", """
        name: hush
        on: webhook
        steps:
          - id: go
            approval: required
            uses: slack.post
            with: {text: done, thread: true}
        """)
    bot = await make_bot()
    url, secret = connection_from(await bot.command("enable hush", channel="C0SECRET1"), "webhook")
    status, _ = await bot.post(url, b'{"summary": "the quiet one"}', {"Authorization": f"Bearer {secret}",
                                                                     "Content-Type": "application/json"})
    assert status == 202
    card = await bot.wait_card(lambda m: "approve" in buttons(m), channel="C0SECRET1")

    async def home_of(user: str) -> str:
        slack.teams[TEAM].home_views.pop(user, None)
        await slack.send_event(TEAM, {"type": "app_home_opened", "user": user, "tab": "home"})
        return json.dumps(await slack.wait_for(lambda: slack.teams[TEAM].home_views.get(user)))

    alice_home = await home_of(ALICE)
    assert "the quiet one" not in alice_home and "C0SECRET1" not in alice_home
    assert "Nothing is waiting for you." in alice_home
    bob_home = await home_of(BOB)
    assert "the quiet one" in bob_home and '"action_id": "approve"' in bob_home
    assert "`hush` in <#C0SECRET1>" in bob_home

    refusal = await bot.click(card, "approve", user=ALICE, channel="C0SECRET1")
    assert refusal == "Anyone in <#C0SECRET1> may decide this step, and you are not in it. Nothing was changed."
    async with bot.services.db.read() as session:
        run_id = (await session.execute(select(Run.id))).scalar_one()
    hidden = f"There is no run `{run_id}` in the channels you are in."
    assert await bot.command(f"status {run_id}", user=ALICE) == hidden  # typed in another channel
    assert await bot.command(f"cancel {run_id}", user=ALICE) == hidden
    assert "the quiet one" in await bot.command(f"status {run_id}", user=BOB)
    assert "the quiet one" in await bot.command(f"status {run_id}")  # an admin sees every channel's runs
    assert await bot.click(card, "approve", user=BOB, channel="C0SECRET1") is None
    await bot.wait_thread(card, "Run succeeded", channel="C0SECRET1")


async def test_socket_mode_needs_no_public_url_for_slack(make_bot, workflows, target, slack):
    write_workflow(workflows, "gate", GATE.replace("TARGET", target.url))
    slack.socket_mode = True
    bot = await make_bot(socket_mode=True, slack_app_token=slack.app_token, slack_signing_secret=None)
    await slack.wait_for(lambda: slack.socket_connected.is_set(), timeout=10)
    assert slack.calls_of("apps.connections.open")
    async with bot.http().post(f"{bot.url}/slack/events", data=b"{}") as response:
        assert response.status == 404  # no unsigned door when Slack comes over the socket
    url, secret = connection_from(await bot.command("enable gate"), "webhook")
    await bot.set_secret("TOKEN", "t")
    assert (await bot.post(url, b'{"summary": "over the socket"}',
                           {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}))[0] == 202
    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    assert await bot.click(card, "approve", user=ALICE) is None
    await bot.wait_thread(card, "Run succeeded")
    await slack.send_event(TEAM, {"type": "app_home_opened", "user": ALICE, "tab": "home"})
    await slack.wait_for(lambda: slack.teams[TEAM].home_views.get(ALICE))
    assert len(target.requests_to("/deploy")) == 1


async def test_one_workspaces_failure_in_a_channel_does_not_fail_anothers_messages(make_bot, workflows, target,
                                                                                    slack):
    """Messages of no run were laned by channel alone, and a lane fails whole: a workspace without a token (or
    one that cannot see the channel) made another workspace's messages to the same channel id fail unsent."""
    from bot.engine import journal
    from bot.store.models import OutboxMessage

    bot = await oauth_bot(make_bot, slack)
    await install(bot, TEAM)  # and not T0GONE0001: no token to post with
    async with bot.services.db.write() as session:
        journal.enqueue(session, team_id="T0GONE0001", channel_id=CHANNEL, kind=journal.POST,
                        payload={"text": "theirs"})
        journal.enqueue(session, team_id=TEAM, channel_id=CHANNEL, kind=journal.POST, payload={"text": "ours"})
    bot.services.wake()
    await bot.slack.wait_for(lambda: any(m.text == "ours" for m in slack.channel_messages(TEAM, CHANNEL)),
                             timeout=20)
    await bot.settle(timeout=20)
    async with bot.services.db.read() as session:
        states = dict((await session.execute(select(OutboxMessage.team_id, OutboxMessage.state))).all())
    assert states == {"T0GONE0001": "failed", TEAM: "sent"}


async def test_socket_mode_with_a_token_slack_refuses_stops_at_start(make_bot, slack):
    """The SDK's socket client retried a refused app token for good, logging a traceback every 10 s, and the HTTP
    port (webhooks, /healthz) was never bound: start-up now stops with one line naming the variable."""
    from bot.errors import ConfigError

    slack.socket_mode = True
    with pytest.raises(ConfigError, match=r"SLACK_APP_TOKEN: Slack refused it \(invalid_auth\)"):
        await make_bot(socket_mode=True, slack_app_token="xapp-1-not-the-right-one", slack_signing_secret=None)

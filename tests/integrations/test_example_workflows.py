"""The example workflows of GitLab, PagerDuty, Alertmanager and GitHub releases in workflows/: valid, and run for
real through the app against local fakes of the tools' APIs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime, timedelta
from typing import Any

from bot.engine.loader import compile_workflow
from tests.conftest import ADMIN, ALICE, BOB, CHANNEL, CORPORA, ROOT, TEAM, block_texts, buttons, github_headers
from tests.integrations.conftest import alertmanager_headers, dumps, gitlab_headers, pagerduty_headers

EXAMPLES = ROOT / "workflows"
MINE = ("gitlab-merge-comment", "pagerduty-acknowledge", "alertmanager-silence", "github-release-deploy")


def connection(reply: str) -> tuple[str, str | None]:
    url = re.search(r"URL: `([^`]+)`", reply)
    secret = re.search(r"Secret: `([^`]+)`", reply)
    assert url, reply
    return url.group(1), secret.group(1) if secret else None


def test_the_examples_validate():
    for name in MINE:
        path = EXAMPLES / f"{name}.yml"
        compiled = compile_workflow(path.read_text(), file=str(path))
        assert compiled.name == name
    files = [str(EXAMPLES / f"{name}.yml") for name in MINE]
    result = subprocess.run([sys.executable, "-m", "bot", "validate", *files], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ GitLab


def merged_merge_request() -> dict[str, Any]:
    payload = json.loads((CORPORA / "gitlab/merge_request.json").read_text())
    payload["object_attributes"].update(action="merge", state="merged", target_branch="master")
    return payload


async def test_gitlab_merge_comment(make_bot, target, gitlab_api):
    bot = await make_bot(workflows_dir=EXAMPLES, gitlab_api_url=gitlab_api.url)
    url, secret = connection(await bot.command(
        f"enable gitlab-merge-comment env=production branch=master deploy_url={target.url}/deploys"))
    await bot.set_secret("DEPLOY_TOKEN", "deploy-token-9")
    await bot.set_secret("GITLAB_TOKEN", gitlab_api.token)
    opened = json.loads((CORPORA / "gitlab/merge_request.json").read_text())
    assert (await bot.post(url, dumps(opened), gitlab_headers(secret, opened)))[0] == 202  # not merged: nothing
    merged = merged_merge_request()
    assert (await bot.post(url, dumps(merged), gitlab_headers(secret, merged)))[0] == 202

    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    assert len(bot.cards()) == 1
    text = block_texts(card)
    assert "Merged: MS-Viewport" in text and "gitlabhq/gitlab-test !1 merged by user1: MS-Viewport" in text
    assert "Deploy !1 to production" in text
    await bot.click(card, "approve", user=ALICE)
    thread = await bot.wait_thread(card, "Run succeeded")

    [deploy] = target.requests_to("/deploys")
    assert deploy.json() == {"project": "gitlabhq/gitlab-test", "sha": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
                             "env": "production"}
    [call] = gitlab_api.calls
    assert call.raw_path == "/api/v4/projects/gitlabhq%2Fgitlab-test/merge_requests/1/notes"
    assert call.headers["PRIVATE-TOKEN"] == gitlab_api.token
    assert call.body == {"body": "Deployed to production, approved by alice."}
    assert any("*comment* succeeded" in line for line in thread)
    assert gitlab_api.token not in json.dumps([c.args for c in bot.slack.calls])


# ------------------------------------------------------------------------------------------------ PagerDuty

PAGERDUTY_SECRET = "lDQHScfUeXUKaQRNF+8XIiDKZ7XX3itBAYzwU0TARw8lJqRnkKl2iB1anSb0Z+IK"  # as PagerDuty shows one


async def store_pagerduty_signing_secret(bot: Any) -> None:
    """`/relay connect pagerduty set-secret`, then the secret PagerDuty generated, pasted into the form."""
    status, _ = await bot.slack.slash_command(TEAM, CHANNEL, ADMIN, "connect pagerduty set-secret")
    assert status == 200
    modal = await bot.slack.wait_for(lambda: bot.slack.open_modal(TEAM, ADMIN))
    before = len(bot.slack.teams[TEAM].ephemeral)
    await bot.slack.submit_view(TEAM, ADMIN, modal["view"]["id"], {"secret_value": {"value": PAGERDUTY_SECRET}})
    await bot.slack.wait_for(lambda: len(bot.slack.teams[TEAM].ephemeral) > before)


def triggered_incident() -> dict[str, Any]:
    payload = json.loads((CORPORA / "pagerduty/incident.priority_updated.json").read_text())
    payload["event"]["event_type"] = "incident.triggered"
    payload["event"]["id"] = "01BWDWL3NYY7LUFPZCC28QUCMZ"
    return payload


async def test_pagerduty_acknowledge_then_resolve(make_bot, pagerduty_api):
    bot = await make_bot(workflows_dir=EXAMPLES, pagerduty_api_url=pagerduty_api.url)
    url, _ = connection(await bot.command("enable pagerduty-acknowledge pagerduty_user=oncall@example.com"))
    await store_pagerduty_signing_secret(bot)
    await bot.set_secret("PAGERDUTY_TOKEN", pagerduty_api.token)

    priority = (CORPORA / "pagerduty/incident.priority_updated.json").read_bytes()
    assert (await bot.post(url, priority, pagerduty_headers(PAGERDUTY_SECRET, priority)))[0] == 202  # filtered
    body = dumps(triggered_incident())
    status, answer = await bot.post(url, body, pagerduty_headers(PAGERDUTY_SECRET, body, webhook_id="wh-1"))
    assert status == 202, answer

    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    assert len(bot.cards()) == 1
    text = block_texts(card)
    assert "Incident #2: A little bump in the road" in text and "Acknowledge incident #2" in text, text
    assert "API Service: incident #2 triggered by Tenex Engineer: A little bump in the road" in text
    await bot.click(card, "approve", user=ALICE)
    await bot.wait_thread(card, "*Resolve incident #2* is waiting for approval")
    assert pagerduty_api.incidents["PGR0VU2"]["status"] == "acknowledged"
    [note] = pagerduty_api.notes["PGR0VU2"]
    assert re.fullmatch(r"Acknowledged from Slack by alice: https://app\.slack\.com/client/.+", note["content"])

    card = await bot.wait_card(lambda m: "approve" in buttons(m) and "Resolve incident #2" in block_texts(m))
    await bot.click(card, "approve", user=BOB)
    await bot.wait_thread(card, "Run succeeded")
    ack, added, resolve = pagerduty_api.calls[-3:]
    assert (ack.method, ack.path, ack.body) == ("PUT", "/incidents/PGR0VU2",
                                                {"incident": {"type": "incident_reference", "status": "acknowledged"}})
    assert (added.method, added.path) == ("POST", "/incidents/PGR0VU2/notes")
    assert (resolve.method, resolve.body) == ("PUT", {"incident": {"type": "incident_reference", "status": "resolved",
                                                                   "resolution": "Resolved from Slack by bob"}})
    for call in (ack, added, resolve):
        assert call.headers["From"] == "oncall@example.com"
        assert call.headers["Authorization"] == f"Token token={pagerduty_api.token}"
    assert pagerduty_api.incidents["PGR0VU2"]["status"] == "resolved"


# ------------------------------------------------------------------------------------------------ Alertmanager


async def test_alertmanager_silence_after_approval(make_bot, alertmanager_api):
    bot = await make_bot(workflows_dir=EXAMPLES)
    url, secret = connection(await bot.command(
        f"enable alertmanager-silence alertmanager_url={alertmanager_api.url} duration=90m"))
    resolved = (CORPORA / "alertmanager/resolved.json").read_bytes()
    assert (await bot.post(url, resolved, alertmanager_headers(secret)))[0] == 202  # resolved: nothing to silence
    firing = (CORPORA / "alertmanager/firing.json").read_bytes()
    assert (await bot.post(url, firing, alertmanager_headers(secret, basic=True)))[0] == 202

    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    assert len(bot.cards()) == 1
    text = block_texts(card)
    assert "[FIRING:2] HighErrorRate (job=api, severity=page): API 5xx ratio above 5%" in text
    assert "Silence HighErrorRate for 90m" in text and "Runbook" in text  # the integration's default fields
    await bot.click(card, "approve", user=BOB)
    thread = await bot.wait_thread(card, "Run succeeded")

    [call] = alertmanager_api.calls
    assert (call.method, call.path) == ("POST", "/api/v2/silences")
    assert call.body["matchers"] == [{"name": name, "value": value, "isRegex": False, "isEqual": True}
                                     for name, value in (("alertname", "HighErrorRate"), ("job", "api"),
                                                         ("severity", "page"))]
    starts = datetime.fromisoformat(call.body["startsAt"].replace("Z", "+00:00"))
    ends = datetime.fromisoformat(call.body["endsAt"].replace("Z", "+00:00"))
    assert ends - starts == timedelta(minutes=90)
    assert call.body["createdBy"] == "bob" and call.body["comment"].startswith("Silenced from Slack: https://")
    [silence] = alertmanager_api.silences
    assert any(f"Silenced until {call.body['endsAt']}: {alertmanager_api.url}/#/silences/{silence['id']}" in line
               for line in thread), thread


# ------------------------------------------------------------------------------------------------ GitHub


async def test_github_release_deploy(make_bot, github_api):
    bot = await make_bot(workflows_dir=EXAMPLES, github_api_url=github_api.url)
    url, secret = connection(await bot.command("enable github-release-deploy workflow=release.yml env=staging"))
    await bot.set_secret("GITHUB_TOKEN", github_api.token)
    prerelease = (CORPORA / "github/release/prereleased.payload.json").read_bytes()
    assert (await bot.post(url, prerelease, github_headers(secret, prerelease, event="release",
                                                           delivery="r-1")))[0] == 202
    published = (CORPORA / "github/release/published.payload.json").read_bytes()
    assert (await bot.post(url, published, github_headers(secret, published, event="release",
                                                          delivery="r-2")))[0] == 202

    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    assert len(bot.cards()) == 1
    text = block_texts(card)
    assert "Release 0.0.1 published" in text and "Run release.yml for 0.0.1 in staging" in text
    await bot.click(card, "approve", user=ALICE)
    thread = await bot.wait_thread(card, "Run succeeded")
    [call] = github_api.calls
    assert call.method == "POST"
    assert call.path == "/repos/Codertocat/Hello-World/actions/workflows/release.yml/dispatches"
    assert call.body == {"ref": "0.0.1", "inputs": {"environment": "staging", "approved_by": "alice"}}
    assert call.headers["Authorization"] == f"Bearer {github_api.token}"
    assert any("Started release.yml for 0.0.1: https://github.com/Codertocat/Hello-World/actions" in line
               for line in thread)

"""The example workflows in workflows/ run for real, against local fakes."""

from __future__ import annotations

import json

from tests.conftest import ALICE, BOB, CHANNEL, CORPORA, ROOT, TEAM, block_texts, buttons, connection_from

EXAMPLES = ROOT / "workflows"


async def test_deploy_on_merge(make_bot, target, github_api):
    bot = await make_bot(workflows_dir=EXAMPLES, github_api_url=github_api.url)
    reply = await bot.command(f"enable deploy-on-merge env=production branch=master deploy_url={target.url}/deploys")
    url, secret = connection_from(reply, "github")
    await bot.set_secret("DEPLOY_TOKEN", "deploy-token-123")
    await bot.set_secret("GITHUB_TOKEN", github_api.token)
    payload = json.loads((CORPORA / "github/pull_request/closed.payload.json").read_text())
    payload["pull_request"]["merged"] = True
    assert (await bot.github(url, secret, payload))[0] == 202

    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    text = block_texts(card)
    assert "Merged: Update the README with new information" in text and "Deploy c4295bd to production" in text
    await bot.click(card, "approve", user=ALICE)
    thread = await bot.wait_thread(card, "Run succeeded")

    [deploy] = target.requests_to("/deploys")
    assert deploy.headers["Authorization"] == "Bearer deploy-token-123"
    assert deploy.json() == {"sha": "c4295bd74fb0f4fda03689c3df3f2803b658fd85", "env": "production",
                             "pull_request": 2}
    [comment] = github_api.comments
    assert comment["body"] == "Deployed to production, approved by alice." and comment["issue_number"] == 2
    assert github_api.calls[0].path == "/repos/Codertocat/Hello-World/issues/2/comments"
    recorded = json.dumps([call.args for call in bot.slack.calls])
    assert "deploy-token-123" not in recorded and github_api.token not in recorded
    assert any("*comment* succeeded" in line for line in thread)


async def test_ci_failure(make_bot, github_api):
    bot = await make_bot(workflows_dir=EXAMPLES, github_api_url=github_api.url)
    url, secret = connection_from(await bot.command("enable ci-failure repo=acme/web"), "webhook")
    await bot.set_secret("GITHUB_TOKEN", github_api.token)
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    passed = {"status": "passed", "build": 41, "branch": "main", "pipeline": "test", "url": "https://ci.example/41"}
    assert (await bot.post(url, json.dumps(passed).encode(), headers))[0] == 202
    failed = {**passed, "status": "failed", "build": 42, "url": "https://ci.example/42", "message": "3 tests failed"}
    assert (await bot.post(url, json.dumps(failed).encode(), headers))[0] == 202

    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    assert len(bot.cards()) == 1  # the passing build started nothing
    text = block_texts(card)
    assert "Build 42 failed on main" in text and "3 tests failed" in text and "https://ci.example/42" in text
    await bot.wait_thread(card, "test failed on `main`: https://ci.example/42")
    await bot.click(card, "approve", user=BOB)
    await bot.wait_thread(card, "Run succeeded")
    [issue] = github_api.issues
    assert issue["title"] == "CI failed: test on main (build 42)"
    assert issue["body"] == "See https://ci.example/42. Opened from Slack by bob."
    assert issue["labels"] == [{"name": "ci"}]


async def test_restart_service_needs_a_second_person(make_bot, target):
    bot = await make_bot(workflows_dir=EXAMPLES)
    reply = await bot.command(f"enable restart-service restart_url={target.url}/restart")
    assert "connection" not in reply  # started by hand only: nothing to connect
    await bot.set_secret("OPS_TOKEN", "ops-secret")
    await bot.command("run restart-service service=api", user=ALICE)
    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    assert "Restart api" in block_texts(card)
    refusal = await bot.click(card, "approve", user=ALICE)
    assert refusal is not None and "You started this run" in refusal
    assert await bot.click(card, "approve", user=BOB) is None
    await bot.wait_thread(card, "Run succeeded")
    [restart] = target.requests_to("/restart")
    assert restart.json() == {"service": "api", "requested_by": ALICE}
    assert restart.headers["Authorization"] == "Bearer ops-secret"
    assert bot.slack.message(TEAM, CHANNEL, card.ts) is not None

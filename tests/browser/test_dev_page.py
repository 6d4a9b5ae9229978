"""The dev page in a real browser: Debian's Chromium, headless, driven by Playwright, against `relaybot dev`
started as a real process — as a new user would use it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright, expect

from tests.conftest import ROOT, write_workflow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="Debian's Chromium is not installed at /usr/bin/chromium "
                                       "(apt-get install chromium); the browser test never downloads a browser")

DEPLOY = """
name: deploy-on-merge
title: Deploy merged pull requests
on:
  github: {events: [pull_request]}
if: event.action == "closed" && event.pull_request.merged
card:
  title: "Merged: ${{ event.pull_request.title }}"
  fields: {Repository: "${{ event.repository.full_name }}"}
steps:
  - id: deploy
    title: Deploy ${{ event.pull_request.merge_commit_sha.substring(0, 7) }}
    approval: required
    uses: slack.post
    with:
      text: "Deployed #${{ event.pull_request.number }}, approved by ${{ steps.deploy.approved_by }}."
      thread: true
"""


@pytest.fixture
async def dev_url(tmp_path: Path) -> AsyncIterator[str]:
    """`relaybot dev --port 0` in its own process; its printed URL."""
    write_workflow(tmp_path / "workflows", "deploy-on-merge", DEPLOY)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLACK_", "RELAYBOT_"))}
    env["RELAYBOT_WORKFLOWS_DIR"] = str(tmp_path / "workflows")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "dev", "--port", "0", cwd=str(tmp_path), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    seen: list[str] = []
    try:
        url = None
        async with asyncio.timeout(60):
            while url is None:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise AssertionError("relaybot dev exited before printing its URL:\n" + "".join(seen))
                seen.append(line)
                match = re.search(r"open (http://127\.0\.0\.1:\d+)/", line)
                url = match.group(1) if match else None
        drain = asyncio.create_task(process.stdout.read())  # keep the pipe from filling up
        yield url
    finally:
        if process.returncode is None:
            process.terminate()  # SIGTERM to this process only: relaybot dev stops cleanly
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
    drain.cancel()
    assert process.returncode == 0, "relaybot dev did not stop cleanly on SIGTERM"
    data = tmp_path / ".relaybot-dev"
    assert (data / "relaybot.db").exists() and (data / "slack.json").exists() and (data / "master.key").exists()


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 1400, "height": 1000})
        yield await context.new_page()
        await browser.close()


async def test_enable_send_an_event_approve_and_watch_the_thread(dev_url, page):
    await page.goto(dev_url + "/")
    await expect(page.locator("#channel-header")).to_contain_text("deploys")
    await expect(page.get_by_test_id("me")).to_have_value("U0DEVYOU01")

    box = page.get_by_test_id("message-box")
    await box.fill("/relay enable deploy-on-merge")
    await box.press("Enter")
    reply = page.get_by_test_id("ephemeral").filter(has_text="deploy-on-merge")
    await expect(reply).to_contain_text("enabled in this channel")
    await expect(reply).to_contain_text("Only visible to you")
    await expect(reply.locator("code", has_text="/hooks/")).to_be_visible()

    await page.get_by_test_id("send-event").click()
    await page.get_by_test_id("event-integration").select_option("github")
    await page.get_by_test_id("event-example").select_option("pull_request.closed-merged")
    await expect(page.get_by_test_id("event-body")).to_have_value(re.compile(r'"merged": true'))
    await expect(page.locator("#event-connection")).to_contain_text("Signed as GitHub signs")
    await page.get_by_test_id("event-submit").click()
    await expect(page.get_by_test_id("event-status")).to_contain_text("HTTP 202")

    card = page.get_by_test_id("message").filter(has=page.locator(".block-header"))
    await expect(card.locator(".block-header")).to_have_text("Merged: Update the README with new information.")
    await expect(card).to_contain_text("Codertocat/Hello-World")
    await expect(card).to_contain_text("waiting for approval")
    thread = card.get_by_test_id("thread")
    await expect(thread).to_contain_text("is waiting for approval")
    approve = card.get_by_role("button", name="Approve")
    await expect(approve).to_be_visible()
    await expect(card.get_by_role("button", name="Skip")).to_be_visible()

    await page.get_by_test_id("me").select_option("U0DEVALICE")
    await approve.click()

    await expect(thread).to_contain_text("approved by @alice", timeout=15_000)
    await expect(thread).to_contain_text("Deployed #2, approved by alice.")
    await expect(thread).to_contain_text("Run succeeded")
    await expect(card.get_by_role("button", name="Approve")).to_have_count(0)
    await expect(card).to_contain_text("succeeded (approved by @alice)")
    await expect(card.locator(".block-context")).to_contain_text("succeeded")
    await expect(card).to_contain_text("(edited)")
    await expect(page.get_by_test_id("activity")).to_contain_text("HTTP 202")

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dev-page.png"), full_page=True)
    assert (ARTIFACTS / "dev-page.png").stat().st_size > 10_000

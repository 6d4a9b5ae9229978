"""Fixtures for the integration tests: local fakes of the tools' APIs, an action context wired to them, and how
each tool signs what it sends (written from the tools' documentation, not from `integrations/*`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from integrations.base import ActionContext
from integrations.httpclient import HttpClient
from tests.fakes.alertmanager import FakeAlertmanager
from tests.fakes.gitlab import FakeGitLab
from tests.fakes.pagerduty import FakePagerDuty

GITLAB_EVENT_HEADERS = {"push": "Push Hook", "tag_push": "Tag Push Hook", "issue": "Issue Hook",
                        "note": "Note Hook", "merge_request": "Merge Request Hook", "pipeline": "Pipeline Hook",
                        "build": "Job Hook", "deployment": "Deployment Hook", "release": "Release Hook"}


def gitlab_headers(secret: str, payload: dict[str, Any], *, event_uuid: str | None = None,
                   idempotency_key: str | None = None) -> dict[str, str]:
    """GitLab sends the secret token as is, in X-Gitlab-Token."""
    return {"Content-Type": "application/json", "X-Gitlab-Token": secret,
            **({"Idempotency-Key": idempotency_key} if idempotency_key else {}),
            "X-Gitlab-Event": GITLAB_EVENT_HEADERS.get(payload.get("object_kind", ""), "System Hook"),
            "X-Gitlab-Event-UUID": event_uuid or str(uuid.uuid4()),
            "X-Gitlab-Webhook-UUID": "1b2c3d4e-0000-4000-8000-000000000001", "User-Agent": "GitLab/17.5.0"}


def pagerduty_signature(secret: str, body: bytes) -> str:
    """V3: `v1=` and the hex HMAC-SHA256 of the raw body, keyed with the subscription's secret."""
    return "v1=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def pagerduty_headers(secret: str, body: bytes, *, webhook_id: str | None = None,
                      extra_signatures: tuple[str, ...] = ()) -> dict[str, str]:
    signatures = ",".join((*extra_signatures, pagerduty_signature(secret, body)))
    return {"Content-Type": "application/json", "X-PagerDuty-Signature": signatures,
            "X-Webhook-Id": webhook_id or str(uuid.uuid4()), "X-Webhook-Subscription": "PSUB123",
            "User-Agent": "PagerDuty-Webhook/V3.0"}


def alertmanager_headers(secret: str, *, basic: bool = False) -> dict[str, str]:
    """Alertmanager's http_config: `authorization: {credentials: …}` (Bearer) or `basic_auth`."""
    if basic:
        token = base64.b64encode(f"relaybot:{secret}".encode()).decode()
        authorization = f"Basic {token}"
    else:
        authorization = f"Bearer {secret}"
    return {"Content-Type": "application/json", "Authorization": authorization,
            "User-Agent": "Alertmanager/0.27.0"}


def dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode()


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    """The guarded client, with only the local fakes' host allowed."""
    client = HttpClient(allow=["127.0.0.1"], timeout=5.0)
    yield client
    await client.close()


@pytest.fixture
async def gitlab_api() -> AsyncIterator[FakeGitLab]:
    server = FakeGitLab()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def pagerduty_api() -> AsyncIterator[FakePagerDuty]:
    server = FakePagerDuty()
    server.add_incident("PGR0VU2")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def alertmanager_api() -> AsyncIterator[FakeAlertmanager]:
    server = FakeAlertmanager()
    await server.start()
    yield server
    await server.stop()


def action_context(http: HttpClient, **base_urls: str) -> ActionContext:
    return ActionContext(http=http, slack=None, idempotency_key="run-1:step", timeout=5.0, base_urls=base_urls)


TOOL_SECRET = "pd-generated-signing-secret-0123456789abcdef"


async def paste_tool_secret(bot: Any, integration: str, secret: str = TOOL_SECRET) -> str:
    """`/relay connect <integration> set-secret` and the tool's own secret pasted into the form (PagerDuty)."""
    from tests.conftest import ADMIN, CHANNEL, TEAM

    status, _ = await bot.slack.slash_command(TEAM, CHANNEL, ADMIN, f"connect {integration} set-secret")
    assert status == 200
    modal = await bot.slack.wait_for(lambda: bot.slack.open_modal(TEAM, ADMIN))
    before = len(bot.slack.teams[TEAM].ephemeral)
    await bot.slack.submit_view(TEAM, ADMIN, modal["view"]["id"], {"secret_value": {"value": secret}})
    await bot.slack.wait_for(lambda: len(bot.slack.teams[TEAM].ephemeral) > before)
    bot.services.connections.forget()
    return secret


async def enable_and_connect(bot: Any, workflow: str) -> tuple[str, str]:
    """Enable a workflow; (URL, secret) of its connection, pasting a tool-generated secret where needed."""
    import re

    reply = await bot.command(f"enable {workflow}")
    assert f"`{workflow}` enabled" in reply, reply
    url = re.search(r"URL: `([^`]+)`", reply)
    assert url, reply
    secret = re.search(r"Secret: `([^`]+)`", reply)
    if secret:
        return url.group(1), secret.group(1)
    integration = re.search(r"`/relay connect (\w+) set-secret`", reply)
    assert integration, reply
    return url.group(1), await paste_tool_secret(bot, integration.group(1))

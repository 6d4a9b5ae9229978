"""Slack Web API clients, per workspace, all pointed at `SLACK_API_URL`.

Tokens come from `SLACK_BOT_TOKEN` (single-workspace mode) or from the installation store (OAuth mode); the
app is never mutated per workspace.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.metrics import Metrics
from integrations.base import ActionFailed

log = logging.getLogger(__name__)


class NoToken(Exception):
    """relaybot has no token for the workspace (uninstalled, or a token of another workspace)."""


class TokenSource(Protocol):
    async def bot_token(self, team_id: str) -> str | None: ...


class StaticToken:
    """Single-workspace mode: one bot token for the one workspace."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def bot_token(self, team_id: str) -> str | None:
        return self.token


class SlackApi:
    def __init__(self, *, base_url: str, tokens: TokenSource, metrics: Metrics, timeout: float = 15.0) -> None:
        self.base_url = base_url
        self.tokens = tokens
        self.metrics = metrics
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def client(self, token: str | None) -> AsyncWebClient:
        # Retries are the outbox's job (it honours Retry-After and keeps order), not the SDK's.
        return AsyncWebClient(token=token, base_url=self.base_url, session=self.session(), retry_handlers=[],
                              timeout=int(self.timeout))

    async def for_team(self, team_id: str) -> AsyncWebClient:
        token = await self.tokens.bot_token(team_id)
        if not token:
            raise NoToken(f"no bot token for workspace {team_id}")
        return self.client(token)

    async def call(self, team_id: str, method: str, **kwargs: Any) -> dict[str, Any]:
        client = await self.for_team(team_id)
        try:
            if method.startswith(("chat.", "views.")):
                response = await client.api_call(method, json=kwargs)
            else:  # read methods (users.info, usergroups.users.list ...) take form parameters
                response = await client.api_call(method, data=kwargs)
        except SlackApiError as exc:
            self.metrics.slack_calls.labels(method=method, result=str(exc.response.get("error", "error"))).inc()
            raise
        self.metrics.slack_calls.labels(method=method, result="ok").inc()
        return dict(response.data) if isinstance(response.data, dict) else {}


class TeamPoster:
    """`slack.post` for one workspace: a direct call, so the action gets the message's ts back."""

    def __init__(self, api: SlackApi, team_id: str) -> None:
        self.api = api
        self.team_id = team_id

    async def post_message(self, *, channel: str, text: str, blocks: list[dict[str, Any]] | None = None,
                           thread_ts: str | None = None) -> dict[str, Any]:
        arguments: dict[str, Any] = {"channel": channel, "text": text}
        if blocks:
            arguments["blocks"] = blocks
        if thread_ts:
            arguments["thread_ts"] = thread_ts
        try:
            return await self.api.call(self.team_id, "chat.postMessage", **arguments)
        except SlackApiError as exc:
            error = exc.response.get("error", "error")
            status = exc.response.status_code
            raise ActionFailed(f"Slack refused the message: {error}",
                               retryable=status == 429 or status >= 500) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ActionFailed(f"Slack could not be reached: {exc}") from None
        except NoToken as exc:
            raise ActionFailed(str(exc), retryable=False) from None

"""Slack Web API clients, per workspace, all pointed at `SLACK_API_URL`.

Tokens come from `SLACK_BOT_TOKEN` (single-workspace mode) or from the installation store (OAuth mode); the
app is never mutated per workspace.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Protocol

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.version import __version__ as slack_sdk_version
from slack_sdk.web.slack_response import SlackResponse

from bot.metrics import Metrics
from integrations import jsontext
from integrations.base import ActionFailed

log = logging.getLogger(__name__)
USER_AGENT = (f"relaybot Python/{sys.version_info.major}.{sys.version_info.minor} "
              f"slack_sdk/{slack_sdk_version} aiohttp/{aiohttp.__version__}")
# Methods that take a JSON body; the read methods (users.info, conversations.history ...) take form fields.
JSON_METHODS = ("chat.", "views.")


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


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
            # No cookie jar: the Web API authenticates by token and one session serves every workspace (the
            # default jar's work also cost about 40 µs per call on loopback).
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, team_id: str, method: str, **kwargs: Any) -> dict[str, Any]:
        """One Web API call with the workspace's token; `SlackApiError` (as slack-sdk raises it) when Slack says
        `ok: false` or answers with an error status.

        A direct aiohttp request rather than slack-sdk's `api_call`: the outbox makes several calls per run,
        and the SDK's per-call work (a client, request building, response wrapping) cost more CPU than the
        rest of delivering a message.
        """
        token = await self.tokens.bot_token(team_id)
        if not token:
            raise NoToken(f"no bot token for workspace {team_id}")
        url = self.base_url + method
        headers = {"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT}
        if method.startswith(JSON_METHODS):
            headers["Content-Type"] = "application/json;charset=utf-8"
            body: Any = jsontext.dumps_bytes({k: v for k, v in kwargs.items() if v is not None})
        else:
            body = {k: _form_value(v) for k, v in kwargs.items() if v is not None}
        async with self.session().post(url, data=body, headers=headers) as response:
            raw = await response.read()
            # Lower-cased names: Slack sends `retry-after`, and a plain dict would look names up by case.
            status = response.status
            response_headers = {name.lower(): value for name, value in response.headers.items()}
        try:
            data = jsontext.loads(raw) if raw else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        if status != 200 or not data.get("ok", False):
            data.setdefault("ok", False)
            data.setdefault("error", "ratelimited" if status == 429 else f"http_{status}")
            self.metrics.slack_calls.labels(method=method, result=str(data["error"])).inc()
            answer = SlackResponse(client=None, http_verb="POST", api_url=url, req_args={}, data=data,
                                   headers=response_headers, status_code=status)
            raise SlackApiError(f"The request to the Slack API failed. (url: {url}, status: {status})", answer)
        self.metrics.slack_calls.labels(method=method, result="ok").inc()
        return data


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

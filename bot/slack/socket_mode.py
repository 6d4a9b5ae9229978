"""Socket Mode: Slack's requests arrive over a WebSocket the bot opens (`SLACK_APP_TOKEN`), so no public URL
is needed for Slack. Webhooks from other tools still come in over HTTP at `/hooks/<connection>`.
"""

from __future__ import annotations

import logging

from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.errors import ConfigError
from bot.settings import Settings

log = logging.getLogger(__name__)


# Answers to `apps.connections.open` that no retry mends: the token is wrong, not the network.
REFUSED_TOKEN = frozenset({"invalid_auth", "not_authed", "not_allowed_token_type", "missing_scope",
                           "account_inactive", "token_revoked", "token_expired", "invalid_token"})


async def connect(bolt: AsyncApp, settings: Settings) -> AsyncSocketModeHandler:
    """Open the connection (`apps.connections.open` at SLACK_API_URL, then the WebSocket it names). A token Slack
    refuses stops start-up with one line: the SDK's client would retry it for good, the HTTP port never bound."""
    assert settings.slack_app_token is not None
    web_client = AsyncWebClient(base_url=settings.slack_api_url)
    try:
        await web_client.apps_connections_open(app_token=settings.slack_app_token)
    except SlackApiError as exc:
        error = str(exc.response.get("error", ""))
        if error in REFUSED_TOKEN:
            raise ConfigError(f"SLACK_APP_TOKEN: Slack refused it ({error}); it must be the app-level token "
                              "(xapp-…) with the connections:write scope") from None
        raise
    handler = AsyncSocketModeHandler(bolt, settings.slack_app_token, web_client=web_client)
    await handler.connect_async()
    log.info("connected to Slack with Socket Mode")
    return handler

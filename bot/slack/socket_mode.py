"""Socket Mode: Slack's requests arrive over a WebSocket the bot opens (`SLACK_APP_TOKEN`), so no public URL
is needed for Slack. Webhooks from other tools still come in over HTTP at `/hooks/<connection>`.
"""

from __future__ import annotations

import logging

from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot.settings import Settings

log = logging.getLogger(__name__)


async def connect(bolt: AsyncApp, settings: Settings) -> AsyncSocketModeHandler:
    """Open the connection (`apps.connections.open` at SLACK_API_URL, then the WebSocket it names)."""
    assert settings.slack_app_token is not None
    handler = AsyncSocketModeHandler(bolt, settings.slack_app_token,
                                     web_client=AsyncWebClient(base_url=settings.slack_api_url))
    await handler.connect_async()
    log.info("connected to Slack with Socket Mode")
    return handler

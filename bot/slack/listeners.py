"""The Bolt app: which Slack request goes to which listener, and the one error handler.

Every listener acks first and does its work after; refusals and failures reach the user as an ephemeral
message (`UserError` text, or a reference id for anything unexpected, which is also in the log).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond

from bot.errors import UserError, reference_id
from bot.services import Services
from bot.slack import actions, commands, messages, secrets
from bot.slack.blocks import APPROVE_ACTION, SKIP_ACTION

log = logging.getLogger(__name__)


async def _ephemeral(respond: AsyncRespond | None, text: str) -> None:
    if respond is None:
        log.warning("no response_url to tell the user: %s", text)
        return
    try:
        await respond(text=text, response_type="ephemeral", replace_original=False)
    except Exception:
        log.exception("could not send an ephemeral reply")


async def guarded(respond: AsyncRespond | None, work: Callable[[], Awaitable[str | None]]) -> None:
    """Run a listener's work; show its reply, its UserError, or a reference id, where the user is."""
    try:
        reply = await work()
    except UserError as exc:
        await _ephemeral(respond, exc.message)
        return
    except Exception:
        ref = reference_id()
        log.exception("unexpected error [ref %s]", ref)
        await _ephemeral(respond, messages.UNEXPECTED.format(ref=ref))
        return
    if reply:
        await _ephemeral(respond, reply)


# Modules that add listeners of their own (modals, App Home, events) register here: `register(app, services)`.
EXTENSIONS: tuple[Callable[[AsyncApp, Services], None], ...] = (secrets.register,)


def build_bolt_app(services: Services, *, authorize: Callable[..., Awaitable[AuthorizeResult]] | None = None
                   ) -> AsyncApp:
    settings = services.settings
    from slack_sdk.web.async_client import AsyncWebClient

    # Bolt's client (for `respond` and its one `auth.test`) also goes to SLACK_API_URL.
    client = AsyncWebClient(base_url=settings.slack_api_url,
                            token=settings.slack_bot_token if authorize is None else None)
    options: dict[str, Any] = {
        "signing_secret": settings.slack_signing_secret or "",
        "client": client,
        "process_before_response": False,
        "request_verification_enabled": True,
        "ignoring_self_events_enabled": False,
    }
    if authorize is not None:
        options["authorize"] = authorize
    app = AsyncApp(**options)

    @app.command(settings.command)
    async def on_command(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond) -> None:
        await ack()
        command = commands.Command.from_body(body, settings.command)
        await guarded(respond, lambda: commands.dispatch(services, command))

    async def on_click(ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], respond: AsyncRespond) -> None:
        await ack()
        await guarded(respond, lambda: actions.decide(services, body, action))

    app.action(APPROVE_ACTION)(on_click)
    app.action(SKIP_ACTION)(on_click)

    for extension in EXTENSIONS:
        extension(app, services)

    @app.error
    async def on_error(error: Exception, body: dict[str, Any]) -> None:
        ref = reference_id()
        log.error("unhandled error in a Slack request [ref %s]: %r", ref, error)

    return app

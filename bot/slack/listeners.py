"""The Bolt app: which Slack request goes to which listener, and the one error handler.

Every listener acks first and does its work after; refusals and failures reach the user as an ephemeral
message (`UserError` text, or a reference id for anything unexpected, which is also in the log).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization.async_authorize import AsyncInstallationStoreAuthorize
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings
from slack_sdk.oauth.state_store.sqlalchemy import AsyncSQLAlchemyOAuthStateStore
from slack_sdk.web.async_client import AsyncWebClient

from bot.errors import UserError, reference_id
from bot.services import Services
from bot.slack import actions, commands, home, lifecycle, messages, secrets
from bot.slack.blocks import APPROVE_ACTION, RETRY_ACTION, SKIP_ACTION

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


OAUTH_SCOPES = ("commands", "chat:write", "users:read", "usergroups:read", "channels:read", "groups:read",
                "channels:history", "groups:history")


def _oauth_settings(services: Services) -> AsyncOAuthSettings:
    settings = services.settings
    assert services.installations is not None
    return AsyncOAuthSettings(
        client_id=settings.slack_client_id, client_secret=settings.slack_client_secret, scopes=list(OAUTH_SCOPES),
        redirect_uri=f"{settings.public_url}/slack/oauth_redirect", install_path="/slack/install",
        redirect_uri_path="/slack/oauth_redirect", installation_store=services.installations,
        installation_store_bot_only=True,
        state_store=AsyncSQLAlchemyOAuthStateStore(expiration_seconds=600, engine=services.db.engine),
        authorization_url=settings.slack_authorize_url)


def build_bolt_app(services: Services, *, socket_mode: bool = False) -> AsyncApp:
    settings = services.settings
    # Bolt's client (for `respond`, `auth.test` and `oauth.v2.access`) also goes to SLACK_API_URL.
    client = AsyncWebClient(base_url=settings.slack_api_url,
                            token=None if settings.oauth_enabled else settings.slack_bot_token)
    options: dict[str, Any] = {
        "signing_secret": settings.slack_signing_secret or "",
        "client": client,
        "process_before_response": False,
        # Over HTTP every request must carry Slack's signature; over Socket Mode the connection itself is
        # authenticated (the app token) and there is nothing to sign.
        "request_verification_enabled": not socket_mode,
        "ignoring_self_events_enabled": False,
    }
    if settings.oauth_enabled:
        assert services.installations is not None
        options["oauth_settings"] = _oauth_settings(services)
        # Bolt's default asks Slack `auth.test` on every request; the answer for a token does not change, so it
        # is kept (a revoked token finds no installation any more, and is refused before the cache is asked).
        options["authorize"] = AsyncInstallationStoreAuthorize(
            logger=logging.getLogger("slack_bolt.authorize"), installation_store=services.installations,
            client_id=settings.slack_client_id, client_secret=settings.slack_client_secret, bot_only=True,
            cache_enabled=True, client=client)
    app = AsyncApp(**options)

    @app.command(settings.command)
    async def on_command(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond) -> None:
        await ack()
        command = commands.Command.from_body(body, settings.command)
        await guarded(respond, lambda: commands.dispatch(services, command))

    async def on_click(ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], respond: AsyncRespond) -> None:
        await ack()
        if home.home_click(body):
            # The Home tab has no response_url: the outcome is shown on the refreshed tab instead.
            team_id = str((body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id") or "")
            user_id = str((body.get("user") or {}).get("id") or "")
            notice: str | None = None
            try:
                notice = await actions.decide(services, body, action)
            except UserError as exc:
                notice = exc.message
            except Exception:
                ref = reference_id()
                log.exception("unexpected error [ref %s]", ref)
                notice = messages.UNEXPECTED.format(ref=ref)
            await guarded(None, lambda: _publish(team_id, user_id, notice))
            return
        await guarded(respond, lambda: actions.decide(services, body, action))

    async def _publish(team_id: str, user_id: str, notice: str | None) -> None:
        await home.publish_home(services, team_id=team_id, user_id=user_id, notice=notice)

    app.action(APPROVE_ACTION)(on_click)
    app.action(SKIP_ACTION)(on_click)
    app.action(RETRY_ACTION)(on_click)

    @app.event("app_home_opened")
    async def on_home(event: dict[str, Any], body: dict[str, Any]) -> None:
        if event.get("tab", "home") != "home":
            return
        await guarded(None, lambda: _publish(body["team_id"], event["user"], None))

    @app.event("app_uninstalled")
    async def on_uninstalled(body: dict[str, Any]) -> None:
        await guarded(None, lambda: lifecycle.uninstall(services, team_id=body["team_id"], reason="app_uninstalled"))

    @app.event("tokens_revoked")
    async def on_tokens_revoked(event: dict[str, Any], body: dict[str, Any]) -> None:
        if (event.get("tokens") or {}).get("bot"):
            await guarded(None, lambda: lifecycle.uninstall(services, team_id=body["team_id"],
                                                             reason="bot token revoked"))

    for extension in EXTENSIONS:
        extension(app, services)

    @app.error
    async def on_error(error: Exception, body: dict[str, Any]) -> None:
        ref = reference_id()
        log.error("unhandled error in a Slack request [ref %s]: %r", ref, error)

    return app

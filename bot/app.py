"""`create_app(settings)` → the aiohttp Application: every door, and the engine and outbox behind them.

Nothing lives at module level: two apps in one process (the tests do it) share nothing.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp

from bot.crypto import Keyring, load_master_keys
from bot.engine.intake import Intake
from bot.engine.loader import Catalog
from bot.engine.pacing import DoorFirst
from bot.engine.runner import Runner
from bot.engine.triggers.loop import TriggerLoop
from bot.engine.triggers.poll import Poller
from bot.engine.worker import Engine
from bot.errors import ConfigError
from bot.hooks import ConnectionCache, WebhookDoor
from bot.housekeeping import Housekeeping
from bot.masking import LogMasker
from bot.metrics import CONTENT_TYPE, Metrics
from bot.services import Services
from bot.settings import Settings
from bot.slack.client import SlackApi, StaticToken, TeamPoster, TokenSource
from bot.slack.installations import EncryptedInstallationStore, InstallationTokens
from bot.slack.lifecycle import restore_single_workspace
from bot.slack.listeners import build_bolt_app
from bot.slack.notices import UndeliverableNotices
from bot.slack.outbox import Outbox
from bot.slack.people import People
from bot.slack.socket_mode import connect as socket_mode_connect
from bot.store import migrate
from bot.store.db import Database
from bot.store.inbox import Inbox
from integrations.httpclient import HttpClient

log = logging.getLogger(__name__)
_SLACK_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SLACK_SIGNATURE = re.compile(r"v0=[0-9a-f]{64}")

SERVICES = web.AppKey("services", Services)
BOLT = web.AppKey("bolt", AsyncApp)


def default_key_file(settings: Settings) -> Path:
    return Path("relaybot.key")


def process_owner(hostname: str | None = None) -> str:
    """Who holds a lease, as stored (64 characters at most): a long host name (a cloud instance's, a pod's) is
    cut, and the pid and a random part keep two processes apart."""
    host = (hostname if hostname is not None else socket.gethostname())[:40]
    return f"{host}:{os.getpid()}:{os.urandom(3).hex()}"


def build_services(settings: Settings, *, catalog: Catalog | None = None, log_masker: LogMasker | None = None,
                   key_file: Path | None = None, http: HttpClient | None = None,
                   clock: Callable[[], datetime] | None = None) -> Services:
    """Everything the doors need; nothing is started or connected yet. `clock` drives the poll and schedule
    triggers (tests pass a fake one)."""

    db = Database(settings.database_url)
    catalog = catalog if catalog is not None else Catalog.load([settings.workflows_dir])
    keyring = Keyring(load_master_keys(keys=settings.master_keys, key_file=settings.master_key_file,
                                       default_file=key_file or default_key_file(settings)))
    metrics = Metrics()
    installations: EncryptedInstallationStore | None = None
    tokens: TokenSource
    if settings.oauth_enabled:
        assert settings.slack_client_id is not None
        installations = EncryptedInstallationStore(db=db, keyring=keyring, client_id=settings.slack_client_id)
        tokens = InstallationTokens(installations)
    elif settings.slack_bot_token:
        tokens = StaticToken(settings.slack_bot_token)
    else:
        raise ConfigError("SLACK_BOT_TOKEN is required (or SLACK_CLIENT_ID and SLACK_CLIENT_SECRET for OAuth)")
    slack = SlackApi(base_url=settings.slack_api_url, tokens=tokens, metrics=metrics)
    owner = process_owner()
    lease = timedelta(seconds=settings.lease_seconds)
    log_masker = log_masker or LogMasker()
    http = http or HttpClient(allow=settings.http_allow, timeout=settings.http_timeout,
                              max_response=settings.http_max_response)
    outbox = Outbox(db=db, slack=slack, metrics=metrics, owner=owner, rate=settings.slack_channel_rate,
                    poll_interval=settings.worker_poll_interval,
                    lease=timedelta(seconds=settings.outbox_lease_seconds),
                    on_undeliverable=UndeliverableNotices(db=db, slack=slack))
    intake = Intake(db=db, catalog=catalog, metrics=metrics, outbox=outbox, command=settings.command)
    runner = Runner(db=db, catalog=catalog, keyring=keyring, http=http,
                    slack_poster=lambda team_id: TeamPoster(slack, team_id), owner=owner, lease=lease,
                    log_masker=log_masker, metrics=metrics, base_urls=settings.integration_base_urls(),
                    command=settings.command)
    door_first = DoorFirst(max_backlog=settings.max_backlog)
    engine = Engine(db=db, intake=intake, runner=runner, owner=owner, lease=lease,
                    poll_interval=settings.worker_poll_interval, concurrency=settings.run_concurrency,
                    on_work_done=outbox.wakeup, door=door_first)
    metrics.on_scrape(lambda: engine.refresh_gauges(metrics))
    services = Services(settings=settings, db=db, catalog=catalog, keyring=keyring, metrics=metrics, slack=slack,
                        people=People(slack=slack, extra_admins=settings.admins), inbox=Inbox(db), intake=intake,
                        engine=engine, outbox=outbox, log_masker=log_masker, connections=ConnectionCache(),
                        http=http, installations=installations)
    services.housekeeping = Housekeeping(db=db, owner=owner, audit_channel=settings.audit_channel,
                                         retention=timedelta(days=settings.retention_days), on_posted=outbox.wake)
    poller = Poller(db=db, keyring=keyring, http=http, inbox=services.inbox, log_masker=log_masker, owner=owner,
                    on_stored=engine.events_stored)
    # A poll holds its lease through a whole request (the HTTP timeout) with room to record the result.
    services.triggers = TriggerLoop(db=db, catalog=catalog, poller=poller, inbox=services.inbox, owner=owner,
                                    lease=timedelta(seconds=2 * settings.http_timeout + 30),
                                    interval=settings.worker_poll_interval, grace=settings.schedule_grace,
                                    now=clock or (lambda: datetime.now(UTC)), on_stored=engine.events_stored)
    return services


def create_app(settings: Settings, *, services: Services | None = None, run_workers: bool = True,
               socket_mode: bool = False) -> web.Application:
    """The HTTP server. With `socket_mode`, Slack's requests come over a WebSocket instead of /slack/events."""
    services = services or build_services(settings)
    services.log_masker.install()
    bolt = build_bolt_app(services, socket_mode=socket_mode)
    door = WebhookDoor(db=services.db, keyring=services.keyring, inbox=services.inbox, metrics=services.metrics,
                       max_body=settings.max_body, body_timeout=settings.body_timeout,
                       on_stored=services.engine.events_stored,
                       door_first=services.engine.door)
    door.cache = services.connections
    app = web.Application(client_max_size=settings.max_body + 1024 * 1024)
    app[SERVICES] = services
    app[BOLT] = bolt

    async def slack_events(request: web.Request) -> web.Response:
        # What Bolt's checks would fail on with an exception (a 500 and a log line for anyone to cause) is
        # refused here first: signature headers that cannot be Slack's, a body that is not text or not an object.
        if not _SLACK_TIMESTAMP.fullmatch(request.headers.get("X-Slack-Request-Timestamp", "")) or \
                not _SLACK_SIGNATURE.fullmatch(request.headers.get("X-Slack-Signature", "")):
            return web.json_response({"ok": False, "error": "invalid request"}, status=401)
        try:
            bolt_request = await to_bolt_request(request)
        except (UnicodeDecodeError, LookupError, ValueError, AttributeError, TypeError):
            # Bolt reads the body as it builds the request: not text, not JSON, or JSON that is not an object.
            return web.json_response({"ok": False, "error": "unreadable request body"}, status=400)
        if not isinstance(bolt_request.body, dict):
            return web.json_response({"ok": False, "error": "unreadable request body"}, status=400)
        return await to_aiohttp_response(await bolt.async_dispatch(bolt_request))

    async def healthz(request: web.Request) -> web.Response:
        try:
            await services.db.ping()
        except Exception as exc:
            return web.json_response({"ok": False, "database": f"unreachable: {type(exc).__name__}"}, status=503)
        return web.json_response({"ok": True, "database": "ok", "workflows": len(services.catalog)})

    async def metrics(request: web.Request) -> web.Response:
        body = await services.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    if not socket_mode:  # without a signing secret this door must not exist
        app.router.add_post("/slack/events", slack_events)
    oauth_flow = bolt.oauth_flow
    if oauth_flow is not None:
        async def install(request: web.Request) -> web.Response:
            return await to_aiohttp_response(await oauth_flow.handle_installation(await to_bolt_request(request)))

        async def oauth_redirect(request: web.Request) -> web.Response:
            return await to_aiohttp_response(await oauth_flow.handle_callback(await to_bolt_request(request)))

        app.router.add_get("/slack/install", install)
        app.router.add_get("/slack/oauth_redirect", oauth_redirect)
    app.router.add_post("/hooks/{connection_id}", door.handle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)

    async def lifecycle(app: web.Application) -> Any:
        await migrate.upgrade(services.db)
        if services.installations is None:
            await restore_single_workspace(services)
        socket = await socket_mode_connect(bolt, settings) if socket_mode else None
        if run_workers:
            await services.engine.start()
            await services.outbox.start()
            if services.housekeeping is not None:
                await services.housekeeping.start()
            if services.triggers is not None:
                await services.triggers.start()
        log.info("relaybot ready: %d workflows, database %s", len(services.catalog), services.db.dialect)
        yield
        if socket is not None:
            await socket.close_async()
        if run_workers:
            if services.triggers is not None:
                await services.triggers.stop()
            await services.engine.stop()
            if services.housekeeping is not None:
                await services.housekeeping.stop()
            await services.outbox.drain(timeout=3.0)
            await services.outbox.stop()
        await services.inbox.close()
        await services.http.close()
        await services.slack.close()
        await services.db.dispose()

    app.cleanup_ctx.append(lifecycle)
    return app

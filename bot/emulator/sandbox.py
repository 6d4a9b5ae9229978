"""The real bot (`create_app`) and the Slack emulator served by one loopback HTTP server.

Used by `relaybot dev` and `relaybot test`. Sharing a port changes nothing about how the two talk: the bot
calls the emulator's Web API at `SLACK_API_URL` (`<url>/api/`) and the emulator sends signed requests to
`<url>/slack/events` and `<url>/hooks/<connection>`, over HTTP, like Slack and the tools do.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from bot.app import build_services, create_app
from bot.emulator.webapi import SlackEmulator
from bot.engine.loader import Catalog
from bot.services import Services
from bot.settings import Settings
from integrations.httpclient import HttpClient

RouteAdder = Callable[[web.Application], None]


def bind_socket(host: str, port: int) -> socket.socket:
    """Bound before the settings are made, because the settings must name the port (`port` 0: any free one)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Sandbox:
    def __init__(self, *, emulator: SlackEmulator, settings_for: Callable[[str], Settings],
                 key_file: Path | None = None, http: HttpClient | None = None, catalog: Catalog | None = None,
                 routes: Sequence[RouteAdder] = (), triggers: bool = True) -> None:
        self.emulator = emulator
        self.triggers = triggers
        self.catalog = catalog
        self.settings_for = settings_for
        self.key_file = key_file
        self.http = http
        self.routes = list(routes)
        self.url = ""
        self.settings: Settings | None = None
        self.services: Services | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        sock = bind_socket(host, port)
        shown_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown_host}:{sock.getsockname()[1]}"
        try:
            self.settings = self.settings_for(self.url)
            self.services = build_services(self.settings, key_file=self.key_file, http=self.http,
                                           catalog=self.catalog)
            if not self.triggers:
                self.services.triggers = None
            app = create_app(self.settings, services=self.services)
            self.emulator.routes(app)
            for add in self.routes:
                add(app)
            self.emulator.base_url = self.url
            self.emulator.bot_url = self.url
            # A short grace for requests in flight when stopping (steps in flight have their own, in the engine).
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            raise
        return self.url

    async def stop(self) -> None:
        await self.emulator.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def settled(self) -> bool:
        """Nothing pending in the engine or the outbox."""
        assert self.services is not None
        return await self.services.engine.idle() and await self.services.outbox.idle()

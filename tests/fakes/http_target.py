"""A scriptable HTTP server on a random port: answers what a test queues, records every request."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: {"ok": True})
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class HttpTarget:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.queued: dict[str, list[Reply]] = {}
        self.default = Reply()
        self.echo = False
        self._runner: web.AppRunner | None = None
        self.url = ""

    def queue(self, path: str, *replies: Reply) -> None:
        self.queued.setdefault(path, []).extend(replies)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(method=request.method, path=request.path, headers=dict(request.headers),
                                      body=body, query=dict(request.query)))
        replies = self.queued.get(request.path)
        reply = replies.pop(0) if replies else self.default
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if self.echo:
            return web.Response(status=reply.status, body=body, content_type="text/plain")
        if isinstance(reply.body, (dict, list)):
            return web.json_response(reply.body, status=reply.status, headers=reply.headers)
        return web.Response(status=reply.status, text=str(reply.body), headers=reply.headers)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def requests_to(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

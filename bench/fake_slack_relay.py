#!/usr/bin/env python3
"""The fake Slack for relaybot benchmarks: n8n's `fake_slack.py` counters in front of relaybot's Slack emulator.

relaybot needs more of Slack than n8n's workflow does: `auth.test`, `users.info` (is the user an admin?),
`response_url` for slash-command replies, thread replies and `chat.update` for its card. So this process
serves, on one loopback port:

- `POST /api/chat.postMessage` without `thread_ts` (a run's card): counted by the harness's own
  `fake_slack.post_message` (same `/stats`, same `probe t=<epoch>` latency samples as the n8n run);
- `POST /api/chat.postMessage` with `thread_ts` (audit-thread replies) and `POST /api/chat.update` (card
  refreshes): answered `ok` at once and only counted (`replies`, `updates` in `/stats`), never stored;
- every other Web API method and `/response/<id>`: `bot.emulator.webapi.SlackEmulator` (one team, an admin
  user, one channel), so slash commands work exactly as in the test suite;
- `GET /stats`, `POST /reset`, `GET /health`: as `fake_slack.py` (plus `replies`, `updates`, `other`, `rejected`);
- `POST /bench/command` `{"text": "enable bench-pr-opened", "bot_url": "http://127.0.0.1:N"}`: sends the signed
  slash command as Slack would and answers `{"reply": …, "connection": {"url", "secret", "connection_id"}}`
  with the webhook connection the bot announced in its ephemeral reply.

On start it prints one JSON line: `{"url", "api_url", "token", "signing_secret", "team", "channel", "user"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from aiohttp import web

from bot.emulator.webapi import SlackEmulator

TEAM = "T0BENCH01"
CHANNEL = "C0BENCH01"
ADMIN = "U0BENCHAD"
TOKEN = "xoxb-bench-relaybot-0001"
SIGNING_SECRET = "bench-signing-secret"
DEFAULT_HARNESS = os.environ.get("N8N_HARNESS", "/work/shared/bench/n8n")


def load_fake_slack(harness: str) -> ModuleType:
    """The harness's fake_slack.py, imported from its directory (it is not a package)."""
    path = Path(harness) / "fake_slack.py"
    spec = importlib.util.spec_from_file_location("n8n_fake_slack", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BenchSlack:
    def __init__(self, fake: ModuleType) -> None:
        self.fake = fake
        self.emulator = SlackEmulator(signing_secret=SIGNING_SECRET)
        self.emulator.add_team(TEAM, "bench", bot_token=TOKEN)
        self.emulator.add_user(TEAM, ADMIN, "bench-admin", is_admin=True)
        self.emulator.add_channel(TEAM, CHANNEL, "bench")
        self.reset_counters()

    def reset_counters(self) -> None:
        self.replies = 0
        self.updates = 0
        self.other = 0
        self.rejected = 0

    async def api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        if method in ("chat.postMessage", "chat.update") and request.content_type == "application/json":
            raw = await request.read()  # cached: fake_slack.post_message reads it again
            try:
                args = json.loads(raw or b"{}")
            except ValueError:
                args = None
            token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if isinstance(args, dict) and token == TOKEN and args.get("channel") == CHANNEL:
                if method == "chat.update":
                    self.updates += 1
                    return web.json_response({"ok": True, "channel": CHANNEL, "ts": args.get("ts")})
                if args.get("thread_ts"):
                    self.replies += 1
                    return web.json_response({"ok": True, "channel": CHANNEL,
                                              "ts": self.fake.STATE.next_ts()})
                return await self.fake.post_message(request)  # a card: counted, probe latency recorded
            self.rejected += 1
        self.other += 1
        return await self.emulator._api(request)  # the emulator's own handler

    async def response_url(self, request: web.Request) -> web.StreamResponse:
        return await self.emulator._response_url(request)

    async def stats(self, request: web.Request) -> web.Response:
        response = await self.fake.stats(request)
        data = json.loads(response.body)  # type: ignore[arg-type]
        data.update(replies=self.replies, updates=self.updates, other=self.other, rejected=self.rejected)
        return web.json_response(data)

    async def reset(self, request: web.Request) -> web.Response:
        self.reset_counters()
        return await self.fake.reset(request)

    async def command(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.emulator.bot_url = body["bot_url"].rstrip("/")
        before = len(self.emulator.responses)
        status, text = await self.emulator.slash_command(TEAM, CHANNEL, ADMIN, body["text"])
        if status != 200:
            return web.json_response({"ok": False, "status": status, "text": text}, status=502)
        deadline = time.monotonic() + float(body.get("timeout", 20))
        while len(self.emulator.responses) <= before:
            if time.monotonic() > deadline:
                return web.json_response({"ok": False, "error": "no reply at response_url"}, status=504)
            await asyncio.sleep(0.02)
        reply = str(self.emulator.responses[before].get("text", ""))
        known = self.emulator.connections.get(TEAM, body.get("integration", "webhook"))
        return web.json_response({"ok": True, "reply": reply, "connection": asdict(known) if known else None})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/api/{method}", self.api)
        app.router.add_post("/response/{response_id}", self.response_url)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/reset", self.reset)
        app.router.add_get("/health", self.fake.health)
        app.router.add_post("/bench/command", self.command)
        return app


async def serve(host: str, port: int, harness: str) -> None:
    bench = BenchSlack(load_fake_slack(harness))
    runner = web.AppRunner(bench.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    url = f"http://{host}:{bound}"
    bench.emulator.base_url = url  # response_url and permalinks point here
    print(json.dumps({"url": url, "api_url": f"{url}/api/", "token": TOKEN, "signing_secret": SIGNING_SECRET,
                      "team": TEAM, "channel": CHANNEL, "user": ADMIN}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await bench.emulator.stop()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port (printed on start)")
    parser.add_argument("--harness", default=DEFAULT_HARNESS, help="directory of the n8n harness (fake_slack.py)")
    args = parser.parse_args()
    if not ipaddress.ip_address(args.host).is_loopback:
        sys.exit("refusing to bind a non-loopback address")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.harness))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The fake Slack for relaybot benchmarks: n8n's `fake_slack.py` counters in front of relaybot's Slack emulator.

relaybot needs more of Slack than n8n's workflow does: `auth.test`, `users.info` (is the user an admin?),
`response_url` for slash-command replies, thread replies and `chat.update` for its card. So this process
serves, on one loopback port (what each request gets; how, below):

- `POST /api/chat.postMessage` without `thread_ts` (a run's card): counted as the harness's own
  `fake_slack.post_message` counts it, in its `STATE` (same `/stats`, same `probe t=<epoch>` latency samples
  as the n8n run);
- `POST /api/chat.postMessage` with `thread_ts` (audit-thread replies) and `POST /api/chat.update` (card
  refreshes): answered `ok` at once and only counted (`replies`, `updates` in `/stats`), never stored;
- every other Web API method and `/response/<id>`: `bot.emulator.webapi.SlackEmulator` (one team, an admin
  user, one channel), so slash commands work exactly as in the test suite;
- `GET /stats`, `POST /reset`, `GET /health`: as `fake_slack.py` (plus `replies`, `updates`, `other`, `rejected`);
- `POST /bench/command` `{"text": "enable bench-pr-opened", "bot_url": "http://127.0.0.1:N"}`: sends the signed
  slash command as Slack would and answers `{"reply": …, "connection": {"url", "secret", "connection_id"}}`
  with the webhook connection the bot announced in its ephemeral reply.

Two layers. On a 2-core machine this process shares the CPU with relaybot, so its own work per message is part
of the measuring setup, not relaybot's work: served by aiohttp it cost about 145 µs of CPU per request (two or
three requests per card). So the public port is a front that answers the three hot requests above itself —
`chat.postMessage` and `chat.update`, JSON, the bench token, the bench channel, plain HTTP/1.1 — with the same
counters and the same JSON answer. Every other request (set-up, slash commands, `/stats`, a wrong token or
channel, a body that is not JSON, …) is relayed unchanged to the aiohttp application (`BenchSlack.app()`) on an
internal loopback port, which behaves exactly as this fake did with aiohttp alone. Two fronts:

- `--front c` (the default where gcc is found): `fake_slack_front.c`, compiled at start, a child process of this
  one (count both when measuring the fake's CPU). It answers a hot request in a few µs of CPU where the Python
  front takes 18-25. It keeps no counters: before it relays any request it posts what it counted since the last
  time to `POST /bench/counts` here, which adds it to `fake_slack.STATE` and `replies`/`updates`; so `/stats`
  and `/reset` (relayed) see every message answered before them.
- `--front python`: `lean_http.py`, in this process, counting into the same state directly.

On start it prints one JSON line: `{"url", "api_url", "token", "signing_secret", "team", "channel", "user"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web
from aiohttp.helpers import parse_content_type
from lean_http import Request, start_server  # next to this file, which runs as a script (bench/ on sys.path)

from bot.emulator.webapi import SlackEmulator

TEAM = "T0BENCH01"
CHANNEL = "C0BENCH01"
ADMIN = "U0BENCHAD"
TOKEN = "xoxb-bench-relaybot-0001"
SIGNING_SECRET = "bench-signing-secret"
DEFAULT_HARNESS = os.environ.get("N8N_HARNESS", "/work/shared/bench/n8n")
HOT_METHODS = {"/api/chat.postMessage": "chat.postMessage", "/api/chat.update": "chat.update"}


@functools.lru_cache(maxsize=64)
def media_type(content_type: str) -> str:
    """`request.content_type` as aiohttp computes it (the email parser: slow, hence the cache; clients send one)."""
    return parse_content_type(content_type)[0]


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

    def hot_answer(self, request: Request) -> bytes | None:
        """What `api` would answer to a card, thread reply or card update, with the same counting; None for any
        other request, which then goes to the aiohttp app and `api`. Must stay in step with `api` below."""
        method = HOT_METHODS.get(request.target)
        content_type = request.headers.get("content-type")
        if method is None or request.method != "POST" or content_type is None:
            return None
        if media_type(content_type) != "application/json":
            return None
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if token != TOKEN:
            return None
        try:
            args = json.loads(request.body or b"{}")
        except (ValueError, RecursionError):  # relayed: aiohttp answers it as before (the emulator's error, or 500)
            return None
        if not isinstance(args, dict) or args.get("channel") != CHANNEL:
            return None
        if method == "chat.update":
            self.updates += 1
            return json.dumps({"ok": True, "channel": CHANNEL, "ts": args.get("ts")}).encode()
        if args.get("thread_ts"):
            self.replies += 1
            return json.dumps({"ok": True, "channel": CHANNEL, "ts": self.fake.STATE.next_ts()}).encode()
        return self.count_card(request, args)

    def count_card(self, request: Request, args: dict[str, Any]) -> bytes:
        """`fake_slack.post_message` for a JSON body with the bench channel: it takes an aiohttp request, so its
        counting is repeated here, step for step (same `STATE`, same `PROBE_RE`, so `/stats` cannot tell)."""
        now = (time.time(), time.monotonic())
        state = self.fake.STATE
        if not request.headers.get("authorization", "").startswith("Bearer ") and "token" not in args:
            state.no_auth += 1
        self._add_cards(1, first=now, last=now)
        probe = self.fake.PROBE_RE.search(request.body)
        if probe:
            state.probe_lat.append(now[0] - float(probe.group(1)))
        return json.dumps({"ok": True, "channel": CHANNEL, "ts": state.next_ts()}).encode()

    def _add_cards(self, count: int, *, first: tuple[float, float], last: tuple[float, float]) -> None:
        """`count` cards in the bench channel into `fake_slack.STATE`, the first and the last received at these
        (wall clock, monotonic) times."""
        state = self.fake.STATE
        state.count += count
        if state.first_wall is None:
            state.first_wall, state.first_mono = first
        state.last_wall, state.last_mono = last
        state.channels[CHANNEL] = state.channels.get(CHANNEL, 0) + count

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

    async def counts(self, request: web.Request) -> web.Response:
        """What the C front answered since it last said so (lines: `cards N first_wall first_mono last_wall
        last_mono`, `replies N`, `updates N`, `probe <latency seconds>` per probe card), added to the counters as
        `count_card` adds one card."""
        for line in (await request.text()).splitlines():
            kind, *values = line.split()
            if kind == "cards" and int(values[0]):
                first_wall, first_mono, last_wall, last_mono = (float(value) for value in values[1:5])
                self._add_cards(int(values[0]), first=(first_wall, first_mono), last=(last_wall, last_mono))
            elif kind == "replies":
                self.replies += int(values[0])
            elif kind == "updates":
                self.updates += int(values[0])
            elif kind == "probe":
                self.fake.STATE.probe_lat.append(float(values[0]))
        return web.json_response({"ok": True})

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
        app.router.add_post("/bench/counts", self.counts)
        return app


def build_c_front() -> Path | None:
    """`fake_slack_front.c` compiled into a temporary directory, or None without a C compiler."""
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        return None
    binary = Path(tempfile.mkdtemp(prefix="relaybot-fake-slack-")) / "fake_slack_front"
    subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(Path(__file__).with_name("fake_slack_front.c"))],
                   check=True)
    return binary


async def start_c_front(binary: Path, port: int, internal_port: int) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        str(binary), "--port", str(port), "--upstream-port", str(internal_port), "--token", TOKEN,
        "--channel", CHANNEL, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    line = (await process.stdout.readline()).decode()
    if not line.startswith("PORT "):
        raise SystemExit(f"the C front did not start: {line!r}")
    return process, int(line.split()[1])


async def serve(host: str, port: int, harness: str, front_binary: Path | None) -> None:
    bench = BenchSlack(load_fake_slack(harness))
    runner = web.AppRunner(bench.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)  # internal: only the front below talks to it
    await site.start()
    internal = runner.addresses[0]
    c_front: asyncio.subprocess.Process | None = None
    front: asyncio.Server | None = None
    if front_binary is not None:
        if host != "127.0.0.1":
            raise SystemExit("the C front listens on 127.0.0.1 only: use --front python for another address")
        c_front, bound = await start_c_front(front_binary, port, internal[1])
        shutil.rmtree(front_binary.parent, ignore_errors=True)  # running, it needs no file
    else:
        front = await start_server(host, port, bench.hot_answer, (internal[0], internal[1]))
        bound = front.sockets[0].getsockname()[1]
    url = f"http://{host}:{bound}"
    bench.emulator.base_url = url  # response_url and permalinks point here
    print(json.dumps({"url": url, "api_url": f"{url}/api/", "token": TOKEN, "signing_secret": SIGNING_SECRET,
                      "team": TEAM, "channel": CHANNEL, "user": ADMIN}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        if front is not None:
            front.close()
        if c_front is not None and c_front.returncode is None:
            c_front.terminate()
            await c_front.wait()
        await bench.emulator.stop()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port (printed on start)")
    parser.add_argument("--harness", default=DEFAULT_HARNESS, help="directory of the n8n harness (fake_slack.py)")
    parser.add_argument("--front", choices=("auto", "c", "python"), default="auto",
                        help="the front answering the hot requests (auto: c where gcc is found, else python)")
    args = parser.parse_args()
    if not ipaddress.ip_address(args.host).is_loopback:
        sys.exit("refusing to bind a non-loopback address")
    binary = build_c_front() if args.front in ("auto", "c") else None
    if binary is None and args.front == "c":
        sys.exit("--front c needs a C compiler (gcc, or $CC)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.harness, binary))


if __name__ == "__main__":
    main()

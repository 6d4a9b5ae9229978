"""Shared fixtures: a Slack emulator, the bot on a random port, and helpers that go through the real doors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.app import build_services, create_app
from bot.emulator.webapi import Message, SlackEmulator
from bot.masking import LogMasker
from bot.services import Services
from bot.settings import Settings
from tests.fakes.github import FakeGitHub
from tests.fakes.http_target import HttpTarget

ROOT = Path(__file__).resolve().parent.parent


def _shared() -> Path:
    """The team's shared folder (SPEC.md, the corpora): next to the checkout, or where RELAYBOT_SHARED says."""
    candidates = [Path(os.environ["RELAYBOT_SHARED"])] if os.environ.get("RELAYBOT_SHARED") else []
    candidates += [ROOT.parent / "shared", Path("/work/shared")]
    for candidate in candidates:
        if (candidate / "corpora").is_dir():
            return candidate
    raise RuntimeError(f"the shared corpora are not found (looked in {', '.join(map(str, candidates))}); "
                       "set RELAYBOT_SHARED to the folder that holds SPEC.md and corpora/")


SHARED = _shared()
CORPORA = SHARED / "corpora"
TEAM = "T0ACME001"
CHANNEL = "C0DEPLOYS"
ADMIN = "U0ADMIN01"
ALICE = "U0ALICE01"
BOB = "U0BOB0001"
GUEST = "U0GUEST01"
MASTER_KEY = base64.b64encode(b"k" * 32).decode()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def write_workflow(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def github_headers(secret: str, body: bytes, *, event: str, delivery: str) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": f"sha256={digest}", "User-Agent": "GitHub-Hookshot/test"}


def connection_from(reply: str, integration: str) -> tuple[str, str]:
    """(URL, secret) of a new connection shown in an `enable` or `connect` reply."""
    block = reply.split(f"New *{integration}* connection.", 1)[1]
    return extract(r"URL: `([^`]+)`", block), extract(r"Secret: `([^`]+)`", block)


def extract(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in {text!r}"
    return match.group(1)


class Bot:
    """The bot running in this process on a random port, in front of a Slack emulator."""

    def __init__(self, *, tmp: Path, slack: SlackEmulator, workflows: Path, env: dict[str, Any],
                 database_url: str) -> None:
        self.tmp = tmp
        self.database_url = database_url
        self.socket_mode = bool(env.pop("socket_mode", False))
        self.slack = slack
        self.workflows = workflows
        self.env = env
        self.url = ""
        self.services: Services | None = None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    def settings(self, port: int) -> Settings:
        values = {
            "slack_signing_secret": self.slack.signing_secret,
            "slack_bot_token": self.slack.teams[TEAM].bot_token,
            "slack_api_url": self.slack.api_url,
            "database_url": self.database_url,
            "master_keys": [MASTER_KEY],
            "workflows_dir": self.workflows,
            "public_url": f"http://127.0.0.1:{port}",
            "admins": [],
            "http_allow": ["127.0.0.1", "localhost"],
            "slack_channel_rate": 0,
            "worker_poll_interval": 0.2,
            "lease_seconds": 5,
            "outbox_lease_seconds": 5,
        }
        values.update(self.env)
        return Settings(**values)

    async def start(self) -> Bot:
        sock = free_socket()
        port = sock.getsockname()[1]
        settings = self.settings(port)
        self.services = build_services(settings, log_masker=LogMasker())
        app = create_app(settings, services=self.services, socket_mode=self.socket_mode)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{port}"
        self.slack.bot_url = self.url
        return self

    async def stop(self) -> None:
        if self._http:
            await self._http.close()
        if self._runner:
            await self._runner.cleanup()

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    async def command(self, text: str, *, user: str = ADMIN, channel: str = CHANNEL, team: str = TEAM) -> str:
        """Send `/relay <text>` and return the ephemeral reply's text."""
        before = len(self.slack.responses)
        status, _ = await self.slack.slash_command(team, channel, user, text)
        assert status == 200
        await self.slack.wait_for(lambda: len(self.slack.responses) > before)
        return str(self.slack.responses[before]["text"])

    async def connect(self, integration: str) -> tuple[str, str]:
        reply = await self.command(f"connect {integration}")
        return extract(r"URL: `([^`]+)`", reply), extract(r"Secret: `([^`]+)`", reply)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async with self.http().post(url, data=body, headers=headers) as response:
            text = await response.text()
            return response.status, json.loads(text) if text.startswith("{") else {"text": text}

    async def github(self, url: str, secret: str, payload: dict[str, Any] | bytes, *, event: str = "pull_request",
                     delivery: str | None = None) -> tuple[int, dict[str, Any]]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        delivery = delivery or f"d-{time.time_ns()}"
        return await self.post(url, body, github_headers(secret, body, event=event, delivery=delivery))

    def cards(self, channel: str = CHANNEL) -> list[Message]:
        return self.slack.channel_messages(TEAM, channel)

    async def wait_card(self, predicate: Any = None, channel: str = CHANNEL, timeout: float = 10.0) -> Message:
        def find() -> Message | None:
            for message in self.cards(channel):
                if predicate is None or predicate(message):
                    return message
            return None

        return await self.slack.wait_for(find, timeout=timeout)

    def thread_texts(self, card: Message, channel: str = CHANNEL) -> list[str]:
        return [m.text for m in self.slack.thread(TEAM, channel, card.ts)]

    async def wait_thread(self, card: Message, needle: str, channel: str = CHANNEL, timeout: float = 10.0) -> list[str]:
        await self.slack.wait_for(lambda: any(needle in text for text in self.thread_texts(card, channel)),
                                  timeout=timeout)
        return self.thread_texts(card, channel)

    async def click(self, card: Message, action: str, *, user: str = ALICE, channel: str = CHANNEL,
                    snapshot: Message | None = None) -> str | None:
        """Click a button on the card; return the ephemeral reply's text if one came within a moment."""
        before = len(self.slack.responses)
        status, _ = await self.slack.click(TEAM, channel, user, card.ts, action, snapshot=snapshot)
        assert status == 200
        try:
            await self.slack.wait_for(lambda: len(self.slack.responses) > before, timeout=1.0)
        except TimeoutError:
            return None
        return str(self.slack.responses[before]["text"])

    async def set_secret(self, name: str, value: str, *, team: str = TEAM) -> None:
        """Store a secret as `/relay secret set` does (sealed for the workspace and the name)."""
        from datetime import UTC, datetime

        from bot.store.models import Secret

        assert self.services is not None
        async with self.services.db.write() as session:
            sealed = await self.services.keyring.seal(session, team_id=team, purpose=f"secret:{name}",
                                                      plaintext=value.encode())
            await session.merge(Secret(team_id=team, name=name, ciphertext=sealed, set_by=ADMIN, set_by_name="ada",
                                       set_at=datetime.now(UTC)))

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until the engine and the outbox have nothing left to do."""
        assert self.services is not None
        deadline = time.monotonic() + timeout
        import asyncio

        while time.monotonic() < deadline:
            if await self.services.engine.idle() and await self.services.outbox.idle():
                await asyncio.sleep(0.05)
                if await self.services.engine.idle() and await self.services.outbox.idle():
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError("the bot did not settle")


def block_texts(message: Message) -> str:
    """Everything a card says, flattened (for assertions)."""
    parts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("text"), str):
                parts.append(value["text"])
            for item in value.values():
                if isinstance(item, dict | list):
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(message.blocks or [])
    return "\n".join(parts)


def buttons(message: Message) -> list[str]:
    return [element["action_id"] for block in message.blocks or [] if block.get("type") == "actions"
            for element in block.get("elements", [])]


@pytest.fixture
async def slack() -> AsyncIterator[SlackEmulator]:
    emulator = SlackEmulator()
    emulator.add_team(TEAM, "acme")
    emulator.add_user(TEAM, ADMIN, "ada", is_admin=True)
    emulator.add_user(TEAM, ALICE, "alice")
    emulator.add_user(TEAM, BOB, "bob")
    emulator.add_user(TEAM, GUEST, "gus", is_restricted=True)
    emulator.add_usergroup(TEAM, "S0ONCALL1", "oncall", [BOB])
    emulator.add_channel(TEAM, CHANNEL, "deploys")
    emulator.add_channel(TEAM, "C0OTHER01", "other")
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
async def target() -> AsyncIterator[HttpTarget]:
    server = HttpTarget()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def github_api() -> AsyncIterator[FakeGitHub]:
    server = FakeGitHub()
    await server.start()
    yield server
    await server.stop()


POSTGRES_ADMIN_DSN = os.environ.get("RELAYBOT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


async def postgres_reachable() -> str | None:
    """None when a PostgreSQL server answers; otherwise why not."""
    import asyncpg

    try:
        connection = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"no PostgreSQL at {POSTGRES_ADMIN_DSN}: {type(exc).__name__}: {exc}"
    await connection.close()
    return None


@pytest.fixture
async def postgres_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for one test; its SQLAlchemy URL."""
    import uuid

    import asyncpg

    problem = await postgres_reachable()
    if problem:
        if os.environ.get("RELAYBOT_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL is required here (RELAYBOT_REQUIRE_POSTGRES is set) but {problem}")
        pytest.skip(problem)
    name = f"relaybot_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def database_backend(request: pytest.FixtureRequest) -> str:
    """`sqlite` unless a module parametrizes it (indirectly) with `postgresql` too."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def database_url(database_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if database_backend == "postgresql":
        return str(request.getfixturevalue("postgres_database"))
    return f"sqlite+aiosqlite:///{tmp_path / 'relaybot.db'}"


BOTH_DATABASES = pytest.mark.parametrize("database_backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def workflows(tmp_path: Path) -> Path:
    directory = tmp_path / "workflows"
    directory.mkdir()
    return directory


@pytest.fixture
async def make_bot(tmp_path: Path, slack: SlackEmulator, workflows: Path, database_url: str) -> AsyncIterator[Any]:
    bots: list[Bot] = []

    async def make(**env: Any) -> Bot:
        bot = Bot(tmp=tmp_path, slack=slack, workflows=env.pop("workflows_dir", workflows), env=env,
                  database_url=env.pop("database_url", database_url))
        bots.append(bot)
        return await bot.start()

    yield make
    for bot in bots:
        await bot.stop()

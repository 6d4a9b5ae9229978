"""Running `relaybot serve` as a real process in tests (for restarts, kill -9 and several processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bot.emulator.webapi import SlackEmulator
from tests.conftest import ADMIN, CHANNEL, MASTER_KEY, TEAM, free_socket


async def command(slack: SlackEmulator, text: str) -> str:
    """`/relay <text>` by the admin, sent to whichever process the emulator points at; the ephemeral reply."""
    before = len(slack.responses)
    await slack.slash_command(TEAM, CHANNEL, ADMIN, text)
    await slack.wait_for(lambda: len(slack.responses) > before, timeout=20)
    return str(slack.responses[before]["text"])


class ServeProcess:
    def __init__(self, *, slack: SlackEmulator, workflows: Path, database_url: str, log: Path,
                 env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.slack = slack
        self.workflows = workflows
        self.database_url = database_url
        self.log = log
        self.extra_env = env or {}
        self.args = args or []  # after `relaybot serve`, e.g. ["--workers", "2"]
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self, port: int) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("SLACK_", "RELAYBOT_"))}
        env.update({
            "SLACK_SIGNING_SECRET": self.slack.signing_secret,
            "SLACK_BOT_TOKEN": self.slack.teams[TEAM].bot_token,
            "SLACK_API_URL": self.slack.api_url,
            "RELAYBOT_DATABASE_URL": self.database_url,
            "RELAYBOT_MASTER_KEYS": MASTER_KEY,
            "RELAYBOT_WORKFLOWS_DIR": str(self.workflows),
            "RELAYBOT_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "RELAYBOT_HTTP_ALLOW": "127.0.0.1,localhost",
            "RELAYBOT_SLACK_CHANNEL_RATE": "0",
            "RELAYBOT_POLL_INTERVAL": "0.2",
            "RELAYBOT_LEASE_SECONDS": "2",
            "RELAYBOT_OUTBOX_LEASE_SECONDS": "5",
            "RELAYBOT_HOST": "127.0.0.1",
            "PORT": str(port),
        })
        env.update(self.extra_env)
        return env

    async def start(self, *, timeout: float = 30.0) -> ServeProcess:
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()
        handle = self.log.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "bot", "serve", *self.args],
                                        env=self.environment(self.port),
                                        stdout=handle, stderr=subprocess.STDOUT)
        handle.close()
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"relaybot serve exited with {self.process.returncode}:\n{self.log.read_text()}")
                try:
                    async with session.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            self.slack.bot_url = self.url
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"relaybot serve did not become healthy:\n{self.log.read_text()}")

    def kill(self) -> None:
        """`kill -9`: no shutdown, no clean-up, as a crash or an OOM kill would."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


async def post_json(url: str, body: bytes, headers: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        return response.status

"""`relaybot dev [--port N]`: the bot and a local Slack emulator with a web page, in one process.

No Slack workspace, app configuration or public URL: the page at `http://127.0.0.1:<port>/` is the Slack
client, the emulator is Slack, and the bot is the real one (`create_app`), configured here with a signing
secret and a bot token of its own, SQLite and a master key under `./.relaybot-dev/`, and the `./workflows`
catalog.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.settings import Settings

TEAM_ID = "T0DEVLOCAL"
TEAM_NAME = "devspace"


@dataclass(frozen=True)
class DevPerson:
    id: str
    name: str
    is_admin: bool = False


YOU = DevPerson("U0DEVYOU01", "you", is_admin=True)
PEOPLE = (YOU, DevPerson("U0DEVALICE", "alice"), DevPerson("U0DEVBOB01", "bob"))
ONCALL = ("S0DEVONCAL", "oncall", ["U0DEVBOB01"])
CHANNELS = (("C0DEVDEPLY", "deploys"), ("C0DEVALERT", "alerts"))


def register(sub: Any) -> None:
    parser = sub.add_parser("dev", help="try relaybot without Slack: the bot and a local Slack emulator with a web "
                                        "page")
    parser.add_argument("--port", type=int, default=0,
                        help="port of the page, the emulated Slack API and the bot (default: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--dir", type=Path, default=Path(".relaybot-dev"),
                        help="where the database, the master key and the emulator's state live "
                             "(default: ./.relaybot-dev)")
    parser.set_defaults(handler=run)


def ensure_master_key(path: Path) -> list[str]:
    """The dev folder's own key file, created quietly (0600) the first time; its keys, newest first."""
    from bot.crypto import generate_master_key_text

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(generate_master_key_text() + "\n")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def dev_settings(settings: Settings, *, url: str, directory: Path, master_keys: list[str], signing_secret: str,
                 bot_token: str) -> Settings:
    return settings.model_copy(update={
        "slack_signing_secret": signing_secret,
        "slack_bot_token": bot_token,
        "slack_api_url": f"{url}/api/",
        # Single-workspace mode with the emulator's token, whatever the shell has set for a real app.
        "slack_client_id": None, "slack_client_secret": None, "slack_app_token": None,
        "database_url": f"sqlite+aiosqlite:///{(directory / 'relaybot.db').absolute()}",
        # Read from <directory>/master.key before the event loop started.
        "master_keys": master_keys, "master_key_file": None,
        "public_url": url,
        "admins": [*settings.admins, YOU.id],
        # The emulator does not rate-limit; pacing at Slack's rate would only make the page slow.
        "slack_channel_rate": 0.0,
    })


def build_emulator(bot_token: str, signing_secret: str) -> Any:
    from bot.emulator.webapi import SlackEmulator

    emulator = SlackEmulator(signing_secret=signing_secret)
    emulator.add_team(TEAM_ID, TEAM_NAME, bot_token=bot_token)
    for person in PEOPLE:
        emulator.add_user(TEAM_ID, person.id, person.name, is_admin=person.is_admin)
    group_id, handle, members = ONCALL
    emulator.add_usergroup(TEAM_ID, group_id, handle, members)
    for channel_id, name in CHANNELS:
        emulator.add_channel(TEAM_ID, channel_id, name)
    return emulator


def load_catalog(settings: Settings) -> Any:
    from bot.engine.loader import Catalog

    if not settings.workflows_dir.is_dir():
        print(f"relaybot dev: no workflows directory at {settings.workflows_dir}; starting with an empty catalog "
              "(see docs/tutorial.md to write one)", file=sys.stderr)
        return Catalog()
    return Catalog.load([settings.workflows_dir])


@dataclass
class DevServer:
    """A running `relaybot dev`: the page, the emulated Slack and the bot at `url`."""

    url: str
    emulator: Any  # SlackEmulator
    sandbox: Any  # Sandbox
    archive: Any  # EmulatorArchive
    page: Any  # DevPage

    async def stop(self) -> None:
        self.page.close()
        await self.archive.close(self.emulator)
        await self.sandbox.stop()


async def start(settings: Settings, catalog: Any, *, directory: Path, master_keys: list[str],
                host: str = "127.0.0.1", port: int = 0) -> DevServer:
    from bot.emulator.persist import EmulatorArchive
    from bot.emulator.sandbox import Sandbox
    from bot.emulator.web import DevPage

    signing_secret = secrets.token_hex(16)
    bot_token = f"xoxb-dev-{secrets.token_hex(12)}"
    emulator = build_emulator(bot_token, signing_secret)
    archive = EmulatorArchive(directory / "slack.json")
    await archive.load_into(emulator)
    page = DevPage(emulator=emulator, command=settings.command)
    sandbox = Sandbox(emulator=emulator, catalog=catalog, routes=[page.routes],
                      settings_for=lambda url: dev_settings(settings, url=url, directory=directory,
                                                            master_keys=master_keys, signing_secret=signing_secret,
                                                            bot_token=bot_token))
    url = await sandbox.start(host, port)
    archive.keep_saved(emulator)
    return DevServer(url=url, emulator=emulator, sandbox=sandbox, archive=archive, page=page)


async def serve(args: argparse.Namespace, settings: Settings, catalog: Any, master_keys: list[str]) -> int:
    try:
        server = await start(settings, catalog, directory=args.dir, master_keys=master_keys, host=args.host,
                             port=args.port)
    except OSError as exc:
        print(f"relaybot dev: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    names = ", ".join(workflow.name for workflow in catalog) or "none yet"
    print(f"relaybot dev: open {server.url}/ in a browser\n"
          f"  a local Slack workspace '{TEAM_NAME}' where you are @{YOU.name} (admin); channels "
          + ", ".join(f"#{name}" for _, name in CHANNELS) + "\n"
          f"  workflows from {settings.workflows_dir}: {names}\n"
          f"  data in {args.dir}/ (delete it to start afresh); stop with Ctrl-C", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    # Files first, before the event loop runs: nothing below blocks it.
    args.dir.mkdir(parents=True, exist_ok=True)
    master_keys = ensure_master_key(args.dir / "master.key")
    catalog = load_catalog(settings)
    return asyncio.run(serve(args, settings, catalog, master_keys))

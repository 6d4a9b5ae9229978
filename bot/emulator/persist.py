"""The emulated Slack's conversations on disk, so `relaybot dev` restarts where it stopped.

The bot's database outlives the process; without this, a restarted emulator would have lost the cards the
bot still updates (Slack would answer `message_not_found`) and the connection secrets it read from replies.
Saved: messages and threads, ephemeral replies, Home tabs, open modals, connections seen. Not saved: users,
channels and tokens, which `relaybot dev` sets up at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bot.emulator.webapi import Message, SlackEmulator

log = logging.getLogger(__name__)
FORMAT = 2


def snapshot(emulator: SlackEmulator) -> dict[str, Any]:
    teams: dict[str, Any] = {}
    for team in emulator.teams.values():
        teams[team.id] = {
            "messages": {channel: [asdict(message) for message in messages]
                         for channel, messages in team.messages.items()},
            "ephemeral": team.ephemeral,
            "home_views": team.home_views,
            "modals": {view_id: modal for view_id, modal in team.modals.items() if modal.get("open")},
        }
    return {"format": FORMAT, "teams": teams, "connections": emulator.connections.to_data()}


def restore(emulator: SlackEmulator, data: dict[str, Any]) -> None:
    """Put saved conversations back into the workspaces set up already (others are ignored)."""
    if data.get("format") != FORMAT:
        log.warning("the saved Slack emulator state has an unknown format; starting empty")
        return
    for team_id, saved in (data.get("teams") or {}).items():
        team = emulator.teams.get(team_id)
        if team is None:
            continue
        team.messages = defaultdict(list, {channel: [Message(**message) for message in messages]
                                           for channel, messages in (saved.get("messages") or {}).items()})
        team.ephemeral = list(saved.get("ephemeral") or [])
        team.home_views = dict(saved.get("home_views") or {})
        team.modals = dict(saved.get("modals") or {})
    emulator.connections.load_data(data.get("connections") or {}, teams=set(emulator.teams))


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


class EmulatorArchive:
    """One JSON file; `keep_saved()` rewrites it shortly after each change, off the event loop."""

    def __init__(self, path: Path, *, delay: float = 0.5) -> None:
        self.path = path
        self.delay = delay
        self._task: asyncio.Task[None] | None = None

    async def load_into(self, emulator: SlackEmulator) -> bool:
        if not self.path.exists():
            return False
        try:
            text = await asyncio.to_thread(self.path.read_text, encoding="utf-8")
            restore(emulator, json.loads(text))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("could not read the saved Slack emulator state %s (%s); starting empty", self.path, exc)
            return False
        return True

    async def save(self, emulator: SlackEmulator) -> None:
        text = json.dumps(snapshot(emulator), separators=(",", ":"))
        await asyncio.to_thread(_write_atomically, self.path, text)

    def keep_saved(self, emulator: SlackEmulator) -> None:
        self._task = asyncio.create_task(self._loop(emulator), name="emulator-archive")

    async def _loop(self, emulator: SlackEmulator) -> None:
        saved = emulator.version
        while True:
            await emulator.wait_version(saved, timeout=60)
            if emulator.version == saved:
                continue
            await asyncio.sleep(self.delay)  # one write for a burst of changes
            saved = emulator.version
            try:
                await self.save(emulator)
            except OSError as exc:
                log.warning("could not save the Slack emulator state to %s: %s", self.path, exc)

    async def close(self, emulator: SlackEmulator) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.save(emulator)

"""Who someone is in Slack: admins, approvers, guests — asked of Slack, cached briefly.

A lookup that fails denies (an approver check never passes because Slack could not answer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from slack_sdk.errors import SlackApiError

from bot.engine.workflow import Approvers
from bot.slack.client import NoToken, SlackApi

USER_TTL = 60.0
GROUP_TTL = 60.0
CHANNELS_TTL = 60.0
CHANNEL_PAGES = 20  # of 1,000 channels each


class LookupFailed(Exception):
    pass


@dataclass
class Person:
    id: str
    name: str | None
    is_admin: bool
    is_bot: bool
    is_guest: bool
    deleted: bool


class _TTLCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._data: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> Any:
        entry = self._data.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def forget(self, team_id: str) -> None:
        for key in [key for key in self._data if isinstance(key, tuple) and key and key[0] == team_id]:
            del self._data[key]

    def put(self, key: Any, value: Any) -> None:
        if len(self._data) > 10_000:
            self._data.clear()
        self._data[key] = (time.monotonic() + self.ttl, value)


class People:
    def __init__(self, *, slack: SlackApi, extra_admins: list[str]) -> None:
        self.slack = slack
        self.extra_admins = set(extra_admins)
        self._users = _TTLCache(USER_TTL)
        self._groups = _TTLCache(GROUP_TTL)
        self._channels = _TTLCache(CHANNELS_TTL)

    async def _call(self, team_id: str, method: str, **arguments: Any) -> dict[str, Any]:
        try:
            return await self.slack.call(team_id, method, **arguments)
        except SlackApiError as exc:
            raise LookupFailed(f"{method}: {exc.response.get('error', 'error')}") from None
        except NoToken as exc:
            raise LookupFailed(str(exc)) from None
        except Exception as exc:
            raise LookupFailed(f"{method}: {type(exc).__name__}") from None

    async def person(self, team_id: str, user_id: str, *, fresh: bool = False) -> Person:
        cached = None if fresh else self._users.get((team_id, user_id))
        if cached is not None:
            return cached
        data = (await self._call(team_id, "users.info", user=user_id)).get("user") or {}
        profile = data.get("profile") or {}
        person = Person(
            id=user_id,
            name=profile.get("display_name") or data.get("real_name") or data.get("name"),
            is_admin=bool(data.get("is_admin") or data.get("is_owner") or data.get("is_primary_owner")),
            is_bot=bool(data.get("is_bot")) or user_id == "USLACKBOT",
            is_guest=bool(data.get("is_restricted") or data.get("is_ultra_restricted")),
            deleted=bool(data.get("deleted")),
        )
        self._users.put((team_id, user_id), person)
        return person

    async def is_admin(self, team_id: str, user_id: str) -> bool:
        if user_id in self.extra_admins:
            return True
        try:
            person = await self.person(team_id, user_id)
        except LookupFailed:
            return False
        return person.is_admin and not person.deleted

    async def _group_id(self, team_id: str, group: str) -> str | None:
        if group.startswith("S") and group[1:].isalnum() and group.upper() == group:
            return group
        handle = group.lstrip("@").lower()
        cached = self._groups.get((team_id, "handles"))
        if cached is None:
            data = await self._call(team_id, "usergroups.list")
            cached = {str(item.get("handle", "")).lower(): item["id"] for item in data.get("usergroups", [])}
            self._groups.put((team_id, "handles"), cached)
        return cached.get(handle)

    async def group_members(self, team_id: str, group: str, *, fresh: bool = False) -> set[str]:
        group_id = await self._group_id(team_id, group)
        if group_id is None:
            return set()
        cached = None if fresh else self._groups.get((team_id, group_id))
        if cached is not None:
            return cached
        data = await self._call(team_id, "usergroups.users.list", usergroup=group_id)
        members = set(data.get("users") or [])
        self._groups.put((team_id, group_id), members)
        return members

    async def channels_of(self, team_id: str, user_id: str, *, fresh: bool = False) -> set[str]:
        """The public and private channels the user is in (a bot is told of a private channel only where it is a
        member too, which is everywhere it posts cards)."""
        cached = None if fresh else self._channels.get((team_id, user_id))
        if cached is not None:
            return cached
        channels: set[str] = set()
        cursor: str | None = None
        for _page in range(CHANNEL_PAGES):
            data = await self._call(team_id, "users.conversations", user=user_id,
                                    types="public_channel,private_channel", exclude_archived=True, limit=1000,
                                    cursor=cursor)
            channels.update(str(channel["id"]) for channel in data.get("channels") or [] if channel.get("id"))
            cursor = (data.get("response_metadata") or {}).get("next_cursor") or None
            if cursor is None:
                break
        self._channels.put((team_id, user_id), channels)
        return channels

    async def in_channel(self, team_id: str, user_id: str, channel_id: str, *, fresh: bool = False) -> bool:
        """Is the user in the channel? Never in a direct message: relaybot cannot see who is in one (it was taken
        for a conversation everyone is in, so a workflow enabled in a DM was open to the whole workspace)."""
        if channel_id[:1] not in ("C", "G"):
            return False
        return channel_id in await self.channels_of(team_id, user_id, fresh=fresh)

    def forget(self, team_id: str) -> None:
        self._users.forget(team_id)
        self._groups.forget(team_id)
        self._channels.forget(team_id)

    async def may_approve(self, team_id: str, user_id: str, approvers: Approvers | None,
                          started_by: str | None, *, channel_id: str, fresh: bool = True) -> str | None:
        """None if the user may decide a step of a run in `channel_id`; otherwise the reason they may not (for
        the ephemeral reply). Without named approvers, anyone in the channel may: the App Home tab offers the
        buttons outside the channel, where someone not in a private channel could otherwise decide its steps.

        A click re-checks with Slack (`fresh`); the Home tab's list may use what was looked up a minute ago.
        """
        from bot.slack import messages

        person = await self.person(team_id, user_id, fresh=fresh)
        if person.is_bot or person.is_guest or person.deleted:
            return messages.CLICK_NOT_ALLOWED_KIND
        if approvers is not None and not approvers.allow_self and started_by and started_by == user_id:
            return messages.CLICK_SELF
        if approvers is None or approvers.anyone:
            if not await self.in_channel(team_id, user_id, channel_id, fresh=fresh):
                return messages.CLICK_NOT_IN_CHANNEL.format(channel=channel_id)
            return None
        if user_id in approvers.users:
            return None
        for group in approvers.groups:
            if user_id in await self.group_members(team_id, group, fresh=fresh):
                return None
        return messages.CLICK_NOT_APPROVER

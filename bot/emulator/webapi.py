"""A Slack-compatible Web API on a local port: the methods relaybot calls, with Slack's answers and errors.

It keeps workspaces, users, user groups, channels, messages, threads, ephemeral replies and views (modals with
their stack, Home tabs), records every call, and can be told to fail (429 with Retry-After, 5xx, an error
name). It talks to the bot only as Slack does: the bot calls its Web API, and it sends the bot signed requests
at `/slack/events` (`slash_command`, `click`, `submit_view`, `close_view`, `open_home`, `send_event`). It
also plays the tools: `deliver_webhook` signs an event as GitHub, GitLab, PagerDuty, Alertmanager or a
Standard Webhooks sender would and POSTs it to the connection URL read from the bot's replies
(`bot.emulator.connections`). `relaybot dev` serves a web page on top of it (`bot.emulator.web`); the tests
use it as their fake Slack.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
from aiohttp import web

from bot.emulator import senders
from bot.emulator.connections import ConnectionBook


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    token: str | None
    team_id: str | None
    status: int
    response: dict[str, Any]
    at: float


@dataclass
class User:
    id: str
    name: str
    team_id: str
    is_admin: bool = False
    is_owner: bool = False
    is_bot: bool = False
    is_restricted: bool = False
    is_ultra_restricted: bool = False
    deleted: bool = False

    def to_api(self) -> dict[str, Any]:
        return {"id": self.id, "team_id": self.team_id, "name": self.name, "real_name": self.name,
                "deleted": self.deleted, "is_admin": self.is_admin, "is_owner": self.is_owner,
                "is_primary_owner": self.is_owner, "is_bot": self.is_bot, "is_restricted": self.is_restricted,
                "is_ultra_restricted": self.is_ultra_restricted,
                "profile": {"display_name": self.name, "real_name": self.name}}


@dataclass
class Message:
    ts: str
    channel: str
    text: str
    blocks: list[dict[str, Any]] | None
    thread_ts: str | None
    user: str
    edited: int = 0
    metadata: dict[str, Any] | None = None

    def to_api(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": "message", "ts": self.ts, "text": self.text, "user": self.user}
        if self.blocks is not None:
            data["blocks"] = self.blocks
        if self.thread_ts:
            data["thread_ts"] = self.thread_ts
        return data


@dataclass
class Team:
    id: str
    name: str
    bot_token: str
    bot_user_id: str
    users: dict[str, User] = field(default_factory=dict)
    usergroups: dict[str, dict[str, Any]] = field(default_factory=dict)
    channels: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, list[Message]] = field(default_factory=lambda: defaultdict(list))
    ephemeral: list[dict[str, Any]] = field(default_factory=list)
    home_views: dict[str, dict[str, Any]] = field(default_factory=dict)
    modals: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Failure:
    status: int = 200
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    remaining: int = 1
    until: float | None = None  # time.monotonic(): fail every call until then, however many
    carried_out: bool = False  # the call is carried out all the same (a 5xx from a proxy after Slack posted)


def sign(signing_secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(timestamp if timestamp is not None else int(time.time()))
    base = b"v0:" + stamp.encode() + b":" + body
    signature = "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature}


class SlackEmulator:
    def __init__(self, *, signing_secret: str = "emulator-signing-secret") -> None:  # noqa: S107 (a fake's default)
        self.signing_secret = signing_secret
        self.teams: dict[str, Team] = {}
        self.calls: list[Call] = []
        self.responses: list[dict[str, Any]] = []  # what arrived at response_url
        self.failures: dict[str, list[Failure]] = defaultdict(list)
        self.slow_answers: dict[str, list[float]] = defaultdict(list)
        self.bot_url: str | None = None
        self.base_url = ""
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._ts = itertools.count(1)
        self._response_urls: dict[str, tuple[str, str, str]] = {}  # id -> (team, channel, user)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.changed = asyncio.Event()
        # A counter bumped on every change, and the long-polls waiting for the next one (the dev page).
        self.version = 0
        self._version_waiters: list[asyncio.Future[int]] = []
        # trigger_id → (team, user, channel): who a views.open answers, as in Slack.
        self._triggers: dict[str, tuple[str, str, str | None]] = {}
        # The tools' side: connection URLs and secrets read from the bot's replies, as a person would.
        self.connections = ConnectionBook()
        # Socket Mode: the app-level token, the bot's open sockets, and the envelopes waiting for their ack.
        self.app_token = "xapp-1-A0RELAYBOT-emulator"
        self.socket_mode = False
        self._sockets: list[web.WebSocketResponse] = []
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.socket_connected = asyncio.Event()

    # ------------------------------------------------------------------------------------------ set-up

    def add_team(self, team_id: str, name: str | None = None, *, bot_token: str | None = None) -> Team:
        team = Team(id=team_id, name=name or team_id.lower(),
                    bot_token=bot_token or f"xoxb-{team_id}-{secrets.token_hex(6)}",
                    bot_user_id=f"UB{team_id[1:]}"[:11])
        self.teams[team_id] = team
        return team

    def add_user(self, team_id: str, user_id: str, name: str, **flags: bool) -> User:
        user = User(id=user_id, name=name, team_id=team_id, **flags)
        self.teams[team_id].users[user_id] = user
        return user

    def add_usergroup(self, team_id: str, group_id: str, handle: str, members: list[str]) -> None:
        self.teams[team_id].usergroups[group_id] = {"id": group_id, "handle": handle, "name": handle,
                                                    "users": list(members)}

    def add_channel(self, team_id: str, channel_id: str, name: str, *, bot_member: bool = True,
                    private: bool = False, members: Iterable[str] | None = None) -> None:
        """A channel; its people are `members`, or everyone in the workspace when not given."""
        self.teams[team_id].channels[channel_id] = {"id": channel_id, "name": name, "is_member": bot_member,
                                                    "is_private": private,
                                                    "members": None if members is None else set(members)}

    def fail(self, method: str, *, status: int = 200, error: str | None = None,
             headers: dict[str, str] | None = None, times: int = 1, carried_out: bool = False) -> None:
        """Make the next `times` calls of `method` fail (status 429/5xx, or `ok: false` with `error`);
        `carried_out`: each is done all the same, only its answer is the failure."""
        self.failures[method].append(Failure(status=status, error=error, headers=headers or {}, remaining=times,
                                             carried_out=carried_out))

    def fail_for(self, method: str, *, seconds: float, statuses: tuple[int, ...] = (429, 500),
                 retry_after: str = "1") -> None:
        """Make every call of `method` fail for `seconds` (an outage), cycling through `statuses`."""
        until = time.monotonic() + seconds
        for status in statuses:
            headers = {"retry-after": retry_after} if status == 429 else {}  # as Slack spells it
            self.failures[method].append(Failure(status=status, headers=headers, until=until))

    def answer_slowly(self, method: str, *, seconds: float, times: int = 1) -> None:
        """Carry out the next `times` calls of `method` at once but answer each only after `seconds`, as Slack
        does when the network is slow: the message is posted while its sender still waits."""
        self.slow_answers[method].extend([seconds] * times)

    # ------------------------------------------------------------------------------------------ server

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/{method}", self._api)
        app.router.add_post("/response/{response_id}", self._response_url)
        app.router.add_get("/socket-mode/link", self._socket_link)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound}"
        return self.base_url

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/"

    async def stop(self) -> None:
        for socket in list(self._sockets):
            await socket.close()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _team_for_token(self, token: str | None) -> Team | None:
        for team in self.teams.values():
            if token == team.bot_token:
                return team
        return None

    async def _args(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if request.content_type == "application/json":
            return json.loads(raw or b"{}")
        args: dict[str, Any] = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        args.update(request.query)
        for key in ("blocks", "view", "metadata"):
            if isinstance(args.get(key), str):
                with contextlib.suppress(ValueError):
                    args[key] = json.loads(args[key])
        return args

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await self._args(request)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() or args.get("token")
        team = self._team_for_token(token)
        status, headers, payload = 200, {}, None
        queue = self.failures.get(method)
        while queue and queue[0].until is not None and queue[0].until <= time.monotonic():
            queue.pop(0)  # an outage that is over
        if queue:
            failure = queue[0]
            if failure.until is None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    queue.pop(0)
            else:
                queue.append(queue.pop(0))  # an outage: the next call fails with the next status
            status, headers = failure.status, failure.headers
            payload = {"ok": False, "error": failure.error or ("ratelimited" if status == 429 else "internal_error")}
            handler = getattr(self, "_m_" + method.replace(".", "_"), None)
            if failure.carried_out and team is not None and handler is not None:
                handler(team, args)
        elif method == "oauth.v2.access":
            payload = self._oauth_access(args)
        elif method == "apps.connections.open":
            ws_url = self.base_url.replace("http://", "ws://", 1) + "/socket-mode/link"
            payload = ({"ok": True, "url": ws_url} if token == self.app_token
                       else {"ok": False, "error": "invalid_auth"})
        elif team is None:
            payload = {"ok": False, "error": "invalid_auth" if token else "not_authed"}
        else:
            handler = getattr(self, "_m_" + method.replace(".", "_"), None)
            payload = handler(team, args) if handler else {"ok": False, "error": "unknown_method"}
        self.calls.append(Call(method=method, args=args, token=token, team_id=team.id if team else None,
                               status=status, response=payload, at=time.time()))
        self._notify(method, args)
        if self.slow_answers.get(method):
            await asyncio.sleep(self.slow_answers[method].pop(0))
        return web.json_response(payload, status=status, headers=headers)

    def _notify(self, method: str, args: dict[str, Any]) -> None:
        self.changed.set()
        self.version += 1
        waiters, self._version_waiters = self._version_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(self.version)
        for listener in self.listeners:
            listener(method, args)

    def touch(self, what: str, details: dict[str, Any] | None = None) -> None:
        """Something outside the Web API changed what a client shows (the dev page's activity log)."""
        self._notify(what, details or {})

    async def wait_version(self, since: int, timeout: float) -> int:
        """Return the version once it is past `since`, or the current one after `timeout` (a long-poll)."""
        if self.version != since:
            return self.version
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._version_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            return self.version
        finally:
            if waiter in self._version_waiters:
                self._version_waiters.remove(waiter)

    def _next_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts):06d}"

    # ------------------------------------------------------------------------------------------ methods

    def _m_auth_test(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": f"https://{team.name}.slack.com/", "team": team.name, "user": "relaybot",
                "team_id": team.id, "user_id": team.bot_user_id, "bot_id": "B" + team.bot_user_id[2:]}

    def _channel_error(self, team: Team, channel: str | None) -> str | None:
        if not channel:
            return "channel_not_found"
        if channel in team.users:
            return None  # a user id: the app's direct message with that user
        info = team.channels.get(channel)
        if info is None:
            return "channel_not_found"
        if not info.get("is_member", True):
            return "not_in_channel"
        return None

    def _m_chat_postMessage(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        channel = str(args.get("channel") or "")
        error = self._channel_error(team, channel)
        if error:
            return {"ok": False, "error": error}
        if not args.get("text") and not args.get("blocks"):
            return {"ok": False, "error": "no_text"}
        message = Message(ts=self._next_ts(), channel=channel, text=args.get("text", ""), blocks=args.get("blocks"),
                          thread_ts=args.get("thread_ts"), user=team.bot_user_id, metadata=args.get("metadata"))
        team.messages[channel].append(message)
        return {"ok": True, "channel": channel, "ts": message.ts, "message": message.to_api()}

    def _m_chat_update(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = args.get("channel"), args.get("ts")
        message = self.message(team.id, channel or "", ts or "")
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if "text" in args:
            message.text = args["text"]
        if "blocks" in args:
            message.blocks = args["blocks"]
        message.edited += 1
        return {"ok": True, "channel": channel, "ts": ts, "text": message.text}

    def _m_chat_postEphemeral(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        error = self._channel_error(team, args.get("channel"))
        if error:
            return {"ok": False, "error": error}
        ts = self._next_ts()
        team.ephemeral.append({"channel": args.get("channel"), "user": args.get("user"), "text": args.get("text"),
                               "blocks": args.get("blocks"), "ts": ts})
        self.connections.learn(team.id, args.get("text"))
        return {"ok": True, "message_ts": ts}

    def _m_chat_getPermalink(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "permalink": f"{self.base_url}/archives/{args.get('channel')}/p{args.get('message_ts')}"}

    def _m_users_info(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        user = team.users.get(args.get("user", ""))
        if user is None:
            return {"ok": False, "error": "user_not_found"}
        return {"ok": True, "user": user.to_api()}

    def _m_usergroups_list(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        groups = [{key: value for key, value in group.items() if key != "users"} for group in team.usergroups.values()]
        return {"ok": True, "usergroups": groups}

    def _m_usergroups_users_list(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        group = team.usergroups.get(args.get("usergroup", ""))
        if group is None:
            return {"ok": False, "error": "no_such_subteam"}
        return {"ok": True, "users": list(group["users"])}

    @staticmethod
    def _channel_api(info: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in info.items() if key != "members"}

    def _m_conversations_info(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        info = team.channels.get(args.get("channel", ""))
        if info is None:
            return {"ok": False, "error": "channel_not_found"}
        return {"ok": True, "channel": self._channel_api(info)}

    def _m_users_conversations(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        """As Slack answers a bot token: the user's public channels, and private ones the bot is in too."""
        user = args.get("user", "")
        if user not in team.users:
            return {"ok": False, "error": "user_not_found"}
        types = set(str(args.get("types") or "public_channel").split(","))
        found = [self._channel_api(info) for info in team.channels.values()
                 if (info["members"] is None or user in info["members"])
                 and ("private_channel" if info.get("is_private") else "public_channel") in types
                 and (not info.get("is_private") or info.get("is_member", True))]
        start, limit = int(args.get("cursor") or 0), min(int(args.get("limit", 100)), 1000)
        more = start + limit < len(found)
        return {"ok": True, "channels": found[start:start + limit],
                "response_metadata": {"next_cursor": str(start + limit) if more else ""}}

    def _m_conversations_join(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        info = team.channels.get(args.get("channel", ""))
        if info is None:
            return {"ok": False, "error": "channel_not_found"}
        info["is_member"] = True
        return {"ok": True, "channel": self._channel_api(info)}

    def _m_conversations_history(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        channel = args.get("channel", "")
        oldest = float(args.get("oldest") or 0)
        messages = [m.to_api() | ({"metadata": m.metadata} if m.metadata else {})
                    for m in reversed(team.messages.get(channel, [])) if not m.thread_ts and float(m.ts) >= oldest]
        start, limit = int(args.get("cursor") or 0), int(args.get("limit", 100))
        more = start + limit < len(messages)
        return {"ok": True, "messages": messages[start:start + limit], "has_more": more,
                "response_metadata": {"next_cursor": str(start + limit) if more else ""}}

    def _m_conversations_replies(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = args.get("channel", ""), args.get("ts", "")
        parent = self.message(team.id, channel, ts)
        if parent is None:
            return {"ok": False, "error": "thread_not_found"}
        replies = [m.to_api() | ({"metadata": m.metadata} if m.metadata else {})
                   for m in team.messages.get(channel, []) if m.thread_ts == ts]
        return {"ok": True, "messages": [parent.to_api(), *replies][: int(args.get("limit", 1000))],
                "has_more": False}

    def _new_view(self, team: Team, view: dict[str, Any], *, root_view_id: str | None = None,
                  previous_view_id: str | None = None, view_id: str | None = None) -> dict[str, Any]:
        """A view as Slack stores it: ids filled in, every block and input element with a block/action id."""
        view = json.loads(json.dumps(view))
        view_id = view_id or "V" + secrets.token_hex(5).upper()
        for index, block in enumerate(view.get("blocks") or []):
            block.setdefault("block_id", f"b{index}{secrets.token_hex(2)}")
            element = block.get("element")
            if isinstance(element, dict):
                element.setdefault("action_id", f"a{index}{secrets.token_hex(2)}")
        view.update({"id": view_id, "team_id": team.id, "app_id": "A0RELAYBOT", "bot_id": "B" + team.bot_user_id[2:],
                     "hash": f"{int(time.time())}.{secrets.token_hex(4)}", "root_view_id": root_view_id or view_id,
                     "previous_view_id": previous_view_id, "private_metadata": view.get("private_metadata", ""),
                     "callback_id": view.get("callback_id", ""), "external_id": view.get("external_id", ""),
                     "state": {"values": {}}})
        return view

    def _m_views_open(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        # Slack would refuse an unknown or expired trigger_id; the fake stays lenient for the tests' sake.
        trigger = self._triggers.get(args.get("trigger_id") or "")
        view = self._new_view(team, dict(args.get("view") or {}))
        team.modals[view["id"]] = {"view": view, "trigger_id": args.get("trigger_id"), "open": True,
                                   "user": trigger[1] if trigger else None, "errors": {}}
        return {"ok": True, "view": view}

    def _m_views_push(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        trigger = self._triggers.get(args.get("trigger_id") or "")
        if trigger is None:
            return {"ok": False, "error": "invalid_trigger_id"}
        below = self.open_modal(team.id, trigger[1])
        view = self._new_view(team, dict(args.get("view") or {}),
                              root_view_id=below["view"]["root_view_id"] if below else None,
                              previous_view_id=below["view"]["id"] if below else None)
        team.modals[view["id"]] = {"view": view, "trigger_id": args.get("trigger_id"), "open": True,
                                   "user": trigger[1], "errors": {}}
        return {"ok": True, "view": view}

    def _m_views_update(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        view_id = args.get("view_id", "")
        if not view_id and args.get("external_id"):
            view_id = next((key for key, modal in team.modals.items()
                            if modal["view"].get("external_id") == args["external_id"]), "")
        if view_id not in team.modals:
            return {"ok": False, "error": "not_found"}
        old = team.modals[view_id]["view"]
        team.modals[view_id]["view"] = self._new_view(team, dict(args.get("view") or {}), view_id=view_id,
                                                      root_view_id=old.get("root_view_id"),
                                                      previous_view_id=old.get("previous_view_id"))
        team.modals[view_id]["errors"] = {}
        return {"ok": True, "view": team.modals[view_id]["view"]}

    def _m_views_publish(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        user_id = args.get("user_id", "")
        team.home_views[user_id] = dict(args.get("view") or {})
        return {"ok": True, "view": team.home_views[user_id]}

    def _oauth_access(self, args: dict[str, Any]) -> dict[str, Any]:
        code = args.get("code", "")
        for team in self.teams.values():
            if code == f"code-{team.id}":
                return {"ok": True, "access_token": team.bot_token, "token_type": "bot", "scope": "commands,chat:write",
                        "bot_user_id": team.bot_user_id, "app_id": "A0RELAYBOT",
                        "team": {"id": team.id, "name": team.name}, "enterprise": None,
                        "authed_user": {"id": next(iter(team.users), "U0")}, "is_enterprise_install": False}
        return {"ok": False, "error": "invalid_code"}

    async def _response_url(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        target = self._response_urls.get(response_id)
        if target is None:
            return web.Response(status=404, text="expired_url")
        payload = await request.json()
        team_id, channel, user = target
        record = {"team": team_id, "channel": channel, "user": user, **payload}
        self.responses.append(record)
        team = self.teams[team_id]
        if payload.get("response_type") == "in_channel":
            team.messages[channel].append(Message(ts=self._next_ts(), channel=channel, text=payload.get("text", ""),
                                                  blocks=payload.get("blocks"), thread_ts=None, user=team.bot_user_id))
        else:
            team.ephemeral.append({"channel": channel, "user": user, "text": payload.get("text"),
                                   "blocks": payload.get("blocks"), "ts": self._next_ts()})
        self.connections.learn(team_id, payload.get("text"))
        self._notify("response_url", record)
        return web.Response(text="ok")

    # ------------------------------------------------------------------------------------------ reading

    def message(self, team_id: str, channel: str, ts: str) -> Message | None:
        for message in self.teams[team_id].messages.get(channel, []):
            if message.ts == ts:
                return message
        return None

    def channel_messages(self, team_id: str, channel: str) -> list[Message]:
        return [m for m in self.teams[team_id].messages.get(channel, []) if not m.thread_ts]

    def thread(self, team_id: str, channel: str, ts: str) -> list[Message]:
        return [m for m in self.teams[team_id].messages.get(channel, []) if m.thread_ts == ts]

    def calls_of(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until `predicate()` returns something truthy (re-checked after every call)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the Slack emulator did not see what was expected in time")
            self.changed.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.05)):
                    await self.changed.wait()
            except TimeoutError:
                pass

    # ------------------------------------------------------------------------------------------ to the bot

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _new_response_url(self, team_id: str, channel: str, user: str) -> str:
        response_id = secrets.token_hex(8)
        self._response_urls[response_id] = (team_id, channel, user)
        return f"{self.base_url}/response/{response_id}"

    def _new_trigger_id(self, team_id: str, user: str, channel: str | None) -> str:
        trigger_id = f"{int(time.time())}.{secrets.randbelow(10**9)}.{secrets.token_hex(16)}"
        self._triggers[trigger_id] = (team_id, user, channel)
        return trigger_id

    async def _socket_link(self, request: web.Request) -> web.WebSocketResponse:
        """The Socket Mode connection: a hello, then envelopes out and acks back."""
        socket = web.WebSocketResponse(autoping=True)
        await socket.prepare(request)
        self._sockets.append(socket)
        await socket.send_json({"type": "hello", "num_connections": len(self._sockets),
                                "connection_info": {"app_id": "A0RELAYBOT"},
                                "debug_info": {"host": "emulator", "approximate_connection_time": 3600}})
        self.socket_connected.set()
        try:
            async for message in socket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                waiter = self._acks.pop(str(data.get("envelope_id")), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(data)
        finally:
            self._sockets.remove(socket)
            if not self._sockets:
                self.socket_connected.clear()
        return socket

    async def send_over_socket(self, envelope_type: str, payload: dict[str, Any], timeout: float = 10.0
                               ) -> dict[str, Any]:
        """Send one envelope to the bot's Socket Mode connection and wait for its ack."""
        await asyncio.wait_for(self.socket_connected.wait(), timeout)
        envelope_id = secrets.token_hex(8)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[envelope_id] = waiter
        await self._sockets[-1].send_json({"envelope_id": envelope_id, "type": envelope_type, "payload": payload,
                                           "accepts_response_payload": envelope_type != "events_api",
                                           "retry_attempt": 0, "retry_reason": ""})
        return await asyncio.wait_for(waiter, timeout)

    async def _send_socket(self, body: bytes, content_type: str) -> tuple[int, str]:
        """What Slack sends over Socket Mode instead of an HTTP request: the same data, in an envelope."""
        if content_type == "application/json":
            ack = await self.send_over_socket("events_api", json.loads(body))
        else:
            form = dict(parse_qsl(body.decode(), keep_blank_values=True))
            if "payload" in form:
                ack = await self.send_over_socket("interactive", json.loads(form["payload"]))
            else:
                ack = await self.send_over_socket("slash_commands", form)
        return 200, json.dumps(ack.get("payload") or {})

    async def send_to_bot(self, body: bytes, content_type: str, *, headers: dict[str, str] | None = None,
                          signing_secret: str | None = None, timestamp: int | None = None) -> tuple[int, str]:
        if self.socket_mode:
            return await self._send_socket(body, content_type)
        assert self.bot_url, "set emulator.bot_url to the bot's base URL first"
        signed = sign(signing_secret or self.signing_secret, body, timestamp)
        async with self._http().post(f"{self.bot_url}/slack/events", data=body,
                                     headers={"Content-Type": content_type, **signed, **(headers or {})}) as response:
            return response.status, await response.text()

    async def slash_command(self, team_id: str, channel: str, user: str, text: str, *, command: str = "/relay",
                            **send: Any) -> tuple[int, str]:
        team = self.teams[team_id]
        person = team.users.get(user)
        form = {
            "token": "legacy-verification-token", "team_id": team_id, "team_domain": team.name,
            "channel_id": channel, "channel_name": team.channels.get(channel, {}).get("name", channel),
            "user_id": user, "user_name": person.name if person else user, "command": command, "text": text,
            "api_app_id": "A0RELAYBOT", "is_enterprise_install": "false",
            "response_url": self._new_response_url(team_id, channel, user),
            "trigger_id": self._new_trigger_id(team_id, user, channel),
        }
        return await self.send_to_bot(urlencode(form).encode(), "application/x-www-form-urlencoded", **send)

    def block_actions_payload(self, team_id: str, channel: str, user: str, message_ts: str, action_id: str,
                              *, snapshot: Message | None = None) -> dict[str, Any]:
        """The payload Slack sends for a button click; `snapshot` is the message as a (stale) client shows it."""
        team = self.teams[team_id]
        message = snapshot or self.message(team_id, channel, message_ts)
        if message is None:
            raise KeyError(f"no message {message_ts} in {channel}")
        for block in message.blocks or []:
            for element in block.get("elements", []) if block.get("type") == "actions" else []:
                if element.get("action_id") == action_id:
                    person = team.users.get(user)
                    return {
                        "type": "block_actions", "team": {"id": team_id, "domain": team.name},
                        "user": {"id": user, "username": person.name if person else user,
                                 "name": person.name if person else user, "team_id": team_id},
                        "api_app_id": "A0RELAYBOT", "token": "legacy-verification-token",
                        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel,
                                      "is_ephemeral": False},
                        "trigger_id": self._new_trigger_id(team_id, user, channel),
                        "channel": {"id": channel, "name": team.channels.get(channel, {}).get("name", channel)},
                        "message": message.to_api(),
                        "response_url": self._new_response_url(team_id, channel, user),
                        "actions": [{"type": "button", "action_id": action_id, "block_id": block.get("block_id"),
                                     "text": element.get("text"), "value": element.get("value"),
                                     "action_ts": f"{time.time():.6f}"}],
                    }
        raise KeyError(f"message {message_ts} has no button {action_id!r}")

    async def click(self, team_id: str, channel: str, user: str, message_ts: str, action_id: str,
                    *, snapshot: Message | None = None, **send: Any) -> tuple[int, str]:
        payload = self.block_actions_payload(team_id, channel, user, message_ts, action_id, snapshot=snapshot)
        body = urlencode({"payload": json.dumps(payload)}).encode()
        return await self.send_to_bot(body, "application/x-www-form-urlencoded", **send)

    async def send_event(self, team_id: str, event: dict[str, Any], **send: Any) -> tuple[int, str]:
        body = json.dumps({"token": "legacy-verification-token", "team_id": team_id, "api_app_id": "A0RELAYBOT",
                           "event": event, "type": "event_callback", "event_id": "Ev" + secrets.token_hex(5).upper(),
                           "event_time": int(time.time())}).encode()
        return await self.send_to_bot(body, "application/json", **send)

    # ------------------------------------------------------------------------------------------ views (modals, Home)

    def open_modal(self, team_id: str, user: str) -> dict[str, Any] | None:
        """The modal on top of the user's stack, if one is open."""
        opened = [modal for modal in self.teams[team_id].modals.values() if modal["open"] and modal.get("user") == user]
        return opened[-1] if opened else None

    def _user_data(self, team: Team, user: str) -> dict[str, Any]:
        person = team.users.get(user)
        name = person.name if person else user
        return {"id": user, "username": name, "name": name, "team_id": team.id}

    @staticmethod
    def _state_values(view: dict[str, Any], values: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """What the user entered, in Slack's `view.state.values` shape for each input element's type."""
        state: dict[str, Any] = {}
        for block in view.get("blocks") or []:
            element = block.get("element")
            if block.get("type") != "input" or not isinstance(element, dict):
                continue
            block_id, action_id, kind = block["block_id"], element["action_id"], element.get("type")
            raw = (values.get(block_id) or {}).get(action_id)
            entry: dict[str, Any] = {"type": kind}
            if kind in ("static_select", "radio_buttons"):
                options = {option.get("value"): option for option in element.get("options") or []}
                entry["selected_option"] = options.get(raw) if raw else None
            elif kind in ("checkboxes", "multi_static_select"):
                options = {option.get("value"): option for option in element.get("options") or []}
                chosen = raw if isinstance(raw, list) else ([raw] if raw else [])
                entry["selected_options"] = [options[value] for value in chosen if value in options]
            elif kind == "users_select":
                entry["selected_user"] = raw or None
            elif kind == "conversations_select":
                entry["selected_conversation"] = raw or None
            elif kind == "channels_select":
                entry["selected_channel"] = raw or None
            else:  # plain_text_input, number_input, email_text_input, url_text_input …
                entry["value"] = raw if raw not in ("", None) else None
            state.setdefault(block_id, {})[action_id] = entry
        return state

    async def submit_view(self, team_id: str, user: str, view_id: str,
                          values: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Press the modal's submit button: send Slack's signed `view_submission` and apply the bot's answer."""
        team = self.teams[team_id]
        modal = team.modals.get(view_id)
        if modal is None or not modal["open"]:
            raise KeyError(f"no open view {view_id}")
        view = json.loads(json.dumps(modal["view"]))
        view["state"] = {"values": self._state_values(view, values)}
        payload = {"type": "view_submission", "team": {"id": team_id, "domain": team.name},
                   "user": self._user_data(team, user), "api_app_id": "A0RELAYBOT",
                   "token": "legacy-verification-token", "trigger_id": self._new_trigger_id(team_id, user, None),
                   "view": view, "response_urls": [], "is_enterprise_install": False, "enterprise": None}
        status, text = await self.send_to_bot(urlencode({"payload": json.dumps(payload)}).encode(),
                                              "application/x-www-form-urlencoded")
        answer: dict[str, Any] = {}
        if text.strip().startswith("{"):
            answer = json.loads(text)
        action = answer.get("response_action")
        if status != 200:
            modal["errors"] = {"": f"the app answered HTTP {status}"}
        elif action == "errors":
            modal["errors"] = dict(answer.get("errors") or {})
        elif action == "update":
            modal["view"] = self._new_view(team, answer.get("view") or {}, view_id=view_id,
                                           root_view_id=view.get("root_view_id"),
                                           previous_view_id=view.get("previous_view_id"))
            modal["errors"] = {}
        elif action == "push":
            pushed = self._new_view(team, answer.get("view") or {}, root_view_id=view.get("root_view_id"),
                                    previous_view_id=view_id)
            team.modals[pushed["id"]] = {"view": pushed, "trigger_id": None, "open": True, "user": user, "errors": {}}
        elif action == "clear":
            for other in team.modals.values():
                if other.get("user") == user:
                    other["open"] = False
        else:
            modal["open"] = False
        if status == 200 and action != "errors":
            # The person may have pasted a tool's own signing secret into the form (PagerDuty's set-secret).
            for typed in (value for inputs in values.values() for value in inputs.values()):
                if isinstance(typed, str) and typed.strip():
                    self.connections.adopt_pasted(team_id, typed)
        self._notify("view_submission", {"view_id": view_id, "status": status, "response_action": action})
        return {"status": status, "response_action": action, "errors": modal.get("errors") or {}}

    async def close_view(self, team_id: str, user: str, view_id: str) -> int | None:
        """Press Cancel: the modal closes; Slack tells the app only when the view asked (`notify_on_close`)."""
        team = self.teams[team_id]
        modal = team.modals.get(view_id)
        if modal is None or not modal["open"]:
            return None
        modal["open"] = False
        self._notify("view_closed", {"view_id": view_id})
        if not modal["view"].get("notify_on_close"):
            return None
        payload = {"type": "view_closed", "team": {"id": team_id, "domain": team.name},
                   "user": self._user_data(team, user), "api_app_id": "A0RELAYBOT",
                   "token": "legacy-verification-token", "view": modal["view"], "is_cleared": False}
        status, _ = await self.send_to_bot(urlencode({"payload": json.dumps(payload)}).encode(),
                                           "application/x-www-form-urlencoded")
        return status

    async def click_in_view(self, team_id: str, user: str, view: dict[str, Any], action_id: str,
                            block_id: str | None = None) -> tuple[int, str]:
        """A button in a modal or on the Home tab: `block_actions` with a `view` container."""
        team = self.teams[team_id]
        for block in view.get("blocks") or []:
            elements = block.get("elements", []) if block.get("type") == "actions" else []
            if block.get("accessory"):
                elements = [*elements, block["accessory"]]
            for element in elements:
                if element.get("action_id") != action_id or (block_id and block.get("block_id") != block_id):
                    continue
                payload = {
                    "type": "block_actions", "team": {"id": team_id, "domain": team.name},
                    "user": self._user_data(team, user), "api_app_id": "A0RELAYBOT",
                    "token": "legacy-verification-token",
                    "container": {"type": "view", "view_id": view.get("id")},
                    "trigger_id": self._new_trigger_id(team_id, user, None), "view": view,
                    "actions": [{"type": element.get("type", "button"), "action_id": action_id,
                                 "block_id": block.get("block_id"), "text": element.get("text"),
                                 "value": element.get("value"), "action_ts": f"{time.time():.6f}"}],
                }
                return await self.send_to_bot(urlencode({"payload": json.dumps(payload)}).encode(),
                                              "application/x-www-form-urlencoded")
        raise KeyError(f"the view has no button {action_id!r}")

    async def open_home(self, team_id: str, user: str) -> tuple[int, str]:
        """The user opens the app's Home tab: Slack sends `app_home_opened`."""
        event: dict[str, Any] = {"type": "app_home_opened", "user": user, "channel": "D" + user[1:], "tab": "home",
                                 "event_ts": f"{time.time():.6f}"}
        if user in self.teams[team_id].home_views:
            event["view"] = self.teams[team_id].home_views[user]
        return await self.send_event(team_id, event)

    # ------------------------------------------------------------------------------------------ people typing

    def post_user_message(self, team_id: str, channel: str, user: str, text: str) -> Message:
        """A person writes in a channel (not a command): it is only shown; relaybot does not read messages."""
        message = Message(ts=self._next_ts(), channel=channel, text=text, blocks=None, thread_ts=None, user=user)
        self.teams[team_id].messages[channel].append(message)
        self._notify("message", {"channel": channel, "user": user})
        return message

    # ------------------------------------------------------------------------------------------ the tools

    async def deliver_webhook(self, team_id: str, integration: str, body: bytes, *, event: str | None = None
                              ) -> tuple[int, str, dict[str, str]]:
        """POST `body` to the workspace's connection for `integration`, signed as that tool signs.

        Returns (HTTP status, response text, the headers sent); raises LookupError when the emulator has not
        seen the connection's URL and secret in a reply yet.
        """
        assert self.bot_url, "set emulator.bot_url to the bot's base URL first"
        known = self.connections.get(team_id, integration)
        if known is None:
            raise LookupError(f"no {integration} connection seen yet: run `/relay connect {integration}`")
        if not known.secret:
            raise LookupError(f"the secret of the {integration} connection was not shown to the emulator: "
                              f"run `/relay connect {integration} rotate`")
        delivery = senders.sign(integration, body=body, secret=known.secret, event=event)
        # The connection id is what counts; the host of the URL shown may be another port from an earlier start.
        async with self._http().post(f"{self.bot_url}/hooks/{known.connection_id}", data=delivery.body,
                                     headers=delivery.headers) as response:
            text = await response.text()
        self._notify("webhook", {"integration": integration, "status": response.status})
        return response.status, text, delivery.headers

"""The dev page: a small Slack client for the emulated workspace, served next to the emulator's Web API.

`GET /` is a static page (bot/emulator/static/) that long-polls `GET /_emulator/state` and posts what the
person does to `/_emulator/*`; each of those becomes the request Slack (or a tool) would send the bot: a signed
slash command, a signed `block_actions` click, a signed `view_submission`, a signed webhook.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from bot.emulator import senders
from bot.emulator.webapi import Message, SlackEmulator, Team
from integrations.registry import INTEGRATIONS

STATIC = Path(__file__).resolve().parent / "static"
LONG_POLL_SECONDS = 25.0


@dataclass
class Activity:
    at: float
    text: str
    ok: bool


def _message_data(team: Team, message: Message, replies: list[Message]) -> dict[str, Any]:
    def one(item: Message) -> dict[str, Any]:
        person = team.users.get(item.user)
        return {"ts": item.ts, "user": item.user, "user_name": person.name if person else "relaybot",
                "is_bot": item.user == team.bot_user_id, "text": item.text, "blocks": item.blocks,
                "edited": item.edited}

    return {**one(message), "replies": [one(reply) for reply in replies]}


class DevPage:
    def __init__(self, *, emulator: SlackEmulator, command: str, examples_root: Path | None = None) -> None:
        self.emulator = emulator
        self.command = command
        self.examples_root = examples_root
        self.activity: deque[Activity] = deque(maxlen=60)
        self._examples: dict[str, list[senders.Example]] | None = None
        self.closing = False

    def close(self) -> None:
        """Answer the long-polls now: a server stopping waits for its open requests to finish."""
        self.closing = True
        self.emulator.touch("closing")

    async def examples(self) -> dict[str, list[senders.Example]]:
        """The packaged example payloads, listed once (off the event loop)."""
        if self._examples is None:
            self._examples = await asyncio.to_thread(senders.list_examples, self.examples_root)
        return self._examples

    async def find_example(self, integration: str, name: str) -> bytes | None:
        example = next((item for item in (await self.examples()).get(integration, []) if item.name == name), None)
        return None if example is None else await asyncio.to_thread(example.body)

    # ------------------------------------------------------------------------------------------ routes

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC, append_version=False)
        app.router.add_get("/_emulator/state", self.state)
        app.router.add_get("/_emulator/examples/{integration}/{name}", self.example)
        app.router.add_post("/_emulator/command", self.command_typed)
        app.router.add_post("/_emulator/click", self.click)
        app.router.add_post("/_emulator/event", self.send_event)
        app.router.add_post("/_emulator/view/submit", self.view_submit)
        app.router.add_post("/_emulator/view/close", self.view_close)
        app.router.add_post("/_emulator/home", self.home_opened)

    def _log(self, text: str, *, ok: bool = True) -> None:
        self.activity.append(Activity(at=time.time(), text=text, ok=ok))
        self.emulator.touch("activity", {"text": text})

    def _team(self, request: web.Request, data: dict[str, Any] | None = None) -> Team:
        team_id = (data or {}).get("team") or request.query.get("team") or next(iter(self.emulator.teams))
        team = self.emulator.teams.get(team_id)
        if team is None:
            raise web.HTTPNotFound(text=f"no workspace {team_id}")
        return team

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="send a JSON object") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="send a JSON object")
        return data

    @staticmethod
    def _user(team: Team, data: dict[str, Any]) -> str:
        user = str(data.get("user") or "")
        if user not in team.users:
            raise web.HTTPBadRequest(text=f"no user {user!r} in {team.id}")
        return user

    # ------------------------------------------------------------------------------------------ reading

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def snapshot(self, team: Team, user: str | None, examples: dict[str, list[senders.Example]]) -> dict[str, Any]:
        messages: dict[str, list[dict[str, Any]]] = {}
        for channel in team.channels:
            everything = team.messages.get(channel, [])
            messages[channel] = [_message_data(team, message, [reply for reply in everything
                                                                if reply.thread_ts == message.ts])
                                 for message in everything if not message.thread_ts]
        ephemeral: dict[str, list[dict[str, Any]]] = {}
        for item in team.ephemeral:
            if item.get("user") == user and item.get("ts"):
                ephemeral.setdefault(item["channel"], []).append(
                    {"ts": item["ts"], "text": item.get("text") or "", "blocks": item.get("blocks")})
        modal = self.emulator.open_modal(team.id, user) if user else None
        known = self.emulator.connections.for_team(team.id)
        integrations = [{"name": name, "title": cls.title, "examples": [e.name for e in examples.get(name, [])],
                         "can_sign": name in senders.SIGNERS,
                         "tool_secret": (self.emulator.connections.tool_secret(team.id, name)
                                         if cls.secret_generated_by_tool else None),
                         "connection": ({"url": known[name].url, "has_secret": bool(known[name].secret)}
                                        if name in known else None)}
                        for name, cls in sorted(INTEGRATIONS.items()) if cls.receives_webhooks]
        return {
            "version": self.emulator.version,
            "team": {"id": team.id, "name": team.name},
            "command": self.command,
            "users": [{"id": person.id, "name": person.name, "is_admin": person.is_admin or person.is_owner}
                      for person in team.users.values() if not person.is_bot],
            "channels": [{"id": channel_id, "name": info.get("name", channel_id)}
                         for channel_id, info in team.channels.items()],
            "messages": messages,
            "ephemeral": ephemeral,
            "home": team.home_views.get(user) if user else None,
            "modal": {"view": modal["view"], "errors": modal.get("errors") or {}} if modal else None,
            "integrations": integrations,
            "activity": [{"at": item.at, "text": item.text, "ok": item.ok} for item in self.activity],
        }

    async def state(self, request: web.Request) -> web.Response:
        team = self._team(request)
        user = request.query.get("user") or None
        since = request.query.get("since")
        if since is not None and since.lstrip("-").isdigit() and not self.closing:
            await self.emulator.wait_version(int(since), timeout=LONG_POLL_SECONDS)
        examples = await self.examples()
        return web.json_response(self.snapshot(team, user, examples), headers={"Cache-Control": "no-store"})

    async def example(self, request: web.Request) -> web.Response:
        body = await self.find_example(request.match_info["integration"], request.match_info["name"])
        if body is None:
            raise web.HTTPNotFound(text="no such example")
        return web.Response(body=body, content_type="application/json")

    # ------------------------------------------------------------------------------------------ doing

    async def command_typed(self, request: web.Request) -> web.Response:
        data = await self._json(request)
        team = self._team(request, data)
        user = self._user(team, data)
        channel = str(data.get("channel") or "")
        if channel not in team.channels:
            raise web.HTTPBadRequest(text=f"no channel {channel!r}")
        text = str(data.get("text") or "").strip()
        if not text:
            raise web.HTTPBadRequest(text="type something")
        if not text.startswith("/"):
            self.emulator.post_user_message(team.id, channel, user, text)
            return web.json_response({"ok": True, "kind": "message"})
        name, _, rest = text.partition(" ")
        if name != self.command:
            self._log(f"`{name}` is not a command of this app; try `{self.command} help`", ok=False)
            return web.json_response({"ok": False, "error": f"{name} is not a command here"}, status=400)
        status, _ = await self.emulator.slash_command(team.id, channel, user, rest.strip(), command=name)
        self._log(f"slash command `{text}` → POST /slack/events: HTTP {status}", ok=status == 200)
        return web.json_response({"ok": status == 200, "status": status})

    async def click(self, request: web.Request) -> web.Response:
        data = await self._json(request)
        team = self._team(request, data)
        user = self._user(team, data)
        action_id = str(data.get("action_id") or "")
        try:
            if data.get("view_id"):
                view = self._view(team, user, str(data["view_id"]))
                status, _ = await self.emulator.click_in_view(team.id, user, view, action_id,
                                                              data.get("block_id"))
            else:
                status, _ = await self.emulator.click(team.id, str(data.get("channel") or ""), user,
                                                      str(data.get("ts") or ""), action_id)
        except KeyError as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        self._log(f"button `{action_id}` → POST /slack/events (block_actions): HTTP {status}", ok=status == 200)
        return web.json_response({"ok": status == 200, "status": status})

    def _view(self, team: Team, user: str, view_id: str) -> dict[str, Any]:
        modal = team.modals.get(view_id)
        if modal is not None:
            return modal["view"]
        home = team.home_views.get(user)
        if home is not None:
            return home
        raise KeyError(f"no view {view_id}")

    async def send_event(self, request: web.Request) -> web.Response:
        data = await self._json(request)
        team = self._team(request, data)
        integration = str(data.get("integration") or "")
        if integration not in INTEGRATIONS:
            raise web.HTTPBadRequest(text=f"no integration {integration!r}")
        example_name = str(data.get("example") or "")
        body_text = data.get("body")
        if isinstance(body_text, str) and body_text.strip():
            body = body_text.encode()
        else:
            found = await self.find_example(integration, example_name)
            if found is None:
                raise web.HTTPBadRequest(text=f"no {integration} example {example_name!r}")
            body = found
        event = data.get("event") or (senders.event_name_for(integration, example_name) if example_name else None)
        try:
            status, text, _headers = await self.emulator.deliver_webhook(team.id, integration, body,
                                                                         event=event or None)
        except LookupError as exc:
            problem = str(exc)
            if INTEGRATIONS[integration].secret_generated_by_tool:
                problem = (f"{INTEGRATIONS[integration].title} signs with a secret it makes itself: paste the emulated "
                           f"one (shown under Send event) into `{self.command} connect {integration} set-secret`")
            self._log(problem, ok=False)
            return web.json_response({"ok": False, "error": problem}, status=409)
        except KeyError as exc:
            self._log(str(exc), ok=False)
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        label = f"{integration} {example_name or 'event'}"
        self._log(f"{label} → POST /hooks/…: HTTP {status} {text[:200]}", ok=status in (200, 202))
        answer: Any = json.loads(text) if text.startswith("{") else text
        return web.json_response({"ok": status in (200, 202), "status": status, "answer": answer})

    async def view_submit(self, request: web.Request) -> web.Response:
        data = await self._json(request)
        team = self._team(request, data)
        user = self._user(team, data)
        values: dict[str, dict[str, Any]] = data["values"] if isinstance(data.get("values"), dict) else {}
        try:
            result = await self.emulator.submit_view(team.id, user, str(data.get("view_id") or ""), values)
        except KeyError as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        self._log(f"modal submitted → POST /slack/events (view_submission): HTTP {result['status']}"
                  + (f", {result['response_action']}" if result["response_action"] else ""),
                  ok=result["status"] == 200)
        return web.json_response({"ok": result["status"] == 200, **result})

    async def view_close(self, request: web.Request) -> web.Response:
        data = await self._json(request)
        team = self._team(request, data)
        user = self._user(team, data)
        status = await self.emulator.close_view(team.id, user, str(data.get("view_id") or ""))
        return web.json_response({"ok": True, "status": status})

    async def home_opened(self, request: web.Request) -> web.Response:
        data = await self._json(request)
        team = self._team(request, data)
        user = self._user(team, data)
        status, _ = await self.emulator.open_home(team.id, user)
        # Bolt answers 404 to an event no listener handles; Slack ignores that, and so does the page.
        return web.json_response({"ok": True, "status": status})

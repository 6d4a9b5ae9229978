"""A fake Prometheus Alertmanager API v2 on a random port: create and list silences, validated like
Alertmanager's `postableSilence` (matchers required, endsAt after startsAt), every request recorded."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web


@dataclass
class AlertmanagerCall:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def silence_problem(body: Any) -> str | None:
    """What Alertmanager would reject in a silence, or None."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for key in ("matchers", "startsAt", "endsAt", "createdBy", "comment"):
        if key not in body:
            return f"{key} in body is required"
    matchers = body["matchers"]
    if not isinstance(matchers, list) or not matchers:
        return "at least one matcher required"
    for matcher in matchers:
        if not isinstance(matcher, dict) or not matcher.get("name") or "value" not in matcher \
                or not isinstance(matcher.get("isRegex"), bool):
            return f"invalid matcher {matcher!r}"
    starts, ends = _time(body["startsAt"]), _time(body["endsAt"])
    if starts is None or ends is None or starts.tzinfo is None:
        return "startsAt and endsAt must be RFC 3339 times"
    if ends <= starts:
        return "end time must not be before start time"
    if not body["createdBy"] or not body["comment"]:
        return "createdBy and comment must not be empty"
    return None


class FakeAlertmanager:
    def __init__(self, *, require_header: tuple[str, str] | None = None) -> None:
        self.require_header = require_header  # e.g. an auth proxy's Authorization in front of Alertmanager
        self.calls: list[AlertmanagerCall] = []
        self.silences: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def post_silence(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.calls.append(AlertmanagerCall(request.method, request.path, dict(request.headers), body))
        if self.require_header and request.headers.get(self.require_header[0]) != self.require_header[1]:
            return web.Response(status=401, text="Unauthorized")
        problem = silence_problem(body)
        if problem:
            return web.json_response(problem, status=400)
        silence_id = str(uuid.uuid4())
        self.silences.append({"id": silence_id, "status": {"state": "active"}, **body})
        return web.json_response({"silenceID": silence_id})

    async def list_silences(self, request: web.Request) -> web.Response:
        return web.json_response(self.silences)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/api/v2/silences", self.post_silence)
        app.router.add_get("/api/v2/silences", self.list_silences)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

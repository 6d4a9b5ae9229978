"""A fake PagerDuty REST API v2 on a random port: update an incident and add a note, answered as PagerDuty
answers them (developer.pagerduty.com, "Update an incident", "Create a note on an incident"), every request
recorded."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

ACCEPT = "application/vnd.pagerduty+json;version=2"


@dataclass
class PagerDutyCall:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def _error(status: int, message: str, code: int, *errors: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": code, "errors": list(errors)}}, status=status)


class FakePagerDuty:
    def __init__(self, *, token: str = "pd-test-key", users: tuple[str, ...] = ("oncall@example.com",)) -> None:
        self.token = token
        self.users = set(users)
        self.calls: list[PagerDutyCall] = []
        self.incidents: dict[str, dict[str, Any]] = {}
        self.notes: dict[str, list[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def add_incident(self, incident_id: str, *, number: int = 2, title: str = "A little bump in the road",
                     status: str = "triggered") -> None:
        self.incidents[incident_id] = {
            "id": incident_id, "type": "incident", "incident_number": number, "title": title, "status": status,
            "summary": f"[#{number}] {title}", "html_url": f"https://acme.pagerduty.com/incidents/{incident_id}",
            "self": f"https://api.pagerduty.com/incidents/{incident_id}", "urgency": "high",
            "service": {"id": "PF9KMXH", "type": "service_reference", "summary": "API Service"},
        }

    async def _check(self, request: web.Request) -> tuple[Any, web.Response | None]:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.calls.append(PagerDutyCall(request.method, request.path, dict(request.headers), body))
        if request.headers.get("Authorization") != f"Token token={self.token}":
            return body, _error(401, "Unauthorized", 2006)
        if request.headers.get("From") not in self.users:
            return body, _error(400, "Invalid Input Provided", 2001, "Requester User Not Found")
        incident = self.incidents.get(request.match_info["id"])
        if incident is None:
            return body, _error(404, "Not Found", 2100)
        return body, None

    async def update_incident(self, request: web.Request) -> web.Response:
        body, error = await self._check(request)
        if error is not None:
            return error
        change = body.get("incident") if isinstance(body, dict) else None
        if not isinstance(change, dict) or change.get("type") not in ("incident", "incident_reference") \
                or change.get("status") not in (None, "acknowledged", "resolved"):
            return _error(400, "Invalid Input Provided", 2001, "Incident type must be incident_reference")
        incident = self.incidents[request.match_info["id"]]
        if change.get("status"):
            incident["status"] = change["status"]
        if change.get("resolution"):
            incident["resolve_reason"] = change["resolution"]
        return web.json_response({"incident": incident})

    async def create_note(self, request: web.Request) -> web.Response:
        body, error = await self._check(request)
        if error is not None:
            return error
        content = body.get("note", {}).get("content") if isinstance(body, dict) else None
        if not content:
            return _error(400, "Invalid Input Provided", 2001, "Note content can't be blank")
        note = {"id": f"PNOTE{next(self._ids):02d}", "content": content, "created_at": "2026-01-02T03:04:05-00:00",
                "user": {"id": "PXPGF42", "type": "user_reference", "summary": request.headers["From"]},
                "channel": {"summary": "The PagerDuty website or APIs"}}
        self.notes.setdefault(request.match_info["id"], []).append(note)
        return web.json_response({"note": note}, status=201)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_put("/incidents/{id}", self.update_incident)
        app.router.add_post("/incidents/{id}/notes", self.create_note)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

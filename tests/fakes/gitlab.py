"""A fake GitLab REST API v4 on a random port: the notes endpoints relaybot's `gitlab.comment` calls, answered
as GitLab answers them (docs.gitlab.com/api/notes), with every request recorded."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass
class GitLabCall:
    method: str
    raw_path: str  # as sent: a project path stays encoded (`group%2Fproject`)
    headers: dict[str, str]
    body: Any


class FakeGitLab:
    def __init__(self, *, token: str = "glpat-test-token") -> None:
        self.token = token
        self.calls: list[GitLabCall] = []
        self.notes: list[dict[str, Any]] = []
        self.fail_next: list[int] = []
        self._ids = itertools.count(3000)
        self._runner: web.AppRunner | None = None
        self.url = ""  # the API base, …/api/v4

    def _authorized(self, request: web.Request) -> bool:
        # GitLab takes a personal/project access token in PRIVATE-TOKEN, or an OAuth/PAT token as a bearer.
        return (request.headers.get("PRIVATE-TOKEN") == self.token
                or request.headers.get("Authorization") == f"Bearer {self.token}")

    async def create_note(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.calls.append(GitLabCall(request.method, request.raw_path, dict(request.headers), body))
        if self.fail_next:
            return web.json_response({"message": "500 Internal Server Error"}, status=self.fail_next.pop(0))
        if not self._authorized(request):
            return web.json_response({"message": "401 Unauthorized"}, status=401)
        if not isinstance(body, dict) or not body.get("body"):
            return web.json_response({"error": "body is missing"}, status=400)
        noteable = request.match_info["noteable"]
        note = {"id": next(self._ids), "type": None, "body": body["body"], "attachment": None,
                "author": {"id": 1, "username": "relaybot", "name": "relaybot"},
                "created_at": "2026-01-02T03:04:05.000Z", "updated_at": "2026-01-02T03:04:05.000Z",
                "system": False, "noteable_id": 99, "internal": False,
                "noteable_type": "MergeRequest" if noteable == "merge_requests" else "Issue",
                "noteable_iid": int(request.match_info["iid"]), "project_id": 5, "resolvable": False,
                "confidential": False}
        self.notes.append({"project": request.match_info["project"], **note})
        return web.json_response(note, status=201)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/api/v4/projects/{project}/{noteable:merge_requests|issues}/{iid:\\d+}/notes",
                            self.create_note)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/api/v4"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

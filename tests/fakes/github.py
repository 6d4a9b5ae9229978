"""A fake GitHub REST API on a random port: the endpoints relaybot's GitHub actions call, as GitHub answers."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass
class GitHubCall:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeGitHub:
    def __init__(self, *, token: str = "ghp_test_token") -> None:
        self.token = token
        self.calls: list[GitHubCall] = []
        self.comments: list[dict[str, Any]] = []
        self.issues: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.dispatches: list[dict[str, Any]] = []
        # A status (answered "Server Error"), or (status, message, headers) as GitHub answers a rate limit.
        self.fail_next: list[int | tuple[int, str, dict[str, str]]] = []
        self._ids = itertools.count(1000)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _check(self, request: web.Request) -> web.Response | None:
        if self.fail_next:
            failure = self.fail_next.pop(0)
            status, message, headers = failure if isinstance(failure, tuple) else (failure, "Server Error", {})
            return web.json_response({"message": message}, status=status, headers=headers)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"message": "Bad credentials"}, status=401)
        return None

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.calls.append(GitHubCall(request.method, request.path, dict(request.headers), body))
        return body

    async def comment(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if (error := self._check(request)) is not None:
            return error
        owner, repo, number = request.match_info["owner"], request.match_info["repo"], request.match_info["number"]
        comment = {"id": next(self._ids), "body": body["body"],
                   "html_url": f"https://github.com/{owner}/{repo}/issues/{number}#issuecomment-1",
                   "issue_number": int(number)}
        self.comments.append(comment)
        return web.json_response(comment, status=201)

    async def create_issue(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if (error := self._check(request)) is not None:
            return error
        number = len(self.issues) + 1
        issue = {"id": next(self._ids), "number": number, "title": body["title"], "body": body.get("body"),
                 "labels": [{"name": name} for name in body.get("labels", [])],
                 "html_url": f"https://github.com/{request.match_info['owner']}/{request.match_info['repo']}/issues/{number}"}
        self.issues.append(issue)
        return web.json_response(issue, status=201)

    async def status(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if (error := self._check(request)) is not None:
            return error
        status = {"id": next(self._ids), "state": body["state"], "context": body.get("context", "default"),
                  "description": body.get("description"), "target_url": body.get("target_url"),
                  "sha": request.match_info["sha"]}
        self.statuses.append(status)
        return web.json_response(status, status=201)

    async def dispatch(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if (error := self._check(request)) is not None:
            return error
        self.dispatches.append({"workflow": request.match_info["workflow"], **body})
        return web.Response(status=204)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/repos/{owner}/{repo}/issues/{number}/comments", self.comment)
        app.router.add_post("/repos/{owner}/{repo}/issues", self.create_issue)
        app.router.add_post("/repos/{owner}/{repo}/statuses/{sha}", self.status)
        app.router.add_post("/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches", self.dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

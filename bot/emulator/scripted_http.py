"""Outbound HTTP for `relaybot test`: answered from files where `--mock` says so, real (and guarded) elsewhere.

Every exchange is recorded so the dry run can show what the workflow would have sent.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yarl import URL

from integrations.httpclient import BlockedAddress, HttpClient, HttpResponse

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@dataclass(frozen=True)
class MockAnswer:
    """`[METHOD ]URL[*]=[STATUS:]FILE` or `[METHOD ]URL[*]=STATUS`: a trailing `*` matches by prefix; a URL
    without a query matches the request whatever its query."""

    method: str | None
    pattern: str
    status: int
    body: bytes
    content_type: str
    source: str

    def matches(self, method: str, url: URL) -> bool:
        if self.method is not None and self.method != method.upper():
            return False
        if self.pattern.endswith("*"):
            return str(url).startswith(self.pattern[:-1])
        if "?" in self.pattern:
            return str(url) == self.pattern
        return str(url.with_query(None).with_fragment(None)) == self.pattern.rstrip("?")


def parse_mock(spec: str, *, base: Path | None = None) -> MockAnswer:
    """Read one `--mock` argument and its file; ValueError says what is wrong."""
    target, equals, answer = spec.rpartition("=")
    if not equals or not target.strip() or not answer.strip():
        raise ValueError(f"--mock {spec!r}: use URL=FILE, URL=STATUS:FILE or URL=STATUS")
    method: str | None = None
    first, _, rest = target.strip().partition(" ")
    if rest and first.upper() in METHODS:
        method, target = first.upper(), rest.strip()
    if not target.startswith(("http://", "https://")):
        raise ValueError(f"--mock {spec!r}: the URL must start with http:// or https://")
    status = 200
    file_part = answer
    head, colon, tail = answer.partition(":")
    if head.isdigit():
        status, file_part = int(head), tail if colon else ""
    if not 100 <= status <= 599:
        raise ValueError(f"--mock {spec!r}: {status} is not an HTTP status")
    body, content_type = b"", "text/plain"
    if file_part:
        path = Path(file_part)
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            body = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"--mock {spec!r}: cannot read {path}: {exc.strerror or exc}") from None
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return MockAnswer(method=method, pattern=target, status=status, body=body, content_type=content_type,
                      source=file_part or f"status {status}")


@dataclass
class Exchange:
    method: str
    url: str
    status: int | None
    mocked: bool
    error: str | None = None


class ScriptedHttpClient(HttpClient):
    def __init__(self, *, answers: list[MockAnswer], offline: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.answers = answers
        self.offline = offline
        self.exchanges: list[Exchange] = []

    async def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      json_body: Any = None, data: str | bytes | None = None,
                      params: Mapping[str, str] | None = None, timeout: float | None = None,
                      follow_redirects: bool = True) -> HttpResponse:
        full = URL(url).update_query(dict(params)) if params else URL(url)
        for answer in self.answers:
            if answer.matches(method, full):
                self.exchanges.append(Exchange(method.upper(), str(full), answer.status, mocked=True))
                return HttpResponse(status=answer.status, headers={"content-type": answer.content_type},
                                    body=answer.body, url=str(full))
        if self.offline:
            self.exchanges.append(Exchange(method.upper(), str(full), None, mocked=False, error="offline"))
            raise BlockedAddress(f"no --mock answers {method.upper()} {full}, and --offline keeps the network out")
        try:
            response = await super().request(method, url, headers=headers, json_body=json_body, data=data,
                                             params=params, timeout=timeout, follow_redirects=follow_redirects)
        except Exception as exc:
            self.exchanges.append(Exchange(method.upper(), str(full), None, mocked=False,
                                           error=str(exc) or type(exc).__name__))
            raise
        self.exchanges.append(Exchange(method.upper(), str(full), response.status, mocked=False))
        return response

"""Outbound HTTP for every action: an address guard, a timeout on every request, capped response bodies.

The guard refuses loopback, private, link-local, CGNAT, multicast, reserved and cloud-metadata addresses, and
IPv4 addresses dressed as IPv6 (`::ffff:169.254.169.254`, NAT64, 6to4), after DNS resolution and again on every
redirect (redirects are followed here, one hop at a time, never by aiohttp). Hosts in the allow list
(`RELAYBOT_HTTP_ALLOW`) skip the check. Because the check runs in the connector's resolver, the address that
was checked is the address that is connected to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

MAX_REDIRECTS = 5

_BLOCKED_V4 = [ipaddress.ip_network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
)]
_BLOCKED_V6 = [ipaddress.ip_network(net) for net in (
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8", "2001:db8::/32", "100::/64",
    "fd00:ec2::254/128",
)]


ALLOW_HINT = "an operator can allow the host with RELAYBOT_HTTP_ALLOW"
# Request headers that carry credentials: never sent on to another host when a redirect leaves the origin.
CREDENTIAL_HEADERS = ("authorization", "private-token", "cookie", "proxy-authorization", "x-api-key")


class BlockedAddress(Exception):
    """The destination is not allowed by the outbound HTTP guard."""


class ResponseTooLarge(Exception):
    pass


class RequestFailed(Exception):
    """The request did not get an answer: connection refused or reset, TLS error, malformed answer."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped:
        return address.ipv4_mapped
    if address.sixtofour:
        return address.sixtofour
    if address in ipaddress.ip_network("64:ff9b::/96") or address in ipaddress.ip_network("::/96"):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_blocked_ip(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return True
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_blocked_ip(str(embedded))
        return any(address in net for net in _BLOCKED_V6) or not address.is_global
    return any(address in net for net in _BLOCKED_V4) or not address.is_global


def _host_of(url: URL) -> str:
    return (url.host or "").strip("[]").lower().rstrip(".")


_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$", re.IGNORECASE)


def legacy_ipv4(host: str) -> str | None:
    """The dotted-quad address of a host written in a legacy numeric form (`2130706433`, `0177.0.0.1`,
    `127.1`, `0x7f.1`), which resolvers accept as an address; None for anything else."""
    if not _NUMERIC_HOST.match(host):
        return None
    try:
        canonical = socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None
    return canonical if canonical != host else None


class AddressGuard:
    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allow = {host.strip().lower().strip("[]").rstrip(".") for host in allow if host.strip()}

    def allowed_host(self, host: str) -> bool:
        return host.lower().strip("[]").rstrip(".") in self.allow

    def check_url(self, url: URL) -> None:
        if url.scheme not in ("http", "https"):
            raise BlockedAddress(f"only http and https URLs may be requested, not {url.scheme or 'a relative URL'}")
        host = _host_of(url)
        if not host:
            raise BlockedAddress("the URL has no host")
        if self.allowed_host(host):
            return
        canonical = legacy_ipv4(host)
        if canonical is not None:
            # Resolvers read these as addresses; they are a classic way past filters that only see names.
            kind = "a private, loopback or metadata address" if is_blocked_ip(canonical) else "an IP address"
            raise BlockedAddress(f"{host} is {kind} ({canonical}) in a non-standard form")
        try:
            ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return  # a name: checked after resolution by GuardedResolver
        if is_blocked_ip(host):
            raise BlockedAddress(f"{host} is a private, loopback or metadata address; {ALLOW_HINT}")


class GuardedResolver(AbstractResolver):
    """Resolves, then drops every address the guard refuses; refuses the host if nothing is left."""

    def __init__(self, guard: AddressGuard, inner: AbstractResolver | None = None) -> None:
        self.guard = guard
        self.inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        if self.guard.allowed_host(host):
            return results
        allowed = [result for result in results if not is_blocked_ip(result["host"])]
        if not allowed:
            raise BlockedAddress(f"{host} resolves to a private, loopback or metadata address; {ALLOW_HINT}")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    url: str

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def json_or_none(self) -> Any:
        content_type = self.headers.get("content-type", "")
        if not self.body or ("json" not in content_type and self.body[:1] not in (b"{", b"[")):
            return None
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None


def _redacted(url: URL) -> str:
    """The URL without its query string or user info, which may carry credentials."""
    return str(url.with_query(None).with_user(None).with_fragment(None))


class HttpClient:
    """The one way actions reach the network."""

    def __init__(self, *, allow: Iterable[str] = (), timeout: float = 30.0, max_response: int = 10 * 2**20,
                 user_agent: str = "relaybot") -> None:
        self.guard = AddressGuard(allow)
        self.timeout = timeout
        self.max_response = max_response
        self.user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No DNS cache: every connection resolves (and is checked) afresh, so a name cannot be checked
            # while it points at a public address and used once it points at a private one.
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.guard), limit=100, use_dns_cache=False)
            # No cookie jar: one client serves every workspace's steps, so a cookie that one step's server set
            # would otherwise ride along on another workspace's request to that host.
            self._session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": self.user_agent},
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      json_body: Any = None, data: str | bytes | None = None,
                      params: Mapping[str, str] | None = None, timeout: float | None = None,
                      follow_redirects: bool = True) -> HttpResponse:
        """One request, redirects followed hop by hop through the guard, all within one timeout.

        Raises BlockedAddress (the guard refused a hop), ResponseTooLarge, TimeoutError or RequestFailed.
        """
        method = method.upper()
        target = URL(url)
        body: bytes | None
        send_headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            if not any(name.lower() == "content-type" for name in send_headers):
                send_headers["Content-Type"] = "application/json"
        else:
            body = data.encode() if isinstance(data, str) else data
        seconds = timeout or self.timeout
        session = self._get_session()
        async with asyncio.timeout(seconds):
            for _ in range(MAX_REDIRECTS + 1):
                self.guard.check_url(target)
                try:
                    async with session.request(method, target, headers=send_headers, data=body, params=params,
                                               timeout=aiohttp.ClientTimeout(total=seconds),
                                               allow_redirects=False) as response:
                        location = response.headers.get("Location")
                        if follow_redirects and response.status in (301, 302, 303, 307, 308) and location:
                            next_target = URL(urljoin(str(response.url), location))
                            if next_target.origin() != response.url.origin():
                                send_headers = {name: value for name, value in send_headers.items()
                                                if name.lower() not in CREDENTIAL_HEADERS}
                            target, params = next_target, None
                            if response.status in (301, 302, 303) and method not in ("GET", "HEAD"):
                                method, body = "GET", None
                                send_headers = {name: value for name, value in send_headers.items()
                                                if name.lower() != "content-type"}
                            continue
                        payload = await self._read_capped(response)
                        return HttpResponse(status=response.status,
                                            headers={k.lower(): v for k, v in response.headers.items()},
                                            body=payload, url=str(response.url))
                except TimeoutError:
                    raise
                except aiohttp.ClientError as exc:
                    # aiohttp passes a resolver's own exception through, or wraps it; either way the guard's
                    # refusal is what the user should read.
                    if isinstance(exc.__cause__, BlockedAddress):
                        raise exc.__cause__ from None
                    if isinstance(exc, aiohttp.InvalidURL):
                        raise BlockedAddress(f"{exc}") from None
                    raise RequestFailed(f"{method} {_redacted(target)} failed: {exc}") from None
                except OSError as exc:
                    raise RequestFailed(f"{method} {_redacted(target)} failed: {exc}") from None
        raise BlockedAddress(f"more than {MAX_REDIRECTS} redirects")

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        if response.content_length is not None and response.content_length > self.max_response:
            raise ResponseTooLarge(f"the response is larger than {self.max_response} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > self.max_response:
                raise ResponseTooLarge(f"the response is larger than {self.max_response} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

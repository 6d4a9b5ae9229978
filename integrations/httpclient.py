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


class BlockedAddress(Exception):
    """The destination is not allowed by the outbound HTTP guard."""


class ResponseTooLarge(Exception):
    pass


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
        try:
            ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return  # a name: checked after resolution by GuardedResolver
        if is_blocked_ip(host):
            raise BlockedAddress(f"{host} is a private, loopback or metadata address; "
                                 f"an operator can allow it with RELAYBOT_HTTP_ALLOW")


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
            raise BlockedAddress(f"{host} resolves to a private, loopback or metadata address; "
                                 f"an operator can allow it with RELAYBOT_HTTP_ALLOW")
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
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.guard), limit=100, ttl_dns_cache=0)
            self._session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": self.user_agent})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      json_body: Any = None, data: str | bytes | None = None,
                      params: Mapping[str, str] | None = None, timeout: float | None = None,
                      follow_redirects: bool = True) -> HttpResponse:
        """One request, redirects followed hop by hop through the guard."""
        method = method.upper()
        target = URL(url)
        body: bytes | None
        send_headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            send_headers.setdefault("Content-Type", "application/json")
        else:
            body = data.encode() if isinstance(data, str) else data
        limit = aiohttp.ClientTimeout(total=timeout or self.timeout)
        session = self._get_session()
        for _ in range(MAX_REDIRECTS + 1):
            self.guard.check_url(target)
            async with asyncio.timeout(timeout or self.timeout):
                async with session.request(method, target, headers=send_headers, data=body, params=params,
                                           timeout=limit, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    if follow_redirects and response.status in (301, 302, 303, 307, 308) and location:
                        target = URL(urljoin(str(response.url), location))
                        params = None
                        if response.status in (301, 302, 303) and method not in ("GET", "HEAD"):
                            method, body = "GET", None
                            send_headers.pop("Content-Type", None)
                        continue
                    payload = await self._read_capped(response)
                    return HttpResponse(status=response.status,
                                        headers={k.lower(): v for k, v in response.headers.items()},
                                        body=payload, url=str(response.url))
        raise BlockedAddress(f"more than {MAX_REDIRECTS} redirects")

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > self.max_response:
                raise ResponseTooLarge(f"the response is larger than {self.max_response} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

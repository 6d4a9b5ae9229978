"""A minimal HTTP/1.1 front server on `asyncio.Protocol`: a fast path answered in-process, the rest relayed.

Made for benchmark fakes that share a small machine with the system under test: aiohttp's server machinery
(request and response objects, routing) costs a fake that answers thousands of requests a second several
times the CPU its answers need, and takes that CPU from what is being measured. This front reads requests
itself and asks `fast_path(request)` for a JSON answer; when that says `None` (or the request is anything but
plain HTTP/1.1), the request goes as received, with `Connection: close`, to a full HTTP server on an internal
port, and that server's answer comes back to the client with its framing and `Connection` header made right
for the client's connection.

What it handles: keep-alive (HTTP/1.1 default, `Connection: close` honoured; HTTP/1.0 only with
`Connection: keep-alive`), pipelined requests and requests split over many reads (answered in order, one
at a time), `Content-Length` bodies up to `MAX_BODY`, chunked bodies (relayed as sent), `Expect:
100-continue`. What it refuses: framing it cannot read without guessing (no blank line within `MAX_HEAD`,
bare CR or LF, a bad or conflicting `Content-Length`, a `Transfer-Encoding` not ending in chunked) gets 400
and a closed connection; a body over `MAX_BODY` gets 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rf"({_TOKEN.pattern}) (\S+) (HTTP/1\.[01])")
# Control characters and non-ASCII bytes are where HTTP parsers disagree (rejected, decoded differently,
# stripped as whitespace or not): a head containing one is never answered by the fast path.
_USUAL_BYTES = b"\t\r\n" + bytes(range(0x20, 0x7F))
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")
# The headers about one connection, which the front rewrites in both directions.
_CONNECTION_HEADERS = frozenset({"connection", "keep-alive"})
# Headers a fast path would have to act on to read the body as the internal server does.
_NOT_PLAIN = frozenset({"transfer-encoding", "content-encoding", "expect"})

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"


class HTTPError(Exception):
    """A request the front answers itself with an error status, then closes the connection."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail

    def response(self) -> bytes:
        body = self.detail.encode()
        return (f"HTTP/1.1 {self.status} {self.reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@dataclass(slots=True)
class Request:
    method: str
    target: str
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: dict[str, str]  # lower-case name -> first value, surrounding blanks stripped
    header_lines: list[str]  # as received (latin-1), for the relay
    plain: bool  # read the same way by any HTTP server: a fast path may answer it (see parse_head)
    well_formed: bool  # every header line parsed; if not, the connection closes after the relayed answer
    keep_alive: bool
    chunked: bool
    body_length: int  # with Content-Length framing
    body: bytes = b""  # as received: still chunked if it came chunked
    continue_sent: bool = False


FastPath = Callable[[Request], bytes | None]
"""The JSON body (already encoded) of a 200 answer to the request, or None: relay it."""


def parse_head(head: bytes) -> Request:
    """The request line and headers (`head` ends with the blank line); HTTPError if its framing is unreadable."""
    text = head[:-4].decode("latin-1")
    lines = text.split("\r\n")
    if text.count("\r") + text.count("\n") != 2 * (len(lines) - 1):  # CRs and LFs not in a CRLF pair
        raise HTTPError(400, "Bad Request", "bare CR or LF in the request head")
    request_line = _REQUEST_LINE.fullmatch(lines[0])
    if request_line is None:
        raise HTTPError(400, "Bad Request", "malformed request line")
    method, target, version = request_line.groups()
    headers, repeated, well_formed = _read_headers(lines[1:])
    chunked, body_length = _framing(headers, repeated)
    plain = (well_formed and not repeated and version == "HTTP/1.1" and not head.translate(None, _USUAL_BYTES)
             and _NOT_PLAIN.isdisjoint(headers))
    return Request(method, target, version, headers, lines[1:], plain, well_formed, _keep_alive(version, headers),
                   chunked, body_length)


def _read_headers(lines: list[str]) -> tuple[dict[str, str], set[str], bool]:
    headers: dict[str, str] = {}
    repeated: set[str] = set()
    well_formed = True
    for line in lines:
        raw_name, colon, value = line.partition(":")
        name = _header_key(raw_name) if colon else None
        if name is None:
            well_formed = False  # obs-fold, blank name, space before the colon: the internal server judges it
            continue
        value = value.strip(" \t")
        if name not in headers:
            headers[name] = value
        elif name == "content-length" and headers[name] != value:
            raise HTTPError(400, "Bad Request", "conflicting Content-Length headers")
        else:
            repeated.add(name)
    return headers, repeated, well_formed


@functools.lru_cache(maxsize=256)  # clients send the same few names again and again; a regex per line costs
def _header_key(raw_name: str) -> str | None:
    """The lower-case header name, or None if `raw_name` is not a token."""
    return raw_name.lower() if _TOKEN.fullmatch(raw_name) else None


def _framing(headers: dict[str, str], repeated: set[str]) -> tuple[bool, int]:
    """(chunked, Content-Length) of the body, as RFC 9112 section 6 frames a request."""
    encoding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if encoding is not None:
        # Both headers, or an encoding that does not end in chunked, are the request-smuggling cases: refuse.
        last_coding = encoding.rsplit(",", 1)[-1].strip().lower()
        if length is not None or "transfer-encoding" in repeated or last_coding != "chunked":
            raise HTTPError(400, "Bad Request", "unsupported Transfer-Encoding")
        return True, 0
    if length is None:
        return False, 0
    if not (length.isascii() and length.isdigit()):
        raise HTTPError(400, "Bad Request", "malformed Content-Length")
    if int(length) > MAX_BODY:
        raise HTTPError(413, "Request Entity Too Large", f"Maximum request body size {MAX_BODY} exceeded")
    return False, int(length)


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection")
    if connection is None:
        return version == "HTTP/1.1"
    options = {option.strip().lower() for option in connection.split(",")}
    return "close" not in options if version == "HTTP/1.1" else "keep-alive" in options


def read_chunked(data: bytes | bytearray, start: int) -> tuple[bytes, int] | None:
    """(payload, end offset) of the chunked body at `data[start:]`, None while incomplete; ValueError if malformed."""
    chunks: list[bytes] = []
    position = start
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return None
        size_line = _CHUNK_SIZE.fullmatch(data, position, line_end)
        if size_line is None:
            raise ValueError("malformed chunk size")
        size = int(size_line.group(1), 16)
        position = line_end + 2
        if size == 0:
            break
        if len(data) < position + size + 2:
            return None
        if data[position + size:position + size + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        chunks.append(bytes(data[position:position + size]))
        position += size + 2
    while True:  # trailer fields (usually none), up to an empty line
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return None
        if line_end == position:
            return b"".join(chunks), position + 2
        position = line_end + 2


def json_response(body: bytes, keep_alive: bool) -> bytes:
    return _JSON_HEAD % len(body) + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n") + body


class LeanHTTPProtocol(asyncio.Protocol):
    """One client connection: requests answered strictly in order, one at a time."""

    def __init__(self, fast_path: FastPath, upstream: tuple[str, int], relays: set[asyncio.Task[None]]) -> None:
        self._fast_path = fast_path
        self._upstream = upstream
        self._relays = relays  # the server's running relays: a task nobody references may be collected
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._request: Request | None = None  # its head is in, its body is not (yet)
        self._relaying = False  # a relay is in flight: later requests wait in the buffer
        self._writer_paused = False  # the client is not reading our answers
        self._client_done = False  # the client half-closed: answer what was asked, then close

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._relaying:
            self._serve_buffered()

    def eof_received(self) -> bool:
        self._client_done = True
        self._close_if_done()
        return True  # keep the transport: a relay in flight still has an answer to write

    def pause_writing(self) -> None:
        self._writer_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writer_paused = False
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._buffer.clear()

    # requests

    def _serve_buffered(self) -> None:
        transport = self._transport
        assert transport is not None
        while not self._relaying and not transport.is_closing():
            try:
                request = self._take_request()
            except HTTPError as error:
                transport.write(error.response())
                transport.close()
                return
            if request is None:
                break
            self._answer(request)
        self._close_if_done()

    def _take_request(self) -> Request | None:
        """The next complete request from the buffer (removed from it), or None until more data arrives."""
        buffer = self._buffer
        if self._request is None:
            while buffer.startswith(b"\r\n"):  # RFC 9112 2.2: ignore empty lines before a request line
                del buffer[:2]
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(buffer) > MAX_HEAD:
                    raise HTTPError(431, "Request Header Fields Too Large", "request head too large")
                return None
            self._request = parse_head(bytes(buffer[:head_end + 4]))
            del buffer[:head_end + 4]
        request = self._request
        end = self._body_end(request)
        if end is None:
            self._send_continue(request)
            return None
        request.body = bytes(buffer[:end])
        del buffer[:end]
        self._request = None
        return request

    def _body_end(self, request: Request) -> int | None:
        if not request.chunked:
            return request.body_length if len(self._buffer) >= request.body_length else None
        try:
            chunked = read_chunked(self._buffer, 0)
        except ValueError:
            raise HTTPError(400, "Bad Request", "malformed chunked body") from None
        if chunked is None and len(self._buffer) > MAX_BODY + MAX_HEAD:
            raise HTTPError(413, "Request Entity Too Large", f"Maximum request body size {MAX_BODY} exceeded")
        return None if chunked is None else chunked[1]

    def _send_continue(self, request: Request) -> None:
        if (not request.continue_sent and request.version == "HTTP/1.1"
                and request.headers.get("expect", "").lower() == "100-continue"):
            assert self._transport is not None
            self._transport.write(_CONTINUE)
            request.continue_sent = True

    def _answer(self, request: Request) -> None:
        assert self._transport is not None
        body = self._fast_path(request) if request.plain else None
        if body is not None:
            self._transport.write(json_response(body, request.keep_alive))
            if not request.keep_alive:
                self._transport.close()
            return
        self._relaying = True
        self._update_reading()
        task = asyncio.get_running_loop().create_task(self._relay(request))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _relay(self, request: Request) -> None:
        try:
            answer = await relay(self._upstream, request)
        except Exception as exc:  # whatever went wrong, the client gets an answer rather than a connection that hangs
            request.keep_alive = False
            answer = HTTPError(502, "Bad Gateway", f"internal server: {exc!r}").response()
        transport = self._transport
        assert transport is not None
        self._relaying = False
        if transport.is_closing():
            return  # the client went away meanwhile
        transport.write(answer)
        if not (request.keep_alive and request.well_formed):
            transport.close()
            return
        self._update_reading()
        self._serve_buffered()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        wanted = not (self._relaying or self._writer_paused)
        if wanted != transport.is_reading():
            (transport.resume_reading if wanted else transport.pause_reading)()

    def _close_if_done(self) -> None:
        if self._client_done and not self._relaying and self._transport is not None:
            self._transport.close()


# the relay


async def relay(upstream: tuple[str, int], request: Request) -> bytes:
    """The internal server's answer to `request`, framed for the client's connection."""
    reader, writer = await asyncio.open_connection(*upstream)
    try:
        writer.write(upstream_request(request))
        # The internal server may answer (an error) without reading the whole body, then close.
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        raw = await reader.read()  # until EOF: it closes after one answer (we sent Connection: close)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return client_response(raw, request)


def upstream_request(request: Request) -> bytes:
    """The request as received, but alone on its connection: `Connection: close` instead of the client's."""
    kept = [line for line in request.header_lines if _header_name(line) not in _CONNECTION_HEADERS]
    head = "\r\n".join([f"{request.method} {request.target} {request.version}", *kept, "Connection: close"])
    return head.encode("latin-1") + b"\r\n\r\n" + request.body


def client_response(raw: bytes, request: Request) -> bytes:
    """The internal server's final response with a Content-Length and the `Connection` header the client needs."""
    status_line, header_lines, body_start = _final_response_head(raw)
    headers = [line for line in header_lines if _header_name(line) not in _CONNECTION_HEADERS]
    body = b""
    if request.method != "HEAD" and _status(status_line) not in (204, 304):
        body = _response_body(raw, body_start, headers)
        headers = _with_content_length(headers, len(body))
    keep_alive = request.keep_alive and request.well_formed
    if request.version == "HTTP/1.1" and not keep_alive:
        headers.append("Connection: close")
    elif request.version == "HTTP/1.0" and keep_alive:  # HTTP/1.0 closes unless told otherwise
        headers.append("Connection: keep-alive")
    return "\r\n".join([status_line, *headers, "", ""]).encode("latin-1") + body


def _with_content_length(header_lines: list[str], length: int) -> list[str]:
    """The header lines framed by Content-Length: `length` where the server put its own (aiohttp always does), or
    at the end; chunked transfer coding and any further Content-Length dropped."""
    framed: list[str] = []
    length_line = f"Content-Length: {length}"
    for line in header_lines:
        name = _header_name(line)
        if name == "content-length" and length_line not in framed:
            framed.append(length_line)
        elif name not in ("content-length", "transfer-encoding"):
            framed.append(line)
    if length_line not in framed:
        framed.append(length_line)
    return framed


def _header_name(line: str) -> str:
    return line.partition(":")[0].strip().lower()


def _header_value(lines: list[str], name: str) -> str | None:
    return next((line.partition(":")[2].strip() for line in lines if _header_name(line) == name), None)


def _status(status_line: str) -> int:
    return int(status_line.split(" ", 2)[1])


def _final_response_head(raw: bytes) -> tuple[str, list[str], int]:
    """(status line, header lines, offset of the body), past any 1xx interim response (`Expect: 100-continue`)."""
    start = 0
    while True:
        head_end = raw.find(b"\r\n\r\n", start)
        if head_end < 0:
            raise ValueError("incomplete response from the internal server")
        status_line, *header_lines = raw[start:head_end].decode("latin-1").split("\r\n")
        if _status(status_line) >= 200:
            return status_line, header_lines, head_end + 4
        start = head_end + 4


def _response_body(raw: bytes, start: int, header_lines: list[str]) -> bytes:
    if "chunked" in (_header_value(header_lines, "transfer-encoding") or "").lower():
        chunked = read_chunked(raw, start)
        if chunked is None:
            raise ValueError("incomplete chunked response from the internal server")
        return chunked[0]
    length = _header_value(header_lines, "content-length")
    if length is not None:
        return raw[start:start + int(length)]
    return raw[start:]  # framed by the end of the connection


async def start_server(host: str, port: int, fast_path: FastPath, upstream: tuple[str, int]) -> asyncio.Server:
    relays: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: LeanHTTPProtocol(fast_path, upstream, relays), host, port, backlog=128)

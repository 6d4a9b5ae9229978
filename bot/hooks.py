"""The webhook door: `POST /hooks/<connection-id>`.

backlog limit (503, see `bot.engine.pacing`) → size limit (413) → connection lookup (404) → the integration's
`verify()` with the connection's secret (401) → `parse()` (400) → stored in the inbox, durably → `202`. Nothing
else happens in the request; the engine takes the event from the inbox.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from sqlalchemy import Select, select

from bot.crypto import Keyring
from bot.engine.pacing import DoorFirst
from bot.errors import DecryptionError
from bot.metrics import Metrics
from bot.store.db import Database
from bot.store.inbox import Inbox, NewEvent
from bot.store.models import Connection, Event, Workspace
from bot.store.storable import storable, storable_value
from integrations.base import BadPayload, IncomingWebhook, Integration, ParsedEvent
from integrations.registry import INTEGRATIONS

log = logging.getLogger(__name__)
# How long another process may still accept a connection's old secret after `/relay connect … rotate`, or its
# webhooks after it is gone. A new secret is accepted at once everywhere: a signature that the cached secret
# rejects is checked again against the stored one.
CACHE_SECONDS = 5.0
BACKLOG_RETRY_AFTER = 30  # seconds
RECHECKS_PER_SECOND = 5
_CONNECTION_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")  # `ids.new_connection_id`


@dataclass
class _Known:
    team_id: str
    integration: str
    secret: str
    expires: float


class ConnectionCache:
    """Decrypted connection secrets for a short while, so a busy connection costs no read per request."""

    def __init__(self) -> None:
        self._entries: dict[str, _Known] = {}

    def get(self, connection_id: str) -> _Known | None:
        entry = self._entries.get(connection_id)
        if entry is None or entry.expires < time.monotonic():
            return None
        return entry

    def put(self, connection_id: str, entry: _Known) -> None:
        self._entries[connection_id] = entry

    def forget(self, connection_id: str | None = None) -> None:
        if connection_id is None:
            self._entries.clear()
        else:
            self._entries.pop(connection_id, None)


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=status)


class WebhookDoor:
    def __init__(self, *, db: Database, keyring: Keyring, inbox: Inbox, metrics: Metrics, max_body: int,
                 on_stored: object, door_first: DoorFirst | None = None, body_timeout: float = 30.0) -> None:
        self.db = db
        self.body_timeout = body_timeout
        self.door_first = door_first or DoorFirst()
        self.keyring = keyring
        self.inbox = inbox
        self.metrics = metrics
        self.max_body = max_body
        self.on_stored = on_stored
        self.cache = ConnectionCache()
        self._integrations: dict[str, Integration] = {name: cls() for name, cls in INTEGRATIONS.items()}
        self._rechecks: dict[str, tuple[float, int]] = {}  # connection → (window start, rereads in it)

    async def _lookup(self, connection_id: str) -> _Known | None:
        """The connection as stored now (and cached for `CACHE_SECONDS`), or None when it is gone."""
        async with self.db.read() as session:
            row = (await session.execute(
                select(Connection).join(Workspace, Workspace.team_id == Connection.team_id)
                .where(Connection.id == connection_id, Workspace.uninstalled_at.is_(None)))).scalar_one_or_none()
            if row is None:
                return None
            try:
                secret = (await self.keyring.open(session, team_id=row.team_id,
                                                  purpose=f"connection:{row.integration}",
                                                  sealed=row.secret_ciphertext)).decode()
            except DecryptionError:
                log.error("connection %s: its secret cannot be decrypted; rejecting its webhooks", connection_id)
                return None
        known = _Known(team_id=row.team_id, integration=row.integration, secret=secret,
                       expires=time.monotonic() + CACHE_SECONDS)
        self.cache.put(connection_id, known)
        return known

    def _may_recheck(self, connection_id: str) -> bool:
        """May a request whose signature failed against the cached secret make this process read the stored one
        again (another process may have rotated it)? A few times a second per connection: enough for the first
        webhooks signed with a new secret, while a flood of bad signatures costs an HMAC each, not a read and a
        decryption."""
        now = time.monotonic()
        started, count = self._rechecks.get(connection_id, (now, 0))
        if now - started >= 1.0:
            started, count = now, 0
        if count >= RECHECKS_PER_SECOND:
            return False
        self._rechecks[connection_id] = (started, count + 1)
        return True

    async def _recent_duplicate(self, team_id: str, source: str, delivery_ids: list[str], window: float
                                ) -> int | None:
        """The id of an event stored under one of `delivery_ids` within the last `window` seconds, if any."""
        async with self.db.read() as session:
            return (await session.execute(recent_duplicate(team_id=team_id, source=source, delivery_ids=delivery_ids,
                                                           since=datetime.now(UTC) - timedelta(seconds=window))
                                          )).scalar_one_or_none()

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The body (decompressed if it came gzip- or deflate-encoded); None when it is larger than allowed.
        Raises `BadPayload` for a body that does not decompress, `TimeoutError` for one that does not arrive
        within `body_timeout`."""
        if request.content_length is not None and request.content_length > self.max_body:
            return None
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > self.max_body:
                        return None
                    chunks.append(chunk)
        except (RequestPayloadError, HttpProcessingError, zlib.error):
            encoding = request.headers.get("Content-Encoding", "")
            raise BadPayload(f"the body is not valid {encoding} data (Content-Encoding)") from None
        return b"".join(chunks)

    async def handle(self, request: web.Request) -> web.Response:
        connection_id = request.match_info["connection_id"]
        if self.door_first.full:
            # Before reading anything: this is the answer that must stay cheap when the engine is far behind.
            self.metrics.events_rejected.labels(source="unknown", reason="backlog").inc()
            return web.json_response(
                {"ok": False, "error": f"too many events are waiting to be processed ({self.door_first.backlog}); "
                                       f"retry later"}, status=503, headers={"Retry-After": str(BACKLOG_RETRY_AFTER)})
        # The body is read before the request counts as waiting at the door: a slow sender uses no CPU, and must
        # not make the engine rest.
        try:
            body = await self._read_body(request)
        except BadPayload as exc:
            self.metrics.events_rejected.labels(source="unknown", reason="malformed").inc()
            refused = _json_error(400, str(exc))
            refused.force_close()  # the rest of the request cannot be read: this connection is done
            return refused
        except TimeoutError:
            self.metrics.events_rejected.labels(source="unknown", reason="timeout").inc()
            refused = _json_error(408, f"the body did not arrive within {self.body_timeout:g} s")
            refused.force_close()
            return refused
        if body is None:
            self.metrics.events_rejected.labels(source="unknown", reason="too_large").inc()
            return _json_error(413, f"the body is larger than {self.max_body} bytes")
        self.door_first.entered()
        try:
            return await self._handle(request, connection_id, body)
        finally:
            self.door_first.left()

    async def _handle(self, request: web.Request, connection_id: str, body: bytes) -> web.Response:
        cached = self.cache.get(connection_id)
        # An id relaybot cannot have made (a NUL in it, which PostgreSQL refuses to compare) is not looked up.
        known = cached or (await self._lookup(connection_id) if _CONNECTION_ID.fullmatch(connection_id) else None)
        if known is None:
            self.metrics.events_rejected.labels(source="unknown", reason="unknown_connection").inc()
            return _json_error(404, "unknown connection")
        integration = self._integrations[known.integration]
        incoming = IncomingWebhook(body=body, headers=request.headers, query=request.query,
                                   remote=request.remote)
        verified = integration.verify(secret=known.secret, request=incoming, now=time.time())
        if not verified and cached is not None and self._may_recheck(connection_id):
            # The secret may have been rotated by another process since it was cached here.
            stored_now = await self._lookup(connection_id)
            if stored_now is None:
                self.cache.forget(connection_id)
            elif stored_now.secret != known.secret:
                known, integration = stored_now, self._integrations[stored_now.integration]
                verified = integration.verify(secret=known.secret, request=incoming, now=time.time())
        if not verified:
            self.metrics.events_rejected.labels(source=known.integration, reason="signature").inc()
            log.info("webhook for connection %s (%s) rejected: bad or missing signature", connection_id,
                     known.integration)
            return _json_error(401, "bad or missing signature")
        try:
            parsed = _checked(integration.parse(incoming))
        except BadPayload as exc:
            self.metrics.events_rejected.labels(source=known.integration, reason="malformed").inc()
            return _json_error(400, str(exc))
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
            # Signed, but not shaped as the tool's events are (a test sent by hand, say): say so, not 500.
            self.metrics.events_rejected.labels(source=known.integration, reason="malformed").inc()
            log.info("webhook for connection %s (%s): the payload is not shaped as its events are: %s: %s",
                     connection_id, known.integration, type(exc).__name__, exc)
            return _json_error(400, f"the payload is not shaped as a {known.integration} event "
                                    f"({type(exc).__name__}: {str(exc)[:200]})")
        if _UNSTORABLE_ESCAPES.search(body):
            parsed.payload = storable_value(parsed.payload)
        delivery = parsed.delivery_id or _fallback_delivery(known.integration, body)
        straddle: dict[str, Any] = {}
        if parsed.dedupe_window is not None and parsed.delivery_id:
            # A content hash is a duplicate only within the window: it is stored with the window-long slice of
            # time it came in, and the same hash is looked up in this slice and the one before.
            current, before, after = content_deliveries(parsed.delivery_id, parsed.dedupe_window, time.time())
            earlier = await self._recent_duplicate(known.team_id, known.integration, [current, before],
                                                   parsed.dedupe_window)
            if earlier is not None:
                self.metrics.events_duplicate.labels(source=known.integration).inc()
                return web.json_response({"ok": True, "event": earlier, "duplicate": True}, status=202)
            delivery = current
            # A copy being stored right now in the neighbouring slice is found where the event is written.
            straddle = {"duplicate_if_stored": (before, after), "duplicate_window": parsed.dedupe_window,
                        "dedupe_group": parsed.delivery_id}
        stored = await self.inbox.store(NewEvent(
            team_id=known.team_id, source=known.integration, delivery_id=delivery_key(delivery),
            kind=storable(parsed.kind, 200), payload=parsed.payload, received_at=datetime.now(UTC),
            summary=storable(parsed.summary, 1000),
            link=storable(parsed.link, 2000) if parsed.link is not None else None,
            headers={storable(name, 200): storable(value, 2000) for name, value in parsed.headers.items()},
            event_name=storable(parsed.event_name, 200) if parsed.event_name is not None else None,
            actionable=parsed.actionable, connection_id=connection_id, source_addr=request.remote, **straddle))
        if stored.duplicate:
            self.metrics.events_duplicate.labels(source=known.integration).inc()
        else:
            self.metrics.events_received.labels(source=known.integration).inc()
            self.on_stored()  # type: ignore[operator]
        # SPEC: a `ping` (a sender testing the connection) is answered 200; every other event 202.
        return web.json_response({"ok": True, "event": stored.event_id, "duplicate": stored.duplicate},
                                 status=202 if parsed.actionable else 200)


def _checked(parsed: ParsedEvent) -> ParsedEvent:
    """What `parse()` read from the payload, as the store needs it: texts are texts (a link that was a number in
    the payload is no link)."""
    if parsed.link is not None and not isinstance(parsed.link, str):
        parsed.link = None
    for name in ("kind", "summary"):
        if not isinstance(getattr(parsed, name), str):
            raise BadPayload(f"the event's {name} is not text")
    if parsed.event_name is not None and not isinstance(parsed.event_name, str):
        parsed.event_name = str(parsed.event_name)
    return parsed


# JSON escapes (and a form's `%00`) that give text a database cannot store: NUL, and UTF-16 surrogates, of which
# a lone one is not Unicode. Raw bytes cannot give either: NUL is not allowed raw in JSON text, and bytes that
# are not UTF-8 are refused before this. Only bodies with one of these are walked.
_UNSTORABLE_ESCAPES = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|%00")


def delivery_key(delivery: str) -> str:
    """A delivery id as stored (200 characters at most): a longer one keeps its start and a hash of the whole,
    so two long ids that differ only at the end stay two deliveries."""
    cleaned = storable(delivery, 10_000)
    if len(cleaned) <= 200 and cleaned == delivery:
        return cleaned
    return f"{cleaned[:135]}~{hashlib.sha256(delivery.encode('utf-8', 'surrogatepass')).hexdigest()}"


def content_deliveries(content_hash: str, window: float, now: float) -> tuple[str, str, str]:
    """The delivery ids of a content hash in the current slice of time `window` seconds long, in the slice
    before and in the one after. Two identical notifications in one slice share an id, so the inbox's unique key
    keeps only one even when both arrive at once (the two peers of an Alertmanager HA pair); two that straddle
    a slice's end are caught by the inbox, which looks for the neighbours' ids in the transaction that stores
    (`NewEvent.duplicate_if_stored`). Lookups are by exact ids, which the unique index answers at once."""
    slice_ = int(now // window)
    return f"{content_hash}@{slice_}", f"{content_hash}@{slice_ - 1}", f"{content_hash}@{slice_ + 1}"


def recent_duplicate(*, team_id: str, source: str, delivery_ids: list[str], since: datetime) -> Select[int]:
    return (select(Event.id).where(Event.team_id == team_id, Event.source == source,
                                   Event.delivery_id.in_(delivery_ids), Event.received_at >= since)
            .order_by(Event.id.desc()).limit(1))


def _fallback_delivery(integration: str, body: bytes) -> str:
    """No delivery id from the sender: every request is its own delivery."""
    return f"auto:{uuid.uuid4().hex}:{hashlib.sha256(body).hexdigest()[:16]}"

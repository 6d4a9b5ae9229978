"""One poll of one subscription: send the request, pick the items, store one event per new item.

The first successful poll of a subscription (or of a changed `request`) only records the keys it finds: it
sets the baseline and starts nothing. Afterwards each item whose key was not seen before becomes one event
(kind `poll`, `event` = the item) for that subscription alone. Events are stored before the keys are recorded,
so a crash in between makes the next poll store them again, and the inbox's unique (team, source, delivery id)
— the delivery id is the subscription and the key — makes that a no-op.

Secrets named in the request are decrypted for this poll only and never stored; what is shown of an error
has them masked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from yarl import URL

from bot.crypto import Keyring
from bot.engine.expressions import CompiledValue, format_value
from bot.engine.intake import params_with_defaults
from bot.engine.loader import CompiledWorkflow
from bot.engine.triggers.config import PollTrigger
from bot.engine.triggers.lease import release
from bot.errors import DecryptionError, ExpressionError
from bot.masking import LogMasker
from bot.store.db import Database
from bot.store.inbox import Inbox, NewEvent
from bot.store.models import PollSeenKey, Secret, Subscription, TriggerState
from integrations.httpclient import BlockedAddress, HttpClient, HttpResponse, RequestFailed, ResponseTooLarge

log = logging.getLogger(__name__)
SOURCE = "poll"
MAX_ITEMS = 1000
# Keys kept per subscription beyond those in the latest answer; an item that drops out of the answer and comes
# back after this many newer keys were seen would count as new again.
KEEP_KEYS = 2000
MAX_BACKOFF = timedelta(hours=1)
ERROR_CHARS = 300
_IN_CHUNK = 500  # keys per `IN (…)` list, well under every database's limit on bound parameters


class PollFailed(Exception):
    """What went wrong, as the subscription's status shows it (secrets masked before it is stored)."""


@dataclass(frozen=True)
class Answer:
    """What a poll found: nothing new since the validators (`not_modified`), or the items by key, in order."""

    not_modified: bool
    items: list[tuple[str, Any]]
    etag: str | None = None
    last_modified: str | None = None


def backoff(every: timedelta, failures: int) -> timedelta:
    """The wait after `failures` failures in a row: twice the interval, then four times, … up to an hour (or
    the interval itself when that is longer)."""
    return min(every * 2 ** min(failures, 20), max(every, MAX_BACKOFF))


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def delivery_id(subscription_id: int, key: str) -> str:
    """Unique per subscription and item: the inbox stores an item of one subscription once, whoever polls."""
    readable = f"{subscription_id}:{key}"
    return readable if len(readable) <= 200 else f"{subscription_id}:sha256:{key_hash(key)}"


def secret_names(request: CompiledValue) -> set[str]:
    names: set[str] = set()
    for template in request.templates():
        for expression in template.expressions():
            names |= set(re.findall(r"\bsecrets\s*\.\s*([A-Za-z_]\w*)", expression.source))
            names |= set(re.findall(r"""\bsecrets\s*\[\s*["']([^"']+)["']\s*\]""", expression.source))
    return names


def _key_text(value: Any, source: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise PollFailed(f"key: `{source}` gave {type(value).__name__}, not text or a number")
    text = format_value(value)
    if not text:
        raise PollFailed(f"key: `{source}` gave an empty key")
    return text


def pick_items(config: PollTrigger, response: HttpResponse, params: dict[str, Any]) -> list[tuple[str, Any]]:
    """(key, item) for each item of the answer, in the answer's order, the first of each key."""
    context = {"response": {"status": response.status, "headers": response.headers,
                            "json": response.json_or_none(), "text": response.text},
               "params": params}
    try:
        items = config.items_expression.evaluate(context)
    except ExpressionError as exc:
        raise PollFailed(f"items: {exc}") from None
    if not isinstance(items, list):
        raise PollFailed(f"items: `{config.items}` gave {type(items).__name__}, not a list")
    if len(items) > MAX_ITEMS:
        raise PollFailed(f"items: `{config.items}` gave {len(items)} items; at most {MAX_ITEMS} "
                         "(narrow it with .filter(…))")
    found: dict[str, Any] = {}
    for item in items:
        try:
            key = _key_text(config.key_expression.evaluate({**context, "item": item}), config.key)
        except ExpressionError as exc:
            raise PollFailed(f"key: {exc}") from None
        # Stored as the event's JSON payload: whatever CEL built must become plain JSON now, not at commit.
        found.setdefault(key, json.loads(json.dumps(item, default=str)))
    return list(found.items())


def _readable_url(url: str) -> str:
    """The URL without its query string or user info, which may carry credentials."""
    try:
        return str(URL(url).with_query(None).with_user(None).with_fragment(None))
    except ValueError:
        return "the URL"


class Poller:
    def __init__(self, *, db: Database, keyring: Keyring, http: HttpClient, inbox: Inbox, log_masker: LogMasker,
                 owner: str, on_stored: Callable[[], None]) -> None:
        self.db = db
        self.keyring = keyring
        self.http = http
        self.inbox = inbox
        self.log_masker = log_masker
        self.owner = owner
        self.on_stored = on_stored

    async def poll(self, state: TriggerState, subscription: Subscription, workflow: CompiledWorkflow,
                   config: PollTrigger, now: datetime) -> None:
        """Poll once for a claimed state row and release it with the outcome."""
        params = params_with_defaults(workflow, subscription.params)
        try:
            secrets = await self._secrets(subscription.team_id, secret_names(config.compiled_request))
        except PollFailed as exc:
            await self._failed(state, config, str(exc)[:ERROR_CHARS], now)
            return
        masker = await self.log_masker.masker_for(secrets.values())  # also masks them in the logs
        try:
            answer = await self._fetch(config, state, params, secrets)
        except PollFailed as exc:
            await self._failed(state, config, masker.text(str(exc))[:ERROR_CHARS], now)
            return
        if answer.not_modified:
            await release(self.db, state, self.owner, last_success_at=now, next_at=now + config.every,
                          failures=0, last_error=None)
            return
        new = await self._unseen(subscription.id, answer.items)
        if state.baseline_at is not None and new:
            # Stored together, so the inbox writes them in one commit, in the answer's order.
            await asyncio.gather(*(self.inbox.store(NewEvent(
                team_id=subscription.team_id, source=SOURCE, delivery_id=delivery_id(subscription.id, key),
                kind=SOURCE, payload=item, received_at=now, summary=f"New item {key}"[:200],
                event_name=SOURCE, subscription_id=subscription.id)) for key, item in new))
            self.on_stored()
            log.info("poll of subscription %s (%s): %d new items", subscription.id, workflow.name, len(new))
        await self._record(state, config, answer, [key for key, _ in new], now)

    async def _secrets(self, team_id: str, names: set[str]) -> dict[str, str]:
        if not names:
            return {}
        values: dict[str, str] = {}
        async with self.db.read() as session:
            rows = await session.execute(select(Secret).where(Secret.team_id == team_id, Secret.name.in_(names)))
            for row in rows.scalars():
                try:
                    values[row.name] = (await self.keyring.open(session, team_id=team_id,
                                                                purpose=f"secret:{row.name}",
                                                                sealed=row.ciphertext)).decode()
                except (DecryptionError, UnicodeDecodeError) as exc:
                    raise PollFailed(f"the secret {row.name} cannot be decrypted ({exc})") from None
        missing = sorted(names - set(values))
        if missing:
            raise PollFailed(f"the secret {', '.join(missing)} is not set in this workspace; an admin can set it "
                             f"with `/relay secret set {missing[0]}`")
        return values

    async def _fetch(self, config: PollTrigger, state: TriggerState, params: dict[str, Any],
                     secrets: dict[str, str]) -> Answer:
        try:
            request = config.compiled_request.render({"params": params, "secrets": secrets})
        except ExpressionError as exc:
            raise PollFailed(f"request: {exc}") from None
        url = format_value(request["url"])
        headers = {name: format_value(value) for name, value in request["headers"].items()}
        query = {name: format_value(value) for name, value in request["query"].items()}
        body = format_value(request["body"]) if request["body"] is not None else None
        given = {name.lower() for name in headers}
        # Validators only after the baseline: a poll that sets the baseline must see the whole answer.
        if state.baseline_at is not None:
            if state.etag and "if-none-match" not in given:
                headers["If-None-Match"] = state.etag
            if state.last_modified and "if-modified-since" not in given:
                headers["If-Modified-Since"] = state.last_modified
        method = config.request.method
        try:
            response = await self.http.request(method, url, headers=headers, json_body=request["json"], data=body,
                                               params=query or None)
        except TimeoutError:
            raise PollFailed(f"{method} {_readable_url(url)}: no answer within {self.http.timeout:g}s") from None
        except RequestFailed as exc:  # it names the request already (where it went, after redirects)
            raise PollFailed(str(exc)) from None
        except (BlockedAddress, ResponseTooLarge) as exc:
            raise PollFailed(f"{method} {_readable_url(url)}: {exc}") from None
        except ValueError as exc:  # a URL that yarl or aiohttp cannot read
            raise PollFailed(f"{method} {_readable_url(url)}: {exc}") from None
        if response.status == 304 and state.baseline_at is not None:
            return Answer(not_modified=True, items=[], etag=response.headers.get("etag"),
                          last_modified=response.headers.get("last-modified"))
        if not 200 <= response.status < 300:
            snippet = " ".join(response.text.split())[:120]
            raise PollFailed(f"{method} {_readable_url(url)} answered {response.status}"
                             + (f": {snippet}" if snippet else ""))
        return Answer(not_modified=False, items=pick_items(config, response, params),
                      etag=response.headers.get("etag"), last_modified=response.headers.get("last-modified"))

    async def _unseen(self, subscription_id: int, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        hashes = [key_hash(key) for key, _ in items]
        seen: set[str] = set()
        async with self.db.read() as session:
            for start in range(0, len(hashes), _IN_CHUNK):
                seen |= set((await session.execute(select(PollSeenKey.key_hash).where(
                    PollSeenKey.subscription_id == subscription_id,
                    PollSeenKey.key_hash.in_(hashes[start:start + _IN_CHUNK])))).scalars())
        return [(key, item) for (key, item), digest in zip(items, hashes, strict=True) if digest not in seen]

    async def _record(self, state: TriggerState, config: PollTrigger, answer: Answer, new_keys: list[str],
                      now: datetime) -> None:
        """Remember the new keys, drop the oldest beyond KEEP_KEYS, and release the state as a success."""
        insert = sqlite_insert if self.db.is_sqlite else pg_insert
        current = {key_hash(key) for key, _ in answer.items}
        async with self.db.write() as session:
            if new_keys:
                await session.execute(insert(PollSeenKey).values([
                    {"subscription_id": state.subscription_id, "key_hash": key_hash(key), "seen_at": now}
                    for key in new_keys]).on_conflict_do_nothing(index_elements=["subscription_id", "key_hash"]))
            await self._prune(session, state.subscription_id, current)
        await release(self.db, state, self.owner, baseline_at=state.baseline_at or now, last_success_at=now,
                      next_at=now + config.every, failures=0, last_error=None,
                      etag=answer.etag, last_modified=answer.last_modified)

    @staticmethod
    async def _prune(session: Any, subscription_id: int, current: set[str]) -> None:
        count = await session.scalar(select(func.count()).select_from(PollSeenKey)
                                     .where(PollSeenKey.subscription_id == subscription_id))
        if not count or count <= KEEP_KEYS:
            return
        cutoff = await session.scalar(select(PollSeenKey.id).where(PollSeenKey.subscription_id == subscription_id)
                                      .order_by(PollSeenKey.id.desc()).offset(KEEP_KEYS).limit(1))
        rows = (await session.execute(select(PollSeenKey.id, PollSeenKey.key_hash).where(
            PollSeenKey.subscription_id == subscription_id, PollSeenKey.id <= cutoff))).all()
        # Keys in the latest answer stay whatever their age, or they would come back as new at the next poll.
        old = [row.id for row in rows if row.key_hash not in current]
        for start in range(0, len(old), _IN_CHUNK):
            await session.execute(delete(PollSeenKey).where(PollSeenKey.id.in_(old[start:start + _IN_CHUNK])))

    async def _failed(self, state: TriggerState, config: PollTrigger, error: str, now: datetime) -> None:
        failures = state.failures + 1
        wait = backoff(config.every, failures)
        log.warning("poll of subscription %s failed (%d in a row; next try in %s): %s", state.subscription_id,
                    failures, wait, error)
        await release(self.db, state, self.owner, failures=failures, last_error=error, last_error_at=now,
                      next_at=now + wait)

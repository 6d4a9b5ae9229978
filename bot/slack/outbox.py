"""The outbox dispatcher: delivers the Slack messages that transitions wrote, in order, paced, retried.

Messages are grouped in lanes (a run's card and thread, or a channel); a lane is delivered one message at a
time in id order, so a thread reads in the order things happened and a reply never precedes its card. A
card row carries no text: the card is rendered from the run's current state when it is delivered, so several
pending card refreshes become one `chat.update`.

Pacing: about `RELAYBOT_SLACK_CHANNEL_RATE` messages per second per channel (a small burst allowed);
`429` pauses the channel for `Retry-After`; `5xx`, timeouts and network errors are retried with backoff;
errors that retrying cannot mend (`channel_not_found`, `not_in_channel`, `invalid_auth` …) fail the lane's
messages and are logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy import text as sql

from bot.engine.journal import CARD, POST, REPLY
from bot.engine.worker import Wakeup, stop_loop
from bot.metrics import Metrics
from bot.slack.blocks import as_dicts, run_card
from bot.slack.client import NoToken, SlackApi
from bot.store.db import Database
from bot.store.models import OutboxMessage, Run, Step

log = logging.getLogger(__name__)

PERMANENT_ERRORS = frozenset({
    "channel_not_found", "not_in_channel", "is_archived", "invalid_auth", "account_inactive", "token_revoked",
    "no_permission", "missing_scope", "not_authed", "msg_too_long", "invalid_blocks", "invalid_arguments",
    "message_not_found", "cant_update_message", "team_access_not_granted", "restricted_action",
    "ekm_access_denied", "channel_is_archived", "no_text", "too_many_attachments",
})
MAX_BACKOFF = 300.0
LANES_PER_ROUND = 64


# The PostgreSQL advisory lock key that serializes lane claims (any constant unique to relaybot).
CLAIM_LOCK = 0x52454C41  # "RELA"
METADATA_EVENT = "relaybot_message"


def _metadata(**payload: Any) -> dict[str, Any]:
    """Message metadata that lets a later delivery recognise this message in the channel's history."""
    return {"event_type": METADATA_EVENT, "event_payload": payload}


class PermanentFailure(Exception):
    pass


class RetryLater(Exception):
    def __init__(self, delay: float, reason: str, *, rate_limited: bool = False) -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason
        self.rate_limited = rate_limited


@dataclass
class _Bucket:
    """A token bucket per channel: `rate` per second, bursts of `burst`."""

    rate: float
    burst: float
    tokens: float
    updated: float
    paused_until: float = 0.0

    def delay(self, now: float) -> float:
        if now < self.paused_until:
            return self.paused_until - now
        if self.rate <= 0:
            return 0.0
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            return 0.0
        return (1 - self.tokens) / self.rate

    def take(self) -> None:
        if self.rate > 0:
            self.tokens -= 1


class Outbox:
    def __init__(self, *, db: Database, slack: SlackApi, metrics: Metrics, owner: str, rate: float,
                 poll_interval: float = 1.0, lease: timedelta = timedelta(seconds=60), burst: float = 3.0,
                 concurrency: int = 32,
                 on_undeliverable: Callable[[OutboxMessage, str], Awaitable[None]] | None = None) -> None:
        self.on_undeliverable = on_undeliverable
        self.db = db
        self.slack = slack
        self.metrics = metrics
        self.owner = owner
        self.rate = rate
        self.burst = burst
        self.poll_interval = poll_interval
        self.lease = lease
        self.concurrency = concurrency
        self.wakeup = Wakeup()
        self._buckets: dict[str, _Bucket] = {}
        self._active: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._suspect: set[int] = set()
        metrics.on_scrape(self._refresh_depth)

    def wake(self) -> None:
        self.wakeup.set()

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="relaybot-outbox")

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        if self._task:
            await stop_loop(self._task, self.wakeup)
        if self._active:
            _done, pending = await asyncio.wait(list(self._active.values()), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _refresh_depth(self) -> None:
        async with self.db.read() as session:
            depth = await session.scalar(select(func.count()).select_from(OutboxMessage)
                                         .where(OutboxMessage.state == "pending"))
        self.metrics.outbox_depth.set(depth or 0)

    def _bucket(self, channel: str) -> _Bucket:
        bucket = self._buckets.get(channel)
        if bucket is None:
            bucket = _Bucket(rate=self.rate, burst=self.burst, tokens=self.burst, updated=time.monotonic())
            self._buckets[channel] = bucket
        return bucket

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                started = await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox round failed; retrying")
                started = 0
            if not started:
                await self.wakeup.wait(self.poll_interval)

    async def tick(self) -> int:
        """Claim lanes that have deliverable messages and start delivering them; returns lanes started."""
        free = self.concurrency - len(self._active)
        if free <= 0:
            return 0
        now = datetime.now(UTC)
        lease_free = or_(OutboxMessage.lease_until.is_(None), OutboxMessage.lease_until < now)
        async with self.db.write() as session:
            if not self.db.is_sqlite:
                # One claimer at a time across processes (SQLite's write lock already is one): otherwise two
                # processes could each claim part of a lane and deliver it out of order, or twice.
                await session.execute(sql("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK})
            # Lanes whose first pending message is due and not leased by anyone.
            heads = (select(OutboxMessage.lane, func.min(OutboxMessage.id).label("head"))
                     .where(OutboxMessage.state == "pending").group_by(OutboxMessage.lane).subquery())
            query = (select(OutboxMessage.lane).join(heads, and_(OutboxMessage.id == heads.c.head))
                     .where(OutboxMessage.not_before <= now, lease_free)
                     .order_by(OutboxMessage.id).limit(min(free, LANES_PER_ROUND)))
            lanes = [lane for lane in (await session.execute(query)).scalars() if lane not in self._active]
            if not lanes:
                return 0
            # Messages leased by a process that stopped mid-delivery may have reached Slack already.
            self._suspect |= set((await session.execute(select(OutboxMessage.id).where(
                OutboxMessage.lane.in_(lanes), OutboxMessage.state == "pending",
                OutboxMessage.lease_owner.is_not(None)))).scalars())
            await session.execute(update(OutboxMessage)
                                  .where(OutboxMessage.lane.in_(lanes), OutboxMessage.state == "pending")
                                  .values(lease_owner=self.owner, lease_until=now + self.lease))
        for lane in lanes:
            self._active[lane] = asyncio.create_task(self._deliver_lane(lane), name=f"outbox-{lane}")
        return len(lanes)

    async def _renew(self, lane: str) -> None:
        """Keep the lane's lease while delivering (a 429 wait can be long): a live deliverer is never overtaken."""
        while True:
            await asyncio.sleep(max(self.lease.total_seconds() / 3, 0.05))
            now = datetime.now(UTC)
            async with self.db.write() as session:
                await session.execute(update(OutboxMessage).where(
                    OutboxMessage.lane == lane, OutboxMessage.state == "pending",
                    OutboxMessage.lease_owner == self.owner, OutboxMessage.lease_until > now)
                    .values(lease_until=now + self.lease))

    async def _deliver_lane(self, lane: str) -> None:
        renewer = asyncio.create_task(self._renew(lane))
        try:
            await self._drain(lane)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("outbox lane %s failed; it will be retried", lane)
        finally:
            renewer.cancel()
            self._active.pop(lane, None)
            async with self.db.write() as session:
                await session.execute(update(OutboxMessage)
                                      .where(OutboxMessage.lane == lane, OutboxMessage.lease_owner == self.owner)
                                      .values(lease_owner=None, lease_until=None))
            self.wakeup.set()

    async def _pending(self, lane: str) -> list[OutboxMessage]:
        async with self.db.read() as session:
            rows = await session.execute(select(OutboxMessage).where(
                OutboxMessage.lane == lane, OutboxMessage.state == "pending",
                OutboxMessage.lease_owner == self.owner, OutboxMessage.lease_until > datetime.now(UTC))
                .order_by(OutboxMessage.id))
            return list(rows.scalars())

    async def _drain(self, lane: str) -> None:
        """Deliver the lane's claimed messages in order until none are left or one must wait."""
        while True:
            messages = await self._pending(lane)
            if not messages:
                return
            head = messages[0]
            if head.not_before > datetime.now(UTC):
                return
            try:
                await self._deliver(head, messages)
            except RetryLater as later:
                await self._postpone(lane, head, later)
                return
            except PermanentFailure as failure:
                await self._fail_lane(lane, head, str(failure))
                return

    async def _wait_for_channel(self, channel: str) -> None:
        bucket = self._bucket(channel)
        while True:
            delay = bucket.delay(time.monotonic())
            if delay <= 0:
                bucket.take()
                return
            await asyncio.sleep(delay)

    async def _call(self, team_id: str, pace_channel: str, method: str, /, **arguments: Any) -> dict[str, Any]:
        await self._wait_for_channel(pace_channel)
        try:
            return await self.slack.call(team_id, method, **arguments)
        except SlackApiError as exc:
            error = str(exc.response.get("error", "error"))
            status = exc.response.status_code
            if status == 429 or error == "ratelimited":
                retry_after = float(exc.response.headers.get("Retry-After", "1") or 1)
                self._bucket(pace_channel).paused_until = time.monotonic() + retry_after
                self.metrics.slack_retries.labels(method=method, reason="429").inc()
                raise RetryLater(retry_after, f"rate limited ({retry_after:g}s)", rate_limited=True) from None
            if status >= 500 or error in ("internal_error", "fatal_error", "service_unavailable", "request_timeout"):
                self.metrics.slack_retries.labels(method=method, reason="5xx").inc()
                raise RetryLater(0, f"Slack error {status} {error}") from None
            if error in PERMANENT_ERRORS:
                raise PermanentFailure(f"{method}: {error}") from None
            raise RetryLater(0, f"{method}: {error}") from None
        except NoToken as exc:
            raise PermanentFailure(str(exc)) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.metrics.slack_retries.labels(method=method, reason="network").inc()
            raise RetryLater(0, f"{method}: {type(exc).__name__} {exc}") from None

    async def _already_posted(self, head: OutboxMessage, *, thread_ts: str | None, card_of: str | None
                              ) -> str | None:
        """The ts of this message if an earlier, interrupted delivery did post it (found by its metadata)."""
        if head.id not in self._suspect:
            return None
        self._suspect.discard(head.id)
        if thread_ts:
            method, arguments = "conversations.replies", {"ts": thread_ts}
        else:
            method = "conversations.history"
            arguments = {"oldest": f"{head.created_at.timestamp() - 60:.6f}"}
        try:
            found = await self.slack.call(head.team_id, method, channel=head.channel_id, limit=200,
                                          include_all_metadata=True, **arguments)
        except Exception as exc:  # a missing scope or an outage: deliver, at least once
            log.warning("outbox: could not check whether message %s was already posted: %s", head.id, exc)
            return None
        for message in found.get("messages") or []:
            payload = ((message.get("metadata") or {}).get("event_payload")) or {}
            if payload.get("outbox") == head.id or (card_of and payload.get("card") == card_of):
                log.info("outbox: message %s was already posted (ts %s); not posting it again", head.id,
                         message.get("ts"))
                return str(message["ts"])
        return None

    async def _deliver(self, head: OutboxMessage, lane_messages: list[OutboxMessage]) -> None:
        if head.kind == POST:
            ts = await self._already_posted(head, thread_ts=None, card_of=None)
            if ts is None:
                result = await self._call(head.team_id, head.channel_id, "chat.postMessage",
                                          channel=head.channel_id, metadata=_metadata(outbox=head.id),
                                          **head.payload)
                ts = result.get("ts")
            await self._mark_sent([head.id], ts)
            return
        run_id = head.run_id
        assert run_id is not None
        async with self.db.read() as session:
            run = await session.get(Run, run_id)
            if run is None:
                raise PermanentFailure(f"run {run_id} is gone")
            card_ts = run.card_ts
        if card_ts is None:
            # The card goes first, whatever row is at the head: replies need its ts for their thread.
            card_rows = [m.id for m in lane_messages if m.kind == CARD and m.id <= head.id] or []
            ts = await self._already_posted(head, thread_ts=None, card_of=run_id)
            if ts is None:
                ts = await self._post_card(run_id, update_ts=None)
            else:
                await self._store_card_ts(run_id, ts)
            await self._mark_sent(card_rows, ts)
            return
        if head.kind == REPLY:
            ts = await self._already_posted(head, thread_ts=card_ts, card_of=None)
            if ts is None:
                result = await self._call(head.team_id, head.channel_id, "chat.postMessage",
                                          channel=head.channel_id, thread_ts=card_ts,
                                          metadata=_metadata(outbox=head.id), **head.payload)
                ts = result.get("ts")
            await self._mark_sent([head.id], ts)
            return
        # A card refresh: skip it when a later refresh is also waiting (the later one shows the newer state).
        later_cards = [m for m in lane_messages if m.kind == CARD and m.id > head.id]
        if later_cards:
            await self._mark_sent([head.id], None, superseded=True)
            return
        await self._post_card(run_id, update_ts=card_ts)
        await self._mark_sent([head.id], card_ts)

    async def _post_card(self, run_id: str, *, update_ts: str | None) -> str:
        async with self.db.read() as session:
            run = await session.get(Run, run_id)
            assert run is not None
            steps = list((await session.execute(select(Step).where(Step.run_id == run_id)
                                                .order_by(Step.position))).scalars())
        text, blocks = run_card(run, steps)
        if update_ts is None:
            result = await self._call(run.team_id, run.channel_id, "chat.postMessage", channel=run.channel_id,
                                      text=text, blocks=as_dicts(blocks), metadata=_metadata(card=run_id))
            ts = str(result["ts"])
            await self._store_card_ts(run_id, ts)
            return ts
        await self._call(run.team_id, run.channel_id, "chat.update", channel=run.channel_id, ts=update_ts,
                         text=text, blocks=as_dicts(blocks))
        return update_ts

    async def _store_card_ts(self, run_id: str, ts: str) -> None:
        async with self.db.write() as session:
            await session.execute(update(Run).where(Run.id == run_id, Run.card_ts.is_(None)).values(card_ts=ts))

    async def _mark_sent(self, ids: list[int], ts: str | None, *, superseded: bool = False) -> None:
        if not ids:
            return
        async with self.db.write() as session:
            await session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(ids)).values(
                state="superseded" if superseded else "sent", sent_at=datetime.now(UTC), result_ts=ts,
                lease_owner=None, lease_until=None))

    async def _postpone(self, lane: str, head: OutboxMessage, later: RetryLater) -> None:
        attempts = head.attempts + (0 if later.rate_limited else 1)
        delay = later.delay if later.rate_limited else min(MAX_BACKOFF, 2 ** min(attempts, 9) * 0.5)
        log.info("outbox: %s (lane %s) postponed %.1fs: %s", head.kind, lane, delay, later.reason)
        async with self.db.write() as session:
            await session.execute(update(OutboxMessage).where(OutboxMessage.id == head.id).values(
                attempts=attempts, last_error=later.reason,
                not_before=datetime.now(UTC) + timedelta(seconds=delay)))

    async def _fail_lane(self, lane: str, head: OutboxMessage, reason: str) -> None:
        # Without the head message (usually the card) the rest of the lane cannot be delivered either.
        log.error("outbox: giving up on lane %s in channel %s of workspace %s: %s", lane, head.channel_id,
                  head.team_id, reason)
        async with self.db.write() as session:
            await session.execute(update(OutboxMessage).where(OutboxMessage.lane == lane,
                                                              OutboxMessage.state == "pending").values(
                state="failed", last_error=reason, lease_owner=None, lease_until=None))
        if self.on_undeliverable is not None:
            try:
                await self.on_undeliverable(head, reason)
            except Exception:
                log.exception("could not tell anyone that lane %s is undeliverable", lane)

    async def drain(self, timeout: float) -> None:
        """Deliver what is due, for at most `timeout` seconds (used on shutdown); the rest waits for a restart."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not await self.idle():
            await self.tick()
            await asyncio.sleep(0.05)

    async def idle(self) -> bool:
        if self._active:
            return False
        async with self.db.read() as session:
            due = await session.scalar(select(func.count()).select_from(OutboxMessage).where(
                OutboxMessage.state == "pending", OutboxMessage.not_before <= datetime.now(UTC)))
        return not due


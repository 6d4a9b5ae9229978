"""The outbox dispatcher: delivers the Slack messages that transitions wrote, in order, paced, retried.

Messages are grouped in lanes (a run's card and thread, or one workspace's messages to a channel); a lane is
delivered one message at a time in id order, so a thread reads in the order things happened and a reply never
precedes its card. A card row carries no text: the card is rendered from the run's current state when it is
delivered, so several pending card refreshes become one `chat.update`.

Pacing: about `RELAYBOT_SLACK_CHANNEL_RATE` messages per second per channel (a small burst allowed);
`429` pauses the channel for `Retry-After`; `5xx`, timeouts and network errors are retried with backoff (a post
whose answer was lost or a 5xx is looked for in Slack first, by its metadata, as after a crash);
errors that retrying cannot mend (`channel_not_found`, `not_in_channel`, `invalid_auth` …) fail the lane's
messages and are logged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
from slack_sdk.errors import SlackApiError
from sqlalchemy import ColumnElement, Select, Table, and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.engine.journal import CARD, POST, REPLY
from bot.engine.loops import WorkLoop
from bot.engine.states import FINAL_RUN_STATES
from bot.metrics import Metrics
from bot.slack.blocks import as_dicts, run_card
from bot.slack.client import NoToken, SlackApi
from bot.store.batching import GroupCommit
from bot.store.db import Database, insert_later, take_later
from bot.store.models import OutboxMessage, Run, Step
from bot.store.plans import in_index_order

log = logging.getLogger(__name__)

PERMANENT_ERRORS = frozenset({
    "channel_not_found", "not_in_channel", "is_archived", "invalid_auth", "account_inactive", "token_revoked",
    "no_permission", "missing_scope", "not_authed", "msg_too_long", "invalid_blocks", "invalid_arguments",
    "message_not_found", "cant_update_message", "team_access_not_granted", "restricted_action",
    "ekm_access_denied", "channel_is_archived", "no_text", "too_many_attachments",
})
MAX_BACKOFF = 300.0
HISTORY_PAGE = 999  # the most Slack returns per page
HISTORY_PAGES = 5
LANES_PER_ROUND = 64
SCAN_ROWS = 2048  # pending messages read to find lanes to claim, before falling back to every lane's head
SCAN_PAGE = 256

METADATA_EVENT = "relaybot_message"


def _metadata(**payload: Any) -> dict[str, Any]:
    """Message metadata that lets a later delivery recognise this message in the channel's history."""
    return {"event_type": METADATA_EVENT, "event_payload": payload}


# The busy path's statements, built once (building a statement cost more than running it).
_RUNS = cast(Table, Run.__table__)
_OUTBOX = cast(Table, OutboxMessage.__table__)
_SET_CARD_TS = (update(_RUNS).where(_RUNS.c.id == bindparam("run"), _RUNS.c.card_ts.is_(None))
                .values(card_ts=bindparam("ts")))
_MARK_SENT = (update(_OUTBOX).where(_OUTBOX.c.id == bindparam("message"))
              .values(state="sent", sent_at=bindparam("now"), result_ts=bindparam("ts")))
# PostgreSQL: the same two updates, each one statement for the whole batch, its rows passed as arrays. Run once
# per row (asyncpg's executemany), each execution cost PostgreSQL about 7 µs more than its row in one statement.
_SET_CARD_TS_BATCH = text(
    "UPDATE runs SET card_ts = batch.ts FROM unnest(CAST(:runs AS VARCHAR[]), CAST(:ts AS VARCHAR[])) "
    "AS batch(id, ts) WHERE runs.id = batch.id AND runs.card_ts IS NULL")
_MARK_SENT_BATCH = text(
    "UPDATE outbox SET state = 'sent', sent_at = :now, result_ts = batch.ts "
    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:ts AS VARCHAR[])) AS batch(id, ts) WHERE outbox.id = batch.id")
_INSERT_RETURNING_IDS = insert(_OUTBOX).returning(_OUTBOX.c.id)
_INSERT_RETURNING_IDS_IN_ORDER = insert(_OUTBOX).returning(_OUTBOX.c.id, sort_by_parameter_order=True)


def _deliverable(now: datetime) -> ColumnElement[bool]:
    """A lane whose first pending message is this one could be claimed now: it is due and nobody's lease."""
    return and_(OutboxMessage.not_before <= now,
                or_(OutboxMessage.lease_until.is_(None), OutboxMessage.lease_until < now))


def pending_page(*, after: int, now: datetime) -> Select[int, str, bool]:
    """The next `SCAN_PAGE` pending messages after message `after`, in id order, each with its lane and whether
    it could be delivered now (walks `ix_outbox_pending`; on PostgreSQL inside `in_index_order`)."""
    return (select(OutboxMessage.id, OutboxMessage.lane, _deliverable(now).label("usable"))
            .where(OutboxMessage.state == "pending", OutboxMessage.id > after)
            .order_by(OutboxMessage.id).limit(SCAN_PAGE))


@dataclass
class _Delivery:
    """One lane being delivered: what was read at the start, and what happened, written back at the end."""

    lane: str
    rows: list[OutboxMessage]
    run: Run | None
    steps: list[Step]
    card_ts: str | None
    new_card_ts: str | None = None
    shown: list[dict[str, Any]] | None = None
    sent: dict[int, str | None] = field(default_factory=dict)
    superseded: list[int] = field(default_factory=list)
    postponed: tuple[OutboxMessage, RetryLater] | None = None
    failed: tuple[OutboxMessage, str] | None = None
    # Until when (time.monotonic) this process may still post for the lane: its lease, less a safety margin.
    holds_until: float = 0.0
    lost: bool = False


class PermanentFailure(Exception):
    pass


class LeaseLost(Exception):
    """Another process has taken the lane over (this one stalled past its lease): it must not post any more."""


class RetryLater(Exception):
    """`maybe_sent`: the post may have reached Slack (a 5xx or a lost answer), so whoever delivers the message
    next looks for it in Slack first."""

    def __init__(self, delay: float, reason: str, *, rate_limited: bool = False, maybe_sent: bool = False) -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason
        self.rate_limited = rate_limited
        self.maybe_sent = maybe_sent


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


class Outbox(WorkLoop):
    name = "outbox"

    def __init__(self, *, db: Database, slack: SlackApi, metrics: Metrics, owner: str, rate: float,
                 poll_interval: float = 1.0, lease: timedelta = timedelta(seconds=60), burst: float = 3.0,
                 concurrency: int = 128,
                 on_undeliverable: Callable[[OutboxMessage, str], Awaitable[None]] | None = None) -> None:
        super().__init__(interval=poll_interval)
        self.on_undeliverable = on_undeliverable
        self.db = db
        self.slack = slack
        self.metrics = metrics
        self.owner = owner
        self.rate = rate
        self.burst = burst
        self.lease = lease
        self.concurrency = concurrency
        self._buckets: dict[str, _Bucket] = {}
        self._suspect: set[int] = set()
        self._flushes: GroupCommit[_Delivery, None] = GroupCommit(self._flush, name="outbox")
        self._look_again = True  # lanes may be waiting that no claim has taken yet
        metrics.on_scrape(self._refresh_depth)

    async def after_stop(self) -> None:
        await self._flushes.close()

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

    async def tick(self) -> int:
        """Claim lanes that have deliverable messages and start delivering them; returns lanes started."""
        free = self.concurrency - len(self._active)
        if free <= 0:
            self._look_again = True
            return 0
        holds_until = time.monotonic() + self._holding_time()
        now = datetime.now(UTC)
        wanted = min(free, LANES_PER_ROUND)
        # Looked for outside the write transaction: on SQLite the door waits for that lock, and on PostgreSQL
        # other processes' claims would (they once waited 37 ms per claim for one lock held over the scan).
        heads = await self.db.reading(functools.partial(self._claimable_lanes, now=now, wanted=wanted,
                                                        exclude=set(self._active),
                                                        postgres=not self.db.is_sqlite))
        self._look_again = len(heads) == wanted
        if not heads:
            return 0
        lanes, suspect, deliveries = await self.db.transaction(functools.partial(self._claim, heads=heads, now=now))
        if not lanes:
            return 0
        self._suspect |= suspect
        for delivery in deliveries.values():
            delivery.holds_until = holds_until
        for lane in lanes:
            self._active[lane] = asyncio.create_task(self._deliver_lane(lane, deliveries.get(lane)),
                                                     name=f"outbox-{lane}")
        return len(lanes)

    async def _claim(self, session: AsyncSession, *, heads: dict[str, int], now: datetime
                     ) -> tuple[list[str], set[int], dict[str, _Delivery]]:
        """Lease the lanes whose first pending messages `_claimable_lanes` found, except those another process
        took meanwhile; returns the lanes taken, the ids of messages a stopped process may have posted, and the
        lanes' messages.

        Every claimer of a lane must lock its first pending message, so two processes cannot both take one
        (SQLite's write lock already makes claims exclusive). A head being claimed right now is skipped, not
        waited for; one claimed since the scan fails the check again once its claimer commits, as PostgreSQL
        re-reads a row changed since the statement began before it locks it. A head that is no longer pending
        (a stalled deliverer finished it meanwhile) is left for the next round's scan. Should two claimers lock
        different heads of one lane (a message with a smaller id committed between their scans), each then
        waits for the other's lock: PostgreSQL ends one of the two claims, which is tried again next round.
        """
        still_free = (select(OutboxMessage.lane)
                      .where(OutboxMessage.id.in_(list(heads.values())), OutboxMessage.state == "pending",
                             _deliverable(now))
                      .order_by(OutboxMessage.id).with_for_update(**self.db.skip_locked()))
        lanes = list((await session.execute(still_free)).scalars())
        if not lanes:
            return [], set(), {}
        # Messages leased by a process that stopped mid-delivery may have reached Slack already.
        suspect = set((await session.execute(select(OutboxMessage.id).where(
            OutboxMessage.lane.in_(lanes), OutboxMessage.state == "pending",
            OutboxMessage.lease_owner.is_not(None)))).scalars())
        await session.execute(update(OutboxMessage)
                              .where(OutboxMessage.lane.in_(lanes), OutboxMessage.state == "pending")
                              .values(lease_owner=self.owner, lease_until=now + self.lease))
        return lanes, suspect, await self._load_lanes(session, lanes)

    @staticmethod
    async def _claimable_lanes(session: AsyncSession, *, now: datetime, wanted: int, exclude: set[Hashable],
                               postgres: bool = False) -> dict[str, int]:
        """Lanes whose first pending message is due and leased by nobody, oldest first, each with the id of
        that message (its head).

        Read from the oldest pending messages (the first one seen of a lane is its head), which costs the same
        however long the queue is; only when those are all held up is every lane's head looked up.
        """
        seen: set[str] = set()
        lanes: dict[str, int] = {}
        after, scanned = 0, 0
        async with in_index_order(session, postgres=postgres):
            while scanned < SCAN_ROWS:
                page = (await session.execute(pending_page(after=after, now=now))).all()
                for message_id, lane, lane_usable in page:
                    after = message_id
                    if lane in seen:
                        continue
                    seen.add(lane)
                    if lane_usable and lane not in exclude:
                        lanes[lane] = message_id
                        if len(lanes) == wanted:
                            return lanes
                scanned += len(page)
                if len(page) < SCAN_PAGE:
                    return lanes
        heads = (select(OutboxMessage.lane, func.min(OutboxMessage.id).label("head"))
                 .where(OutboxMessage.state == "pending").group_by(OutboxMessage.lane).subquery())
        query = (select(OutboxMessage.lane, OutboxMessage.id).join(heads, OutboxMessage.id == heads.c.head)
                 .where(_deliverable(now)).order_by(OutboxMessage.id).limit(wanted + len(exclude)))
        found = [(lane, head) for lane, head in (await session.execute(query)).all() if lane not in exclude]
        return dict(found[:wanted])

    async def _load_lanes(self, session: AsyncSession, lanes: list[str]) -> dict[str, _Delivery]:
        """The claimed lanes' messages, with their runs and steps: read once, in the claiming transaction."""
        rows = list((await session.execute(select(OutboxMessage).where(
            OutboxMessage.lane.in_(lanes), OutboxMessage.state == "pending", OutboxMessage.lease_owner == self.owner)
            .order_by(OutboxMessage.lane, OutboxMessage.id))).scalars())
        run_ids = {row.run_id for row in rows if row.run_id}
        runs = {run.id: run for run in (await session.execute(select(Run).where(Run.id.in_(run_ids)))).scalars()}
        steps: dict[str, list[Step]] = {}
        for step in (await session.execute(select(Step).where(Step.run_id.in_(run_ids))
                                           .order_by(Step.run_id, Step.position))).scalars():
            steps.setdefault(step.run_id, []).append(step)
        deliveries: dict[str, _Delivery] = {}
        for row in rows:
            delivery = deliveries.get(row.lane)
            if delivery is None:
                run = runs.get(row.run_id) if row.run_id else None
                delivery = deliveries[row.lane] = _Delivery(
                    lane=row.lane, rows=[], run=run, steps=steps.get(row.run_id or "", []),
                    card_ts=run.card_ts if run else None)
            delivery.rows.append(row)
        return deliveries

    def room(self) -> int:
        """How many more lanes this process would deliver at once now (0 when its outbox is not running)."""
        return max(self.concurrency - len(self._active), 0) if self.running else 0

    async def lease_new_runs(self, session: AsyncSession, runs: list[tuple[Run, list[Step]]], *, now: datetime
                             ) -> list[_Delivery]:
        """Inside the transaction that starts these runs: lease their lanes to this process at once, so that
        their cards go out as soon as it commits (`deliver_leased`), without a claiming round trip. The caller
        passes no more runs than `room()` allowed.

        Nobody else can see a lane before that commit, so taking it here is as safe as a claim; if this
        process dies first, the lease runs out and any process delivers the lane as usual. The messages are
        written already leased, their ids returned by the insert itself: one statement, and nothing to read
        back (an update of the new rows, returning them, had cost more than the insert).
        """
        queued = take_later(session, OutboxMessage)
        if not runs or not queued:
            for row in queued:
                insert_later(session, OutboxMessage, row)
            return []
        lanes = {run.id for run, _ in runs}
        until = now + self.lease
        for row in queued:
            leased = row["lane"] in lanes
            row["lease_owner"] = self.owner if leased else None
            row["lease_until"] = until if leased else None
        if self.db.is_sqlite:
            # One multi-row INSERT; SQLite numbers the rows in the order of its VALUES (each new row's id is one
            # more than the largest), so the ids in ascending order are the rows' ids in queue order. (Asking
            # SQLAlchemy to keep the order makes it insert one row per statement on SQLite.)
            ids = sorted((await session.execute(_INSERT_RETURNING_IDS, queued)).scalars())
        else:
            ids = list((await session.execute(_INSERT_RETURNING_IDS_IN_ORDER, queued)).scalars())
        by_lane: dict[str, list[Any]] = {}
        for message_id, row in zip(ids, queued, strict=True):
            if row["lease_owner"] is not None:
                by_lane.setdefault(row["lane"], []).append(SimpleNamespace(id=message_id, **row))
        return [_Delivery(lane=run.id, rows=by_lane[run.id], run=run, steps=steps, card_ts=None)
                for run, steps in runs if run.id in by_lane]

    def deliver_leased(self, deliveries: list[_Delivery]) -> None:
        """Start delivering the lanes `lease_new_runs` leased, once their transaction has committed."""
        holds_until = time.monotonic() + self._holding_time()
        for delivery in deliveries:
            delivery.holds_until = holds_until
            self._active[delivery.lane] = asyncio.create_task(self._deliver_lane(delivery.lane, delivery),
                                                              name=f"outbox-{delivery.lane}")

    def _holding_time(self) -> float:
        """How long after (re)taking a lease this process still posts: the lease less half of it, so that a
        post begun in time reaches Slack before another process may take the lane over and look at the
        channel's history for what was already posted."""
        return self.lease.total_seconds() / 2

    async def _renew(self, delivery: _Delivery) -> bool:
        """Extend the lane's lease, unless another process has taken it over; False when it has."""
        holds_until = time.monotonic() + self._holding_time()
        now = datetime.now(UTC)
        # Only a claim changes the owner, so a lease that ran out but was not taken over is still ours.
        async with self.db.write() as session:
            renewed = await session.execute(update(OutboxMessage).where(
                OutboxMessage.lane == delivery.lane, OutboxMessage.state == "pending",
                OutboxMessage.lease_owner == self.owner).values(lease_until=now + self.lease))
        if renewed.rowcount:  # type: ignore[attr-defined]
            delivery.holds_until = max(delivery.holds_until, holds_until)
            return True
        if any(row.id not in delivery.sent and row.id not in delivery.superseded for row in delivery.rows):
            delivery.lost = True
        return False

    async def _keep_lease(self, delivery: _Delivery) -> None:
        """Keep the lane's lease while delivering (a 429 wait can be long): a live deliverer is not overtaken."""
        while not delivery.lost:
            await asyncio.sleep(max(self._holding_time() / 2, 0.05))
            await self._renew(delivery)

    async def _hold_lease(self, delivery: _Delivery) -> None:
        """Called before each Slack call: a process that stalled past its margin renews first, and stops if
        another has taken the lane meanwhile, so the two never post the same message."""
        if not delivery.lost and time.monotonic() < delivery.holds_until:
            return
        if delivery.lost or not await self._renew(delivery):
            delivery.lost = True
            raise LeaseLost(delivery.lane)

    async def _deliver_lane(self, lane: str, delivery: _Delivery | None) -> None:
        delivery = delivery or _Delivery(lane=lane, rows=[], run=None, steps=[], card_ts=None)
        nudged = self.wakeup.count
        renewer = asyncio.create_task(self._keep_lease(delivery))
        try:
            await self._drain(delivery)
        except asyncio.CancelledError:
            raise
        except LeaseLost:
            log.warning("outbox lane %s was taken over by another process while this one stalled; leaving it",
                        lane)
        except Exception:
            log.exception("outbox lane %s failed; it will be retried", lane)
        finally:
            renewer.cancel()
            self._active.pop(lane, None)
            try:
                await self._flushes.submit(delivery)
            except Exception:
                log.exception("outbox lane %s: recording its delivery failed; its lease will expire", lane)
            if delivery.failed is not None and self.on_undeliverable is not None:
                try:
                    await self.on_undeliverable(*delivery.failed)
                except Exception:
                    log.exception("could not tell anyone that lane %s is undeliverable", lane)
            # A free slot is worth a claim only if lanes may be waiting: the last claim was full or skipped, or
            # new messages were committed meanwhile (perhaps in this very lane, which no claim could take then).
            if self._look_again or self.wakeup.count != nudged:
                self.wakeup.set(news=False)

    async def _drain(self, delivery: _Delivery) -> None:
        """Deliver the lane's messages in order until none are left or one must wait."""
        now = datetime.now(UTC)
        for index, message in enumerate(delivery.rows):
            if message.not_before > now:
                return
            try:
                await self._deliver(delivery, message, later=delivery.rows[index + 1:])
            except RetryLater as later:
                delivery.postponed = (message, later)
                return
            except PermanentFailure as failure:
                delivery.failed = (message, str(failure))
                return

    async def _wait_for_channel(self, channel: str) -> None:
        bucket = self._bucket(channel)
        while True:
            delay = bucket.delay(time.monotonic())
            if delay <= 0:
                bucket.take()
                return
            await asyncio.sleep(delay)

    async def _call(self, delivery: _Delivery, team_id: str, pace_channel: str, method: str, /,
                    **arguments: Any) -> dict[str, Any]:
        await self._wait_for_channel(pace_channel)
        await self._hold_lease(delivery)
        try:
            return await self.slack.call(team_id, method, **arguments)
        except SlackApiError as exc:
            error = str(exc.response.get("error", "error"))
            status = exc.response.status_code
            if status == 429 or error == "ratelimited":
                retry_after = _retry_after(exc.response.headers)
                self._bucket(pace_channel).paused_until = time.monotonic() + retry_after
                self.metrics.slack_retries.labels(method=method, reason="429").inc()
                raise RetryLater(retry_after, f"rate limited ({retry_after:g}s)", rate_limited=True) from None
            if status >= 500 or error in ("internal_error", "fatal_error", "service_unavailable", "request_timeout"):
                self.metrics.slack_retries.labels(method=method, reason="5xx").inc()
                raise RetryLater(0, f"Slack error {status} {error}", maybe_sent=method == "chat.postMessage") from None
            if error in PERMANENT_ERRORS:
                raise PermanentFailure(f"{method}: {error}") from None
            raise RetryLater(0, f"{method}: {error}") from None
        except NoToken as exc:
            raise PermanentFailure(str(exc)) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.metrics.slack_retries.labels(method=method, reason="network").inc()
            # Only a connection never made is sure not to have posted anything.
            maybe_sent = method == "chat.postMessage" and not isinstance(exc, aiohttp.ClientConnectorError)
            raise RetryLater(0, f"{method}: {type(exc).__name__} {exc}", maybe_sent=maybe_sent) from None

    async def _already_posted(self, head: OutboxMessage, *, thread_ts: str | None, card_of: str | None,
                              settles: bool = True) -> str | None:
        """The ts of this message (or of the run's card, `card_of`) if an earlier, interrupted delivery did post
        it (found by its metadata). `settles=False`: the message itself is still to be looked for afterwards."""
        if head.id not in self._suspect:
            return None
        if settles:
            self._suspect.discard(head.id)
        if thread_ts:
            method, arguments = "conversations.replies", {"ts": thread_ts}
        else:
            # Nothing of this message can be older than the row that asked for it (less a little clock skew).
            method = "conversations.history"
            arguments = {"oldest": f"{head.created_at.timestamp() - 5:.6f}"}
        cursor: str | None = None
        for _page in range(HISTORY_PAGES):
            try:
                found = await self.slack.call(head.team_id, method, channel=head.channel_id, limit=HISTORY_PAGE,
                                              include_all_metadata=True, **arguments,
                                              **({"cursor": cursor} if cursor else {}))
            except Exception as exc:  # a missing scope or an outage: deliver, at least once
                log.warning("outbox: could not check whether message %s was already posted: %s", head.id, exc)
                return None
            for message in found.get("messages") or []:
                payload = ((message.get("metadata") or {}).get("event_payload")) or {}
                if payload.get("outbox") == head.id or (card_of and payload.get("card") == card_of):
                    log.info("outbox: message %s was already posted (ts %s); not posting it again", head.id,
                             message.get("ts"))
                    return str(message["ts"])
            cursor = (found.get("response_metadata") or {}).get("next_cursor") or None
            if not found.get("has_more") or not cursor:
                break
        return None

    async def _deliver(self, delivery: _Delivery, message: OutboxMessage, *, later: list[OutboxMessage]) -> None:
        if message.kind == POST:
            ts = await self._already_posted(message, thread_ts=None, card_of=None)
            if ts is None:
                result = await self._call(delivery, message.team_id, message.channel_id, "chat.postMessage",
                                          channel=message.channel_id, metadata=_metadata(outbox=message.id),
                                          **message.payload)
                ts = result.get("ts")
            delivery.sent[message.id] = ts
            return
        run = delivery.run
        if run is None:
            raise PermanentFailure(f"run {message.run_id} is gone")
        if delivery.card_ts is None:
            # The card goes first, whatever message is first: replies need its ts for their thread.
            ts = await self._already_posted(message, thread_ts=None, card_of=run.id, settles=message.kind == CARD)
            if ts is None:
                ts = await self._post_card(delivery, run)
            delivery.card_ts = delivery.new_card_ts = ts
            if message.kind == CARD:
                delivery.sent[message.id] = ts
                return
        if message.kind == REPLY:
            ts = await self._already_posted(message, thread_ts=delivery.card_ts, card_of=None)
            if ts is None:
                result = await self._call(delivery, message.team_id, message.channel_id, "chat.postMessage",
                                          channel=message.channel_id, thread_ts=delivery.card_ts,
                                          metadata=_metadata(outbox=message.id), **message.payload)
                ts = result.get("ts")
            delivery.sent[message.id] = ts
            return
        # A card refresh: a later refresh in this lane will show a newer state, so this one can go.
        if any(other.kind == CARD for other in later):
            delivery.superseded.append(message.id)
            return
        await self._update_card(delivery, run)
        delivery.sent[message.id] = delivery.card_ts

    async def _post_card(self, delivery: _Delivery, run: Run) -> str:
        text, blocks = run_card(run, delivery.steps)
        rendered = as_dicts(blocks)
        result = await self._call(delivery, run.team_id, run.channel_id, "chat.postMessage", channel=run.channel_id,
                                  text=text, blocks=rendered, metadata=_metadata(card=run.id))
        delivery.shown = rendered
        return str(result["ts"])

    async def _update_card(self, delivery: _Delivery, run: Run) -> None:
        """Show the run's state now; no call when the card already shows exactly that."""
        fresh, steps = run, delivery.steps
        if run.state not in FINAL_RUN_STATES:  # a finished run's card no longer changes: no need to look again
            async def now_shown(session: AsyncSession) -> tuple[Run, list[Step]]:
                found = await session.get(Run, run.id) or run
                return found, list((await session.execute(select(Step).where(Step.run_id == run.id)
                                                          .order_by(Step.position))).scalars())

            fresh, steps = await self.db.reading(now_shown)
        assert delivery.card_ts is not None
        text, blocks = run_card(fresh, steps)
        rendered = as_dicts(blocks)
        if rendered == delivery.shown:
            return
        await self._call(delivery, fresh.team_id, fresh.channel_id, "chat.update", channel=fresh.channel_id,
                         ts=delivery.card_ts, text=text, blocks=rendered)
        delivery.shown = rendered

    async def _flush(self, deliveries: list[_Delivery]) -> list[None]:
        """What these deliveries learned, in one transaction (statements shared across lanes); then the lanes
        are free for anyone again."""
        now = datetime.now(UTC)
        card_ts = {d.run.id: d.new_card_ts for d in deliveries if d.new_card_ts and d.run is not None}
        sent = {key: value for d in deliveries for key, value in d.sent.items()}
        timestamps = {key: value for key, value in sent.items() if value is not None}
        superseded = [message_id for d in deliveries for message_id in d.superseded]
        await self.db.transaction(functools.partial(self._record, deliveries=deliveries, now=now, card_ts=card_ts,
                                                    sent=sent, timestamps=timestamps, superseded=superseded))
        return [None] * len(deliveries)

    async def _record(self, session: AsyncSession, *, deliveries: list[_Delivery], now: datetime,
                      card_ts: dict[str, str], sent: dict[int, str | None], timestamps: dict[int, str],
                      superseded: list[int]) -> None:
        """What the deliveries learned, in one transaction; then their lanes are free for anyone again."""
        # Statements built once: a CASE over the batch was compiled anew each time. SQLite runs an executemany
        # in-process, without a round trip per row.
        if card_ts and self.db.is_sqlite:
            await session.execute(_SET_CARD_TS, [{"run": run_id, "ts": ts} for run_id, ts in card_ts.items()])
        elif card_ts:
            await session.execute(_SET_CARD_TS_BATCH, {"runs": list(card_ts), "ts": list(card_ts.values())})
        if sent and self.db.is_sqlite:
            await session.execute(_MARK_SENT, [{"message": message_id, "ts": timestamps.get(message_id), "now": now}
                                               for message_id in sent])
        elif sent:
            await session.execute(_MARK_SENT_BATCH, {"ids": list(sent), "now": now,
                                                     "ts": [timestamps.get(message_id) for message_id in sent]})
        if superseded:
            await session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(superseded))
                                  .values(state="superseded", sent_at=now))
        for delivery in deliveries:
            if delivery.postponed is not None:
                message, later = delivery.postponed
                attempts = message.attempts + (0 if later.rate_limited else 1)
                delay = later.delay if later.rate_limited else min(MAX_BACKOFF, 2 ** min(attempts, 9) * 0.5)
                log.info("outbox: %s (lane %s) postponed %.1fs: %s", message.kind, delivery.lane, delay,
                         later.reason)
                await session.execute(update(OutboxMessage).where(OutboxMessage.id == message.id).values(
                    attempts=attempts, last_error=later.reason, not_before=now + timedelta(seconds=delay)))
            if delivery.failed is not None:
                message, reason = delivery.failed
                # Without it (usually the card) the rest of the lane cannot be delivered either.
                log.error("outbox: giving up on lane %s in channel %s of workspace %s: %s", delivery.lane,
                          message.channel_id, message.team_id, reason)
                await session.execute(update(OutboxMessage).where(
                    OutboxMessage.lane == delivery.lane, OutboxMessage.state == "pending",
                    OutboxMessage.id.not_in(list(delivery.sent))).values(state="failed", last_error=reason))
        # A lane whose leased messages were all sent holds no lease any more; the others are released. Only
        # pending messages hold leases; saying so lets the pending index find them (without it, this statement
        # read every message ever sent).
        held = [d.lane for d in deliveries
                if any(row.id not in d.sent and row.id not in d.superseded for row in d.rows)]
        # A post that may have reached Slack keeps its owner with a lapsed lease: whoever claims its lane next,
        # in this process or another, takes it for interrupted and looks for it in Slack before posting again.
        maybe_sent = [d.postponed[0].id for d in deliveries if d.postponed is not None and d.postponed[1].maybe_sent]
        if maybe_sent:
            await session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(maybe_sent))
                                  .values(lease_until=now))
        if held:
            release = (update(OutboxMessage)
                       .where(OutboxMessage.state == "pending", OutboxMessage.lane.in_(held),
                              OutboxMessage.lease_owner == self.owner)
                       .values(lease_owner=None, lease_until=None))
            if maybe_sent:
                release = release.where(OutboxMessage.id.not_in(maybe_sent))
            await session.execute(release)

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


def _retry_after(headers: dict[str, str] | None) -> float:
    """Seconds Slack asks to wait after a 429 (its `retry-after`, in any case of the name; 1 if none or odd)."""
    for name, value in (headers or {}).items():
        if name.lower() == "retry-after":
            try:
                seconds = float(value)
            except ValueError:
                return 1.0
            return seconds if 0 < seconds < 3600 else 1.0
    return 1.0

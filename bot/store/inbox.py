"""Storing accepted events, many requests to one commit.

Each webhook must be durable before it is answered `202`. Committing once per request would make the disk's
commit rate the ceiling on throughput; instead, requests that arrive together are written in one transaction
(group commit) and each waits for that commit. A delivery seen before (same workspace, source and delivery id)
is not stored again; its caller learns it was a duplicate.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot.store.batching import GroupCommit
from bot.store.db import Database
from bot.store.models import Event

log = logging.getLogger(__name__)
MAX_BATCH = 500
Key = tuple[str, str, str]
# One transaction-scoped lock per content, in a fixed order (two batches never wait for each other in a circle).
_LOCK_CONTENTS = text("SELECT pg_advisory_xact_lock(key) FROM unnest(CAST(:keys AS BIGINT[])) AS key ORDER BY key")


def _lock_key(group: tuple[str, str, str]) -> int:
    """A 64-bit lock key for one content of one sender in one workspace."""
    return int.from_bytes(hashlib.sha256("\0".join(group).encode()).digest()[:8], "big", signed=True)


def _aware(moment: datetime) -> datetime:
    """SQLite gives the time back without its zone; every time relaybot stores is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class NewEvent:
    team_id: str
    source: str
    delivery_id: str
    kind: str
    payload: Any
    received_at: datetime
    summary: str = ""
    link: str | None = None
    headers: dict[str, Any] | None = None
    event_name: str | None = None
    actionable: bool = True
    connection_id: str | None = None
    subscription_id: int | None = None
    target_workflow: str | None = None
    target_channel: str | None = None
    source_addr: str | None = None
    started_by: str | None = None
    # For senders without a delivery id (Alertmanager): an event stored under one of these ids (the same content
    # in the neighbouring slices of time) within `duplicate_window` seconds makes this one a duplicate. Checked
    # in the transaction that stores it, one content (`dedupe_group`) at a time, so that two copies arriving
    # together on either side of a slice's end cannot both be stored.
    duplicate_if_stored: tuple[str, ...] = ()
    duplicate_window: float = 0.0
    dedupe_group: str | None = None

    def row(self) -> dict[str, Any]:
        values = {name: value for name, value in self.__dict__.items() if name not in _NOT_COLUMNS}
        values["headers"] = values["headers"] or {}
        values["processed_at"] = None
        return values

    @property
    def key(self) -> tuple[str, str, str]:
        return self.team_id, self.source, self.delivery_id


_NOT_COLUMNS = frozenset({"duplicate_if_stored", "duplicate_window", "dedupe_group"})


@dataclass
class Stored:
    event_id: int
    duplicate: bool


class Inbox:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._writes: GroupCommit[NewEvent, Stored] = GroupCommit(self._write, name="inbox", max_batch=MAX_BATCH)
        # One statement for all rows, built and compiled once per process (a VALUES list of the batch's length
        # was compiled anew for every batch), on the table rather than the mapped class: no ORM bulk path per row.
        events_table = cast(Table, Event.__table__)
        self._insert = ((sqlite_insert if db.is_sqlite else pg_insert)(events_table)
                        .on_conflict_do_nothing(index_elements=["team_id", "source", "delivery_id"])
                        .returning(events_table.c.id, events_table.c.team_id, events_table.c.source,
                                   events_table.c.delivery_id))

    async def store(self, event: NewEvent) -> Stored:
        """Durably stored (or found stored already) when this returns."""
        return await self._writes.submit(event)

    async def close(self) -> None:
        await self._writes.close()

    async def _write(self, events: list[NewEvent]) -> list[Stored]:
        statement = self._insert

        async def store(session: AsyncSession) -> tuple[dict[Key, int], dict[Key, int], dict[int, int]]:
            stored_before = await self._neighbours_stored(session, events) if any(
                event.duplicate_if_stored for event in events) else {}
            rows = [event.row() for index, event in enumerate(events) if index not in stored_before]
            inserted = {(team, source, delivery): event_id
                        for event_id, team, source, delivery in (await session.execute(statement, rows)).all()
                        } if rows else {}
            missing = {event.key for index, event in enumerate(events)
                       if event.key not in inserted and index not in stored_before}
            existing: dict[Key, int] = {}
            if missing:
                found = await session.execute(select(Event.id, Event.team_id, Event.source, Event.delivery_id)
                                             .where(tuple_(Event.team_id, Event.source, Event.delivery_id)
                                                    .in_(list(missing))))
                existing = {(team, source, delivery): event_id for event_id, team, source, delivery in found.all()}
            return inserted, existing, stored_before

        inserted, existing, stored_before = await self.db.transaction(store, urgent=True)
        results: list[Stored] = []
        claimed: set[tuple[str, str, str]] = set()
        for index, event in enumerate(events):
            if index in stored_before:
                repeated = stored_before[index]
                if repeated < 0:  # the same content earlier in this batch: the event stored for it
                    first = events[-1 - repeated].key
                    repeated = inserted.get(first) or existing[first]
                results.append(Stored(repeated, duplicate=True))
            elif event.key in inserted and event.key not in claimed:
                claimed.add(event.key)
                results.append(Stored(inserted[event.key], duplicate=False))
            else:
                results.append(Stored(existing.get(event.key) or inserted[event.key], duplicate=True))
        return results

    async def _neighbours_stored(self, session: AsyncSession, events: list[NewEvent]) -> dict[int, int]:
        """Which of `events` (by index) are duplicates of an event stored under one of their
        `duplicate_if_stored` ids in time, or of an earlier one of this batch of the same content; each with
        the id of the event it repeats, or for a batch-mate, not stored yet, -1 - the batch-mate's index."""
        groups = sorted({(event.team_id, event.source, event.dedupe_group or event.delivery_id)
                         for event in events if event.duplicate_if_stored})
        if not self.db.is_sqlite:
            # SQLite's writers take turns already; on PostgreSQL two transactions storing the same content would
            # each miss the other's uncommitted row. The second now waits for the first, then sees its row.
            await session.execute(_LOCK_CONTENTS, {"keys": sorted({_lock_key(group) for group in groups})})
        wanted = sorted({(event.team_id, event.source, delivery)
                         for event in events for delivery in event.duplicate_if_stored})
        found = (await session.execute(
            select(Event.id, Event.team_id, Event.source, Event.delivery_id, Event.received_at)
            .where(tuple_(Event.team_id, Event.source, Event.delivery_id).in_(wanted)))).all()
        duplicates: dict[int, int] = {}
        first_of_group: dict[tuple[str, str, str], int] = {}
        for index, event in enumerate(events):
            if not event.duplicate_if_stored:
                continue
            since = event.received_at - timedelta(seconds=event.duplicate_window)
            earlier = next((event_id for event_id, team, source, delivery, received_at in found
                            if (team, source) == (event.team_id, event.source)
                            and delivery in event.duplicate_if_stored and _aware(received_at) >= since), None)
            group = (event.team_id, event.source, event.dedupe_group or event.delivery_id)
            if earlier is not None:
                duplicates[index] = earlier
            elif group in first_of_group and events[first_of_group[group]].delivery_id != event.delivery_id:
                duplicates[index] = -1 - first_of_group[group]
            else:
                first_of_group.setdefault(group, index)
        return duplicates


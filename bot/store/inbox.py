"""Storing accepted events, many requests to one commit.

Each webhook must be durable before it is answered `202`. Committing once per request would make the disk's
commit rate the ceiling on throughput; instead, requests that arrive together are written in one transaction
(group commit) and each waits for that commit. A delivery seen before (same workspace, source and delivery id)
is not stored again; its caller learns it was a duplicate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot.store.batching import GroupCommit
from bot.store.db import Database
from bot.store.models import Event

log = logging.getLogger(__name__)
MAX_BATCH = 500
Key = tuple[str, str, str]


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

    def row(self) -> dict[str, Any]:
        values = dict(self.__dict__)
        values["headers"] = values["headers"] or {}
        values["processed_at"] = None
        return values

    @property
    def key(self) -> tuple[str, str, str]:
        return self.team_id, self.source, self.delivery_id


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
        rows = [event.row() for event in events]

        async def store(session: AsyncSession) -> tuple[dict[Key, int], dict[Key, int]]:
            inserted = {(team, source, delivery): event_id
                        for event_id, team, source, delivery in (await session.execute(statement, rows)).all()}
            missing = {event.key for event in events if event.key not in inserted}
            existing: dict[Key, int] = {}
            if missing:
                found = await session.execute(select(Event.id, Event.team_id, Event.source, Event.delivery_id)
                                             .where(tuple_(Event.team_id, Event.source, Event.delivery_id)
                                                    .in_(list(missing))))
                existing = {(team, source, delivery): event_id for event_id, team, source, delivery in found.all()}
            return inserted, existing

        inserted, existing = await self.db.transaction(store, urgent=True)
        results: list[Stored] = []
        claimed: set[tuple[str, str, str]] = set()
        for event in events:
            if event.key in inserted and event.key not in claimed:
                claimed.add(event.key)
                results.append(Stored(inserted[event.key], duplicate=False))
            else:
                results.append(Stored(existing.get(event.key) or inserted[event.key], duplicate=True))
        return results


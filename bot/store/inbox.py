"""Storing accepted events, many requests to one commit.

Each webhook must be durable before it is answered `202`. Committing once per request would make the disk's
commit rate the ceiling on throughput; instead, requests that arrive together are written in one transaction
(group commit) and each waits for that commit. A delivery seen before (same workspace, source and delivery id)
is not stored again; its caller learns it was a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot.store.db import Database
from bot.store.models import Event

log = logging.getLogger(__name__)
MAX_BATCH = 500


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
        self._queue: list[tuple[NewEvent, asyncio.Future[Stored]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def store(self, event: NewEvent) -> Stored:
        future: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        self._queue.append((event, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all())
        return await future

    async def close(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher

    async def _flush_all(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                results = await self._write([event for event, _ in batch])
            except Exception as exc:
                log.exception("storing %d events failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_event, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _write(self, events: list[NewEvent]) -> list[Stored]:
        dialect_insert = sqlite_insert if self.db.is_sqlite else pg_insert
        async with self.db.write() as session:
            statement = (dialect_insert(Event).values([event.row() for event in events])
                         .on_conflict_do_nothing(index_elements=["team_id", "source", "delivery_id"])
                         .returning(Event.id, Event.team_id, Event.source, Event.delivery_id))
            inserted = {(team, source, delivery): event_id
                        for event_id, team, source, delivery in (await session.execute(statement)).all()}
            missing = {event.key for event in events if event.key not in inserted}
            existing: dict[tuple[str, str, str], int] = {}
            if missing:
                rows = await session.execute(select(Event.id, Event.team_id, Event.source, Event.delivery_id)
                                             .where(tuple_(Event.team_id, Event.source, Event.delivery_id)
                                                    .in_(list(missing))))
                existing = {(team, source, delivery): event_id for event_id, team, source, delivery in rows.all()}
        results: list[Stored] = []
        claimed: set[tuple[str, str, str]] = set()
        for event in events:
            if event.key in inserted and event.key not in claimed:
                claimed.add(event.key)
                results.append(Stored(inserted[event.key], duplicate=False))
            else:
                results.append(Stored(existing.get(event.key) or inserted[event.key], duplicate=True))
        return results


"""The loops that take work from the database: pending events → runs, due runs → `Runner.advance`.

Work is found by polling the database (so another process's work and timers are seen) and started at once
when this process wakes the loop itself (a webhook stored, a click decided). A run is leased before it is
advanced; a lease that expires because its process died lets any process take the run over.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.engine import states
from bot.engine.intake import Intake
from bot.engine.loops import Wakeup, WorkLoop
from bot.engine.pacing import DoorFirst
from bot.engine.runner import Runner
from bot.metrics import Metrics
from bot.store.db import Database
from bot.store.models import Event, Run
from bot.store.plans import in_index_order

log = logging.getLogger(__name__)


def active_runs_by_state() -> Select[str, int]:
    """How many runs are not finished yet, by state: read from `ix_runs_state` (partial: `finished_at IS NULL`),
    not from every run."""
    return (select(Run.state, func.count()).where(Run.finished_at.is_(None),
                                                  Run.state.in_(sorted(states.ACTIVE_RUN_STATES)))
            .group_by(Run.state))


async def _pending_events(session: AsyncSession) -> int:
    """Stored events not yet turned into runs (the pending index counts them)."""
    return int(await session.scalar(select(func.count()).select_from(Event).where(Event.processed_at.is_(None)))
               or 0)


async def _backlog_up_to(session: AsyncSession, *, limit: int) -> int:
    """Stored events not yet turned into runs, for the door's limit: exact up to `limit`.

    Counting them read every pending event, once a second during a burst (3.4 ms at 15,000 waiting). The ids
    from the oldest pending event to the newest event bound their number from above: while that bound is under
    the limit it is the answer (two index lookups); only a backlog that may have reached the limit is counted,
    and only up to it.
    """
    oldest = await session.scalar(select(func.min(Event.id)).where(Event.processed_at.is_(None)))
    if oldest is None:
        return 0
    bound = int(await session.scalar(select(func.max(Event.id))) or oldest) - oldest + 1
    if bound < limit:
        return bound
    waiting = select(Event.id).where(Event.processed_at.is_(None)).limit(limit).subquery()
    return int(await session.scalar(select(func.count()).select_from(waiting)) or 0)


def due_runs(*, now: datetime, limit: int, skip_locked: bool) -> Select[str]:
    """Runs still going whose wake-up time has come and that nobody holds, the longest due first (walks the
    partial index `ix_runs_due`, which holds only runs with a wake-up time; on PostgreSQL inside
    `in_index_order`, or a new database's planner reads every run ever stored to find none)."""
    query = (select(Run.id).where(Run.state.in_(states.ACTIVE_RUN_STATES), Run.wake_at <= now,
                                  or_(Run.lease_until.is_(None), Run.lease_until < now))
             .order_by(Run.wake_at).limit(limit))
    return query.with_for_update(skip_locked=True) if skip_locked else query


class Engine(WorkLoop):
    name = "engine"

    def __init__(self, *, db: Database, intake: Intake, runner: Runner, owner: str, lease: timedelta,
                 poll_interval: float, concurrency: int = 32, on_work_done: Wakeup | None = None,
                 door: DoorFirst | None = None) -> None:
        super().__init__(interval=poll_interval)
        self.db = db
        self.intake = intake
        self.runner = runner
        self.owner = owner
        self.lease = lease
        self.concurrency = concurrency
        self.on_work_done = on_work_done
        self.door = door
        self._runs_may_be_due = True
        self._last_due_check = 0.0
        self._backlog_counted = 0.0

    def wake(self) -> None:
        """Something was committed that may make runs due (a click, a command, a finished step): look now."""
        self._runs_may_be_due = True
        self.wakeup.set()

    def events_stored(self) -> None:
        """New events are in the inbox: take them now. (Runs they start are looked for only if there are any.)"""
        self.wakeup.set()

    async def tick(self) -> bool:
        """One round: take pending events, start due runs. True if there may be more to do at once."""
        began = time.monotonic()
        batch = await self.intake.process_batch()
        if self.door is not None:
            await self._count_backlog(full_batch=batch.taken >= self.intake.batch_size)
            if batch.taken:
                await self.door.rest_after(time.monotonic() - began)
        if batch.undelivered and self.on_work_done:
            self.on_work_done.set()
        started = 0
        # Looking for due runs costs a write transaction; a webhook that starts a run without steps makes none
        # due, so the look is skipped unless something may have (or an interval has passed: timers, and work
        # committed by other processes).
        now = time.monotonic()
        if self._runs_may_be_due or batch.to_advance or now - self._last_due_check >= self.interval:
            self._runs_may_be_due = False
            self._last_due_check = now
            started = await self._claim_and_start()
        return batch.taken >= self.intake.batch_size or (started > 0 and len(self._active) < self.concurrency)

    async def _count_backlog(self, *, full_batch: bool) -> None:
        """Keep the door's idea of the inbox backlog current: a batch that was not full took everything; after
        a full one the rest is counted (up to the door's limit, the only use of the number), at most once a
        second. Without a limit there is nothing to count."""
        assert self.door is not None
        if not full_batch or not self.door.max_backlog:
            self.door.backlog = 0
            return
        if time.monotonic() - self._backlog_counted < 1.0:
            return
        self._backlog_counted = time.monotonic()
        self.door.backlog = await self.db.reading(functools.partial(_backlog_up_to, limit=self.door.max_backlog))

    async def refresh_gauges(self, metrics: Metrics) -> None:
        """Before a scrape: the inbox's depth and the runs not yet finished, by state."""
        async def read(session: AsyncSession) -> tuple[int, dict[str, int]]:
            pending = await _pending_events(session)
            active = (await session.execute(active_runs_by_state())).all()
            return pending, {state: count for state, count in active}

        pending, active = await self.db.reading(read)
        metrics.inbox_depth.set(pending)
        for state in states.ACTIVE_RUN_STATES:
            metrics.runs_active.labels(state=state).set(active.get(state, 0))

    async def _claim_and_start(self) -> int:
        free = self.concurrency - len(self._active)
        if free <= 0:
            return 0
        now = datetime.now(UTC)
        active = set(self._active)

        async def lease_due_runs(session: AsyncSession) -> list[str]:
            due = due_runs(now=now, limit=free, skip_locked=not self.db.is_sqlite)
            async with in_index_order(session, postgres=not self.db.is_sqlite):
                ids = [run_id for run_id in (await session.execute(due)).scalars() if run_id not in active]
            if ids:
                await session.execute(update(Run).where(Run.id.in_(ids))
                                      .values(lease_owner=self.owner, lease_until=now + self.lease))
            return ids

        ids = await self.db.transaction(lease_due_runs)
        if not ids:
            return 0
        for run_id in ids:
            self._active[run_id] = asyncio.create_task(self._advance(run_id), name=f"run-{run_id}")
        return len(ids)

    async def _advance(self, run_id: str) -> None:
        try:
            await self.runner.advance(run_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("run %s: advancing failed; it will be retried when its lease expires", run_id)
        finally:
            self._active.pop(run_id, None)
            if self.on_work_done:
                self.on_work_done.set()
            self.wake()

    async def idle(self) -> bool:
        """Nothing pending, due or in flight (used by tests and `relaybot test`)."""
        if self._active:
            return False
        now = datetime.now(UTC)
        async with self.db.read() as session:
            pending = await _pending_events(session)
            due = await session.scalar(select(func.count()).select_from(Run).where(
                Run.state.in_(states.ACTIVE_RUN_STATES), Run.wake_at <= now))
        return not pending and not due

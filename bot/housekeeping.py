"""Periodic jobs: audit checkpoints to Slack and retention of old run data.

Each job runs once per interval across all processes: a process claims it with a conditional update of its
`periodic_jobs` row, so two processes never both post a checkpoint or prune at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot import audit
from bot.audit import Actor
from bot.engine import journal, states
from bot.store.db import Database
from bot.store.models import AuditHead, Event, PeriodicJob, Run, Step, Workspace

log = logging.getLogger(__name__)
CHECKPOINT_EVERY = timedelta(hours=1)
RETENTION_EVERY = timedelta(hours=6)
CLAIM_FOR = timedelta(minutes=10)


@dataclass
class Job:
    name: str
    every: timedelta
    work: Callable[[], Awaitable[None]]


async def claim(db: Database, *, name: str, every: timedelta, owner: str, force: bool = False) -> bool:
    """True if this process may run the job now (it is due, and nobody else is running it)."""
    now = datetime.now(UTC)
    insert = sqlite_insert if db.is_sqlite else pg_insert
    async with db.write() as session:
        await session.execute(insert(PeriodicJob).values(name=name, last_run_at=None, running_until=None, owner=None)
                              .on_conflict_do_nothing(index_elements=["name"]))
        due = or_(PeriodicJob.last_run_at.is_(None), PeriodicJob.last_run_at <= now - every)
        free = or_(PeriodicJob.running_until.is_(None), PeriodicJob.running_until < now)
        result = await session.execute(update(PeriodicJob).where(PeriodicJob.name == name, free,
                                                                 *(() if force else (due,)))
                                       .values(running_until=now + CLAIM_FOR, owner=owner))
        return bool(result.rowcount)  # type: ignore[attr-defined]


async def release(db: Database, *, name: str, owner: str) -> None:
    async with db.write() as session:
        await session.execute(update(PeriodicJob).where(PeriodicJob.name == name, PeriodicJob.owner == owner)
                              .values(last_run_at=datetime.now(UTC), running_until=None))


async def post_checkpoints(db: Database, *, channel: str) -> int:
    """Post each workspace's chain head to the audit channel (through the outbox) and record that it did."""
    now = datetime.now(UTC)
    async with db.write() as session:
        heads = list((await session.execute(
            select(AuditHead).join(Workspace, Workspace.team_id == AuditHead.team_id)
            .where(Workspace.uninstalled_at.is_(None)))).scalars())
        for head in heads:
            text = (f":lock: Audit checkpoint for workspace `{head.team_id}`: record #{head.seq}, "
                    f"hash `{head.hash}` ({audit.rfc3339(now)}). `relaybot audit verify` checks the log against it.")
            journal.enqueue(session, team_id=head.team_id, channel_id=channel, kind=journal.POST,
                            payload={"text": text}, now=now)
            await audit.append(session, team_id=head.team_id, actor=Actor.system(), action="audit.checkpoint",
                               outcome="posted", details={"channel": channel, "seq": head.seq, "hash": head.hash},
                               at=now)
    return len(heads)


async def prune(db: Database, *, older_than: timedelta) -> dict[str, int]:
    """Remove the payloads and step outputs of runs that ended before the cutoff; audit records stay."""
    now = datetime.now(UTC)
    cutoff = now - older_than
    pruned: dict[str, int] = {}
    async with db.write() as session:
        old_runs = list((await session.execute(
            select(Run.id, Run.team_id, Run.event_id).join(Event, Event.id == Run.event_id)
            .where(Run.state.in_(states.FINAL_RUN_STATES), Run.finished_at < cutoff, Event.pruned_at.is_(None))
            .limit(5000))).all())
        if not old_runs:
            return pruned
        run_ids = [row.id for row in old_runs]
        event_ids = list({row.event_id for row in old_runs})
        # An event can start runs in several channels: it is pruned only when none of them is still going.
        active = set((await session.execute(select(Run.event_id).where(
            Run.event_id.in_(event_ids), Run.state.in_(states.ACTIVE_RUN_STATES)))).scalars())
        await session.execute(update(Step).where(Step.run_id.in_(run_ids)).values(outputs=None))
        await session.execute(update(Event).where(Event.id.in_([e for e in event_ids if e not in active]))
                              .values(payload={}, headers={}, pruned_at=now))
        for row in old_runs:
            pruned[row.team_id] = pruned.get(row.team_id, 0) + 1
        for team_id, count in sorted(pruned.items()):
            await audit.append(session, team_id=team_id, actor=Actor.system(), action="retention.pruned",
                               outcome="ok", reason=f"run data older than {older_than.days} days",
                               details={"runs": count, "cutoff": cutoff.isoformat()}, at=now)
    return pruned


class Housekeeping:
    def __init__(self, *, db: Database, owner: str, audit_channel: str | None, retention: timedelta,
                 on_posted: Callable[[], None], interval: float = 60.0) -> None:
        self.db = db
        self.owner = owner
        self.audit_channel = audit_channel
        self.retention = retention
        self.on_posted = on_posted
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.jobs = [Job("retention", RETENTION_EVERY, self._retention)]
        if audit_channel:
            self.jobs.append(Job("audit-checkpoint", CHECKPOINT_EVERY, self._checkpoint))

    async def _checkpoint(self) -> None:
        assert self.audit_channel is not None
        count = await post_checkpoints(self.db, channel=self.audit_channel)
        if count:
            self.on_posted()

    async def _retention(self) -> None:
        pruned = await prune(self.db, older_than=self.retention)
        if pruned:
            log.info("retention: pruned the data of %d runs", sum(pruned.values()))

    async def run_due(self) -> None:
        for job in self.jobs:
            if await claim(self.db, name=job.name, every=job.every, owner=self.owner):
                try:
                    await job.work()
                except Exception:
                    log.exception("periodic job %s failed; it will be tried again", job.name)
                finally:
                    await release(self.db, name=job.name, owner=self.owner)

    async def _loop(self) -> None:
        while True:
            await self.run_due()
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="relaybot-housekeeping")

    async def stop(self) -> None:
        """Stop, and leave a last checkpoint (the head as this process leaves it) for the outbox."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.audit_channel:
            try:
                await post_checkpoints(self.db, channel=self.audit_channel)
            except Exception:
                log.exception("could not write the shutdown audit checkpoint")

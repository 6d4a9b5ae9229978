"""Periodic jobs: audit checkpoints to Slack and retention of old run data and delivered Slack messages.

Each job runs once per interval across all processes: a process claims it with a conditional update of its
`periodic_jobs` row, so two processes never both post a checkpoint or prune at the same time. A job that could
not finish within its time (retention with a large backlog) is due again at once instead of after its interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, exists, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot import audit
from bot.audit import Actor
from bot.engine import journal, states
from bot.store.db import Database
from bot.store.models import AuditHead, Event, OutboxMessage, PeriodicJob, Run, Step, Workspace

log = logging.getLogger(__name__)
CHECKPOINT_EVERY = timedelta(hours=1)
RETENTION_EVERY = timedelta(hours=6)
CLAIM_FOR = timedelta(minutes=10)
PRUNE_BATCH = 5000  # runs pruned per transaction
# Outbox states a message does not leave again.
DONE_WITH = ("sent", "superseded", "failed")
PRUNE_FOR = 300.0  # seconds one retention job may prune for, well within its claim; the rest goes on at once


@dataclass
class Job:
    name: str
    every: timedelta
    # False: not finished (more work is left), so the job is due again at once.
    work: Callable[[], Awaitable[bool]]


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


async def release(db: Database, *, name: str, owner: str, finished: bool = True) -> None:
    """The job is done for now; due again after its interval, or at once if it did not `finish`."""
    async with db.write() as session:
        await session.execute(update(PeriodicJob).where(PeriodicJob.name == name, PeriodicJob.owner == owner)
                              .values(last_run_at=datetime.now(UTC) if finished else None, running_until=None))


async def post_checkpoints(db: Database, *, channel: str) -> int:
    """Post each workspace's chain head to the audit channel (through the outbox) and record that it did."""
    now = datetime.now(UTC)
    async with db.write() as session:
        heads = list((await session.execute(
            select(AuditHead).join(Workspace, Workspace.team_id == AuditHead.team_id)
            .where(Workspace.uninstalled_at.is_(None)))).scalars())
        for head in heads:
            text = (f":lock: Audit checkpoint for workspace `{head.team_id}`: record #{head.seq}, "
                    f"hash `{head.hash}` ({audit.rfc3339(now)}). `relaybot audit export --team {head.team_id}` "
                    f"shows the same hash at #{head.seq} for as long as the log has not been rewritten.")
            journal.enqueue(session, team_id=head.team_id, channel_id=channel, kind=journal.POST,
                            payload={"text": text}, now=now)
            await audit.append(session, team_id=head.team_id, actor=Actor.system(), action="audit.checkpoint",
                               outcome="queued", details={"channel": channel, "seq": head.seq, "hash": head.hash},
                               at=now)
    return len(heads)


async def prune(db: Database, *, older_than: timedelta, batch_size: int = PRUNE_BATCH) -> dict[str, int]:
    """Remove the payloads and step outputs of runs that ended before the cutoff; audit records stay. Every
    such run, in batches of `batch_size` runs, each its own transaction. Runs pruned, by workspace."""
    pruned, _ = await prune_until(db, older_than=older_than, batch_size=batch_size, until=None)
    return pruned


async def prune_until(db: Database, *, older_than: timedelta, batch_size: int, until: float | None
                      ) -> tuple[dict[str, int], bool]:
    """`prune`, oldest runs first, stopping after the batch during which the `time.monotonic()` deadline
    `until` passed; also whether every old run was done (False: the rest waits for the next call)."""
    now = datetime.now(UTC)
    pruned: dict[str, int] = {}
    after: tuple[datetime, str] | None = None
    while True:
        batch, after = await _prune_batch(db, now=now, older_than=older_than, batch_size=batch_size, after=after)
        for team_id, count in batch.items():
            pruned[team_id] = pruned.get(team_id, 0) + count
        if after is None:
            return pruned, True
        if until is not None and time.monotonic() >= until:
            return pruned, False


async def _prune_batch(db: Database, *, now: datetime, older_than: timedelta, batch_size: int,
                       after: tuple[datetime, str] | None) -> tuple[dict[str, int], tuple[datetime, str] | None]:
    """One batch, in one transaction; also where the next batch starts (None: this was the last). A run whose
    event another run still uses keeps its event until that one ends, and is passed over, not taken again."""
    cutoff = now - older_than
    pruned: dict[str, int] = {}
    # Found outside the write transaction: the search may read many runs, and on SQLite a write transaction
    # holds up every other writer (the webhook door) meanwhile. Finished runs do not change any more.
    async with db.read() as session:
        old_runs = list((await session.execute(
            select(Run.id, Run.team_id, Run.event_id, Run.finished_at).join(Event, Event.id == Run.event_id)
            .where(Run.state.in_(states.FINAL_RUN_STATES), Run.finished_at < cutoff, Event.pruned_at.is_(None),
                   *(() if after is None else (tuple_(Run.finished_at, Run.id) > after,)))
            .order_by(Run.finished_at, Run.id).limit(batch_size))).all())
    if not old_runs:
        return pruned, None
    async with db.write() as session:
        run_ids = [row.id for row in old_runs]
        event_ids = list({row.event_id for row in old_runs})
        # An event can start runs in several channels: it is pruned only when none of them is still going.
        active = set((await session.execute(select(Run.event_id).where(
            Run.event_id.in_(event_ids), Run.state.in_(states.ACTIVE_RUN_STATES)))).scalars())
        done = [event_id for event_id in event_ids if event_id not in active]
        # With its event go the outputs of all its runs: a run of it in the next batch would not be found again.
        await session.execute(update(Step).where(or_(
            Step.run_id.in_(run_ids), Step.run_id.in_(select(Run.id).where(Run.event_id.in_(done))))
        ).values(outputs=None))
        await session.execute(update(Event).where(Event.id.in_(done)).values(payload={}, headers={}, pruned_at=now))
        for row in old_runs:
            pruned[row.team_id] = pruned.get(row.team_id, 0) + 1
        for team_id, count in sorted(pruned.items()):
            await audit.append(session, team_id=team_id, actor=Actor.system(), action="retention.pruned",
                               outcome="ok", reason=f"run data older than {older_than.days} days",
                               details={"runs": count, "cutoff": cutoff.isoformat()}, at=now)
    last = old_runs[-1]
    return pruned, (last.finished_at, last.id) if len(old_runs) == batch_size else None


async def forget_delivered(db: Database, *, older_than: timedelta, batch_size: int = PRUNE_BATCH,
                           until: float | None = None) -> tuple[int, bool]:
    """Delete the outbox's messages that it finished with (sent, replaced by a later card refresh, or given up
    on) before the cutoff, oldest first, in batches; pending ones stay whatever their age. Nothing reads them
    again, and a thread reply's text is run data like a step's outputs. Also whether all were done."""
    cutoff = datetime.now(UTC) - older_than
    deleted = 0
    for state in DONE_WITH:
        while True:
            oldest = (select(OutboxMessage.id).where(OutboxMessage.state == state).order_by(OutboxMessage.id)
                      .limit(batch_size))
            async with db.write() as session:
                result = await session.execute(delete(OutboxMessage).where(
                    OutboxMessage.id.in_(oldest.scalar_subquery()), OutboxMessage.created_at < cutoff))
            count = int(result.rowcount)  # type: ignore[attr-defined]
            deleted += count
            if count < batch_size:  # the batch reached messages newer than the cutoff, or the end
                break
            if until is not None and time.monotonic() >= until:
                return deleted, False
    return deleted, True


async def forget_runless_events(db: Database, *, older_than: timedelta, batch_size: int = PRUNE_BATCH,
                               until: float | None = None) -> tuple[int, bool]:
    """Clear the payloads and headers of events received before the cutoff that started no run (no workflow
    wanted them, an `if:` said no, a connection test), in batches. Their rows stay: duplicate detection still
    looks them up. Events set aside keep theirs until retried (`relaybot events retry` needs them). Also whether
    all were done."""
    now = datetime.now(UTC)
    cutoff = now - older_than
    started_a_run = exists().where(Run.event_id == Event.id)
    runless = and_(Event.pruned_at.is_(None), Event.processed_at.is_not(None), Event.intake_error.is_(None),
                   Event.received_at < cutoff, ~started_a_run)
    cleared, after = 0, 0
    while True:
        async with db.read() as session:
            ids = list((await session.execute(select(Event.id).where(Event.id > after, runless)
                                              .order_by(Event.id).limit(batch_size))).scalars())
        if not ids:
            return cleared, True
        async with db.write() as session:
            result = await session.execute(update(Event).where(Event.id.in_(ids), runless)
                                           .values(payload={}, headers={}, pruned_at=now))
        cleared += int(result.rowcount)  # type: ignore[attr-defined]
        after = ids[-1]
        if len(ids) < batch_size:
            return cleared, True
        if until is not None and time.monotonic() >= until:
            return cleared, False


class Housekeeping:
    def __init__(self, *, db: Database, owner: str, audit_channel: str | None, retention: timedelta,
                 on_posted: Callable[[], None], interval: float = 60.0, prune_batch: int = PRUNE_BATCH,
                 prune_for: float = PRUNE_FOR) -> None:
        self.db = db
        self.owner = owner
        self.audit_channel = audit_channel
        self.retention = retention
        self.prune_batch = prune_batch
        self.prune_for = prune_for
        self.on_posted = on_posted
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.jobs = [Job("retention", RETENTION_EVERY, self._retention)]
        if audit_channel:
            self.jobs.append(Job("audit-checkpoint", CHECKPOINT_EVERY, self._checkpoint))

    async def _checkpoint(self) -> bool:
        assert self.audit_channel is not None
        count = await post_checkpoints(self.db, channel=self.audit_channel)
        if count:
            self.on_posted()
        return True

    async def _retention(self) -> bool:
        until = time.monotonic() + self.prune_for
        pruned, finished = await prune_until(self.db, older_than=self.retention, batch_size=self.prune_batch,
                                             until=until)
        forgotten = runless = 0
        if finished:
            forgotten, finished = await forget_delivered(self.db, older_than=self.retention,
                                                         batch_size=self.prune_batch, until=until)
        if finished:
            runless, finished = await forget_runless_events(self.db, older_than=self.retention,
                                                            batch_size=self.prune_batch, until=until)
        if pruned or forgotten or runless:
            log.info("retention: pruned the data of %d runs and of %d events that started none, and deleted %d "
                     "delivered Slack messages%s", sum(pruned.values()), runless, forgotten,
                     "" if finished else "; more are left, and pruning goes on at once")
        return finished

    async def run_due(self) -> None:
        for job in self.jobs:
            if await claim(self.db, name=job.name, every=job.every, owner=self.owner):
                finished = True
                try:
                    finished = await job.work()
                except Exception:
                    log.exception("periodic job %s failed; it will be tried again", job.name)
                finally:
                    await release(self.db, name=job.name, owner=self.owner, finished=finished)

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_due()
            except Exception:
                # A database that is away for a moment (a restart, a lock) must not end retention and the
                # checkpoints for the rest of the process's life: the jobs are claimed again next round.
                log.exception("periodic jobs could not be claimed or released; trying again in %gs", self.interval)
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

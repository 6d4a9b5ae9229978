"""Inbox → runs: every pending event starts one run per subscription that wants it.

Events are taken in batches; each batch is one transaction that marks the events processed and writes the
runs, their steps, their first audit records and their cards' outbox rows. `(event, subscription)` is unique
on runs, so an event can never start two runs for one subscription.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sqlalchemy import Select, Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot import audit
from bot.audit import Actor
from bot.engine import journal, states
from bot.engine.cards import render_card
from bot.engine.concurrency import pool_key
from bot.engine.context import trigger_data
from bot.engine.loader import Catalog, CompiledWorkflow
from bot.engine.runner import SYSTEM, finish_run
from bot.engine.states import FINAL_RUN_STATES
from bot.errors import ExpressionError, UserError, reference_id
from bot.ids import new_run_id
from bot.metrics import Metrics
from bot.slack import messages
from bot.store.db import Database, database_unavailable, insert_later, row_of
from bot.store.inbox import NewEvent
from bot.store.models import Event, Run, Step, Subscription, WorkflowVersion
from bot.store.plans import in_index_order
from integrations.base import ParsedEvent
from integrations.registry import INTEGRATIONS

log = logging.getLogger(__name__)


def event_actor(event: Event) -> Actor:
    if event.started_by:
        return Actor(event.started_by, event.headers.get("user_name") if event.headers else None)
    if event.source in ("schedule", "poll"):
        return Actor(event.source)
    return Actor(f"webhook:{event.source}")


def params_with_defaults(workflow: CompiledWorkflow, given: dict[str, Any]) -> dict[str, Any]:
    params = {name: spec.default for name, spec in workflow.model.params.items()}
    params.update(given)
    return params


def check_required(workflow: CompiledWorkflow, params: dict[str, Any]) -> None:
    """Refuse when a required parameter without a default has no value (an empty one is none)."""
    for key, spec in workflow.model.params.items():
        if spec.required and spec.default is None and params.get(key) in (None, ""):
            raise UserError(messages.MISSING_PARAM.format(workflow=workflow.name, key=key,
                                                          description=spec.description or "required"))


@dataclass
class Match:
    workflow: CompiledWorkflow
    channel_id: str
    params: dict[str, Any]
    subscription: Subscription | None = None


def _wants(workflow: CompiledWorkflow, event: Event) -> bool:
    """Does the workflow's trigger for this event's source accept it (the `events:` filter)?"""
    config = workflow.triggers.get(event.source)
    if config is None:
        return False
    integration_class = INTEGRATIONS.get(event.source)
    if integration_class is None:
        return True
    parsed = ParsedEvent(kind=event.kind, payload=event.payload, delivery_id=event.delivery_id,
                         summary=event.summary, event_name=event.event_name, actionable=event.actionable)
    return integration_class().matches(config, parsed)  # type: ignore[arg-type]


def _condition(workflow: CompiledWorkflow, event: Event, params: dict[str, Any]) -> bool:
    if workflow.if_ is None:
        return True
    context = {"event": event.payload, "trigger": trigger_data(event), "params": params,
               "run": {"workflow": workflow.name}}
    try:
        return workflow.if_.truthy(context)
    except ExpressionError as exc:
        # An event of another shape (a push where a pull request was expected) simply does not match.
        log.info("workflow %s: `if:` does not hold for event %s: %s", workflow.name, event.id, exc)
        return False


async def _matches(session: AsyncSession, catalog: Catalog, event: Event,
                   subscriptions: dict[str, list[Subscription]] | None = None) -> list[Match]:
    """The subscriptions this event starts a run for. `subscriptions` (by workspace) saves a query per event when
    a whole batch is matched."""
    if event.target_workflow is not None:  # `/relay run`: this workflow, in this channel
        workflow = catalog.get(event.target_workflow)
        if workflow is None or event.target_channel is None:
            return []
        subscription = (await session.execute(select(Subscription).where(
            Subscription.team_id == event.team_id, Subscription.channel_id == event.target_channel,
            Subscription.workflow == workflow.name))).scalar_one_or_none()
        params = params_with_defaults(workflow, subscription.params if subscription else {})
        if isinstance(event.payload, dict):
            params.update({key: value for key, value in event.payload.items() if key in workflow.model.params})
        return [Match(workflow, event.target_channel, params, subscription)]
    if event.subscription_id is not None:  # a poll or schedule of one subscription
        subscription = await session.get(Subscription, event.subscription_id)
        if subscription is None or subscription.team_id != event.team_id:
            return []
        workflow = catalog.get(subscription.workflow)
        if workflow is None:
            return []
        params = params_with_defaults(workflow, subscription.params)
        if not _condition(workflow, event, params):
            return []
        return [Match(workflow, subscription.channel_id, params, subscription)]
    names = {workflow.name for workflow in catalog if event.source in workflow.triggers}
    if not names:
        return []
    if subscriptions is None:
        candidates = list((await session.execute(select(Subscription).where(
            Subscription.team_id == event.team_id, Subscription.workflow.in_(names))
            .order_by(Subscription.id))).scalars())
    else:
        candidates = [s for s in subscriptions.get(event.team_id, []) if s.workflow in names]
    found: list[Match] = []
    for subscription in candidates:
        workflow = catalog.get(subscription.workflow)
        if workflow is None or not _wants(workflow, event):
            continue
        params = params_with_defaults(workflow, subscription.params)
        if _condition(workflow, event, params):
            found.append(Match(workflow, subscription.channel_id, params, subscription))
    return found


class LanesLeasedAhead(Protocol):
    """The outbox, as the intake sees it: lanes of new runs leased in the transaction that starts them, then
    delivered at once after it commits (see `Outbox.lease_new_runs`)."""

    def room(self) -> int: ...

    async def lease_new_runs(self, session: AsyncSession, runs: list[tuple[Run, list[Step]]], *,
                             now: datetime) -> list[Any]: ...

    def deliver_leased(self, deliveries: list[Any]) -> None: ...


# The busy path's statements, built once: building a statement and computing its cache key cost more than
# executing it (an UPDATE ... IN built per call: 340 µs; the same, built once: 36 µs).
_EVENTS = cast(Table, Event.__table__)
_VERSIONS_KEY = "relaybot.workflow_versions"  # in a session's info: the versions its transaction stores
_CLAIM_EVENTS = (update(_EVENTS)
                 .where(_EVENTS.c.id.in_(bindparam("ids", expanding=True)), _EVENTS.c.processed_at.is_(None))
                 .values(processed_at=bindparam("now")).returning(_EVENTS.c.id))


def pending_events(limit: int, *, skip_locked: bool) -> Select[Event]:
    """The oldest events still waiting to become runs (walks the partial index `ix_events_pending`; on
    PostgreSQL inside `in_index_order`)."""
    query = select(Event).where(Event.processed_at.is_(None)).order_by(Event.id).limit(limit)
    return query.with_for_update(skip_locked=True) if skip_locked else query


_SUBSCRIPTIONS_OF_TEAMS = (select(Subscription).where(Subscription.team_id.in_(bindparam("teams", expanding=True)))
                           .order_by(Subscription.id))


@dataclass
class Batch:
    """What one `process_batch` did."""

    taken: int = 0  # events taken from the inbox
    to_advance: int = 0  # runs started that have steps for the runner
    undelivered: int = 0  # runs started whose messages wait for the outbox to claim them


@dataclass
class _Planned:
    run: Run
    steps: list[Step]
    match: Match


class Intake:
    def __init__(self, *, db: Database, catalog: Catalog, metrics: Metrics, batch_size: int = 100,
                 outbox: LanesLeasedAhead | None = None, command: str = "/relay") -> None:
        self.db = db
        self.command = command
        self.outbox = outbox
        self.catalog = catalog
        self.metrics = metrics
        self.batch_size = batch_size
        self._stored_versions: set[str] = set()
        self._pending = pending_events(batch_size, skip_locked=False)
        self._pending_locked = pending_events(batch_size, skip_locked=True)

    async def process_batch(self) -> Batch:
        """Turn up to `batch_size` pending events into runs.

        SQLite: the work that costs (matching, CEL, rendering cards) is done before the write transaction, which
        then only claims the events and inserts the runs: the database's one writer is held for as short a
        time as possible, so webhooks keep being accepted quickly while runs are started.

        PostgreSQL: one transaction takes the oldest pending events that no other process holds (`FOR UPDATE
        SKIP LOCKED`), plans and starts their runs. Reading first and claiming after, as on SQLite, made several
        processes plan the same oldest events and all but one find them taken.

        A batch that fails for another reason than the database (a bug met by one event's payload) is taken
        again one event at a time, and the event that fails on its own is set aside: otherwise it would fail
        every batch it is in, and no event stored after it would ever start a run.
        """
        try:
            return await self._take(self._pending, self._pending_locked)
        except Exception as exc:
            if database_unavailable(exc):
                raise
            log.warning("a batch of events failed; taking them one at a time to find the one that fails",
                        exc_info=True)
        return await self._take_one_at_a_time()

    async def _take_one_at_a_time(self) -> Batch:
        ids = list((await self.db.reading(lambda session: session.execute(
            select(Event.id).where(Event.processed_at.is_(None)).order_by(Event.id).limit(self.batch_size)))
        ).scalars())
        total = Batch()
        for event_id in ids:
            only = select(Event).where(Event.id == event_id, Event.processed_at.is_(None))
            for attempt in (1, 2):  # a failure that happens once (a deadlock, say) sets nothing aside
                try:
                    batch = await self._take(only, only.with_for_update(skip_locked=True))
                    break
                except Exception as exc:
                    if database_unavailable(exc):
                        raise
                    if attempt == 2:
                        await self._set_aside(event_id, exc)
                        batch = Batch(taken=1)
            total.taken += batch.taken
            total.to_advance += batch.to_advance
            total.undelivered += batch.undelivered
        return total

    async def _set_aside(self, event_id: int, error: Exception) -> None:
        """Mark one event as done without runs, saying why (in the row, the log and the audit log)."""
        ref = reference_id()
        reason = f"{type(error).__name__}: {error}"[:2000] + f" [ref {ref}]"
        log.error("event %s could not be started and is set aside (relaybot events retry %s puts it back) "
                  "[ref %s]", event_id, event_id, ref, exc_info=error)
        try:
            source = await self._mark_set_aside(event_id, reason, ref, type(error).__name__, audited=True)
        except Exception as exc:
            if database_unavailable(exc):
                raise
            # The audit record itself may be what fails for this event: set it aside all the same.
            log.exception("event %s: the audit record of setting it aside failed [ref %s]", event_id, ref)
            source = await self._mark_set_aside(event_id, reason, ref, type(error).__name__, audited=False)
        if source is not None:
            self.metrics.events_set_aside.labels(source=source).inc()

    async def _mark_set_aside(self, event_id: int, reason: str, ref: str, error_type: str, *,
                              audited: bool) -> str | None:
        now = datetime.now(UTC)
        async with self.db.write() as session:
            event = (await session.execute(
                select(Event).where(Event.id == event_id, Event.processed_at.is_(None)))).scalar_one_or_none()
            if event is None:  # taken by another process meanwhile
                return None
            event.processed_at, event.intake_error = now, reason
            if audited:
                await audit.append(session, team_id=event.team_id, actor=SYSTEM, action="event.set_aside",
                                   outcome="failed", at=now,
                                   details={"event_id": event.id, "source": event.source, "kind": event.kind,
                                            "delivery": event.delivery_id, "error": error_type, "ref": ref})
            return event.source

    async def _take(self, pending: Select[Event], pending_locked: Select[Event]) -> Batch:
        now = datetime.now(UTC)
        batch = Batch()
        leased: list[Any] = []
        versions: set[str] = set()  # workflow versions this transaction stores
        room = self.outbox.room() if self.outbox is not None else 0

        async def plan(session: AsyncSession, *, lock: bool) -> tuple[list[Event], list[tuple[Event, _Planned]]]:
            async with in_index_order(session, postgres=not self.db.is_sqlite):
                events = list((await session.execute(pending_locked if lock else pending)).scalars())
            if not events:
                return [], []
            subscriptions: dict[str, list[Subscription]] = {}
            for subscription in (await session.execute(
                    _SUBSCRIPTIONS_OF_TEAMS, {"teams": list({event.team_id for event in events})})).scalars():
                subscriptions.setdefault(subscription.team_id, []).append(subscription)
            return events, [(event, self._plan_run(event, match, now)) for event in events
                            for match in await _matches(session, self.catalog, event, subscriptions)]

        async def start_runs(session: AsyncSession, events: list[Event], planned: list[tuple[Event, _Planned]]
                             ) -> None:
            # Claimed here, conditionally: on SQLite another process may have taken some of them meanwhile.
            claimed = set((await session.execute(
                _CLAIM_EVENTS, {"ids": [event.id for event in events], "now": now})).scalars())
            started: list[tuple[Run, list[Step]]] = []
            for event, plan in planned:
                if event.id in claimed:
                    await self._record(session, event, plan, now)
                    started.append((plan.run, plan.steps))
                    batch.to_advance += plan.run.state not in FINAL_RUN_STATES
            if self.outbox is not None and room and started:
                leased.extend(await self.outbox.lease_new_runs(session, started[:room], now=now))
            versions.update(session.info.get(_VERSIONS_KEY, ()))

        if self.db.is_sqlite:
            events, planned = await self.db.reading(functools.partial(plan, lock=False))
            if events:
                await self.db.transaction(lambda session: start_runs(session, events, planned))
        else:
            async def plan_and_start(session: AsyncSession) -> tuple[list[Event], list[tuple[Event, _Planned]]]:
                events, planned = await plan(session, lock=True)
                if events:
                    await start_runs(session, events, planned)
                return events, planned

            events, planned = await self.db.transaction(plan_and_start)
        self._remember_versions(versions)
        if not events:
            return batch
        batch.taken = len(events)
        if self.outbox is not None and leased:
            self.outbox.deliver_leased(leased)
        batch.undelivered = len(planned) - len(leased)
        return batch

    async def start_now(self, new_event: NewEvent) -> str:
        """Store a `/relay run` event and start its run in the same transaction; returns the run id."""
        now = datetime.now(UTC)
        async with self.db.write() as session:
            event = Event(**{**new_event.row(), "processed_at": now})
            session.add(event)
            await session.flush()
            matches = await _matches(session, self.catalog, event)
            if not matches:
                raise LookupError(f"workflow {new_event.target_workflow} is not in the catalog")
            # The arguments over the channel's parameters, as the run will see them; refused, nothing is stored.
            check_required(matches[0].workflow, matches[0].params)
            plan = self._plan_run(event, matches[0], now)
            await self._record(session, event, plan, now)
            versions = set(session.info.get(_VERSIONS_KEY, ()))
        self._remember_versions(versions)
        return plan.run.id

    async def _store_version(self, session: AsyncSession, workflow: CompiledWorkflow, now: datetime) -> None:
        """Store the workflow's text once per process. Remembered only once the transaction has committed
        (`_remember_versions`): had it failed, runs of later transactions would name a version never stored."""
        stored_here: set[str] = session.info.setdefault(_VERSIONS_KEY, set())
        if workflow.hash in self._stored_versions or workflow.hash in stored_here:
            return
        insert = sqlite_insert if self.db.is_sqlite else pg_insert
        # Another process may store the same version at the same moment.
        await session.execute(insert(WorkflowVersion).values(hash=workflow.hash, name=workflow.name,
                                                             path=workflow.path, source=workflow.source,
                                                             created_at=now)
                              .on_conflict_do_nothing(index_elements=["hash"]))
        stored_here.add(workflow.hash)

    def _remember_versions(self, versions: set[str]) -> None:
        self._stored_versions |= versions

    def _plan_run(self, event: Event, match: Match, now: datetime) -> _Planned:
        """The run an event starts for one subscription, with its steps and its card (no database work)."""
        workflow = match.workflow
        run = Run(id=new_run_id(), team_id=event.team_id,
                  subscription_id=match.subscription.id if match.subscription else None,
                  event_id=event.id, workflow=workflow.name, workflow_hash=workflow.hash,
                  channel_id=match.channel_id, state=states.QUEUED, outcome=None,
                  title=workflow.title, context={"params": match.params}, card={},
                  started_by=event.started_by, started_by_name=(event.headers or {}).get("user_name"),
                  cancelled_by=None, card_ts=None, created_at=now, finished_at=None, wake_at=now,
                  lease_owner=None, lease_until=None,
                  concurrency_key=pool_key(workflow, team_id=event.team_id, event=event.payload,
                                           trigger=trigger_data(event), params=match.params))
        steps = [Step(run_id=run.id, team_id=run.team_id, position=step.index, step_id=step.id,
                      title=step.model.title or step.id, state=states.PENDING, attempt=0)
                 for step in workflow.steps]
        run.card = render_card(workflow=workflow, run=run, event=event, steps=steps)
        return _Planned(run=run, steps=steps, match=match)

    async def _record(self, session: AsyncSession, event: Event, plan: _Planned, now: datetime) -> None:
        run, steps, workflow, match = plan.run, plan.steps, plan.match.workflow, plan.match
        await self._store_version(session, workflow, now)
        journal.enqueue(session, team_id=run.team_id, channel_id=run.channel_id, kind=journal.CARD, payload={},
                        run_id=run.id, now=now)
        started = messages.thread_run_started(run_id=run.id, kind=event.kind, source=event.source,
                                              delivery=event.delivery_id if event.source != "command" else None,
                                              started_by=event.started_by, workflow=workflow.title,
                                              command=self.command)
        ends_here = not workflow.steps
        await journal.transition(
            session, run, actor=event_actor(event), action="run.started", refresh_card=False,
            thread=None if ends_here else started,
            details={"trigger": event.source, "kind": event.kind, "delivery": event.delivery_id,
                     "source_address": event.source_addr, "event_id": event.id, "params": match.params},
            now=now)
        if ends_here:
            # Nothing to run: the run ends in the transaction that starts it (no lease, no second round trip).
            # Its card is first posted after this commit, showing the end already, and its thread says both
            # things in one reply: one Slack message fewer per run, in a channel allowed about one a second.
            await finish_run(session, run=run, steps=[], now=now, metrics=self.metrics, said_before=started,
                             refresh_card=False)
        # Inserted as rows with the transaction's others, the objects staying out of the session: the ORM's
        # unit of work cost more than the rest of writing a run. (A session not opened by `Database` has no
        # rows to insert later: there they are added as usual.)
        if not insert_later(session, Run, row_of(run)):
            session.add(run)
            session.add_all(steps)
            return
        for step in steps:
            insert_later(session, Step, row_of(step))


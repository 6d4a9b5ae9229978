"""The task that runs the `poll` and `schedule` triggers of every subscription.

Each round it keeps one `trigger_states` row per (subscription, poll or schedule trigger) — created when a
workflow is enabled, reset when its trigger configuration changes, removed when it is disabled — then claims the
due rows (see `lease`) and handles each in its own task, so one slow endpoint delays nobody else. Workspaces
that uninstalled the app are never claimed. The clock is injected: tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot.engine.loader import Catalog, CompiledWorkflow
from bot.engine.loops import WorkLoop
from bot.engine.triggers import schedule
from bot.engine.triggers.config import PollTrigger, ScheduleTrigger
from bot.engine.triggers.lease import StateKey, claim_due, release, release_all
from bot.engine.triggers.poll import Poller, backoff
from bot.errors import reference_id
from bot.store.db import Database
from bot.store.inbox import Inbox, NewEvent
from bot.store.models import PollSeenKey, Subscription, TriggerState

log = logging.getLogger(__name__)
TRIGGERS = ("poll", "schedule")


def state_fingerprint(config: PollTrigger | ScheduleTrigger, workflow: CompiledWorkflow,
                      subscription_params: dict[str, Any]) -> str:
    """What a trigger's state was made for. A poll's request may use the subscription's parameters, so the
    parameters it runs with are part of it: `/relay enable` again with another `upstream=` is another request,
    and takes a new baseline (it replayed every item of the new target as new). A workflow without parameters
    keeps the plain fingerprint, as before."""
    if isinstance(config, ScheduleTrigger) or not workflow.model.params:
        return config.fingerprint()
    params = {name: spec.default for name, spec in workflow.model.params.items()} | subscription_params
    text = json.dumps([config.fingerprint(), params], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Wanted:
    """A trigger state that the catalog and the subscriptions call for."""

    team_id: str
    subscribed_at: datetime
    config: PollTrigger | ScheduleTrigger
    fingerprint: str


class TriggerLoop(WorkLoop):
    name = "triggers"

    def __init__(self, *, db: Database, catalog: Catalog, poller: Poller, inbox: Inbox, owner: str,
                 lease: timedelta, interval: float, grace: timedelta, now: Callable[[], datetime],
                 on_stored: Callable[[], None], concurrency: int = 16) -> None:
        super().__init__(interval=interval)
        self.db = db
        self.catalog = catalog
        self.poller = poller
        self.inbox = inbox
        self.owner = owner
        self.lease = lease
        self.grace = grace
        self.now = now
        self.on_stored = on_stored
        self.concurrency = concurrency
        # One round at a time in this process: a round asked for by hand waits for the loop's own.
        self._round = asyncio.Lock()

    async def after_stop(self) -> None:
        try:
            await release_all(self.db, self.owner)
        except Exception:
            log.exception("could not release the trigger leases of this process; they expire by themselves")

    async def tick(self) -> int:
        """One round: bring the states in line with the subscriptions, start the due ones; how many started."""
        async with self._round:
            return await self._round_now()

    async def _round_now(self) -> int:
        now = self.now()
        await self.sync(now)
        free = self.concurrency - len(self._active)
        if free <= 0:
            return 0
        keys = [key for key in await claim_due(self.db, owner=self.owner, now=now, lease=self.lease, limit=free)
                if key not in self._active]
        for key in keys:
            self._active[key] = asyncio.create_task(self._handle(key, now), name=f"trigger-{key[1]}-{key[0]}")
        return len(keys)

    async def idle(self) -> bool:
        return not self._active

    # ------------------------------------------------------------------------------------------- states

    def _configs(self) -> dict[str, dict[str, PollTrigger | ScheduleTrigger]]:
        """workflow name → its poll and schedule trigger configurations."""
        found: dict[str, dict[str, PollTrigger | ScheduleTrigger]] = {}
        for workflow in self.catalog:
            configs = {name: config for name, config in workflow.triggers.items()
                       if name in TRIGGERS and isinstance(config, PollTrigger | ScheduleTrigger)}
            if configs:
                found[workflow.name] = configs
        return found

    async def sync(self, now: datetime) -> None:
        configs = self._configs()
        async with self.db.read() as session:
            subscriptions = (await session.execute(
                select(Subscription.id, Subscription.team_id, Subscription.workflow, Subscription.created_at,
                       Subscription.params)
                .where(Subscription.workflow.in_(list(configs))))).all() if configs else []
            existing = {(row.subscription_id, row.trigger): row.config_hash for row in (await session.execute(
                select(TriggerState.subscription_id, TriggerState.trigger, TriggerState.config_hash))).all()}
        workflows = {workflow.name: workflow for workflow in self.catalog}
        wanted = {(row.id, trigger): Wanted(row.team_id, row.created_at, config,
                                            state_fingerprint(config, workflows[row.workflow], row.params or {}))
                  for row in subscriptions for trigger, config in configs[row.workflow].items()}
        missing = {key: want for key, want in wanted.items() if key not in existing}
        changed = {key: want for key, want in wanted.items()
                   if key in existing and existing[key] != want.fingerprint}
        gone = [key for key in existing if key not in wanted]
        if missing or changed or gone:
            await self._apply(now, missing, changed, {key: existing[key] for key in changed}, gone)

    async def _apply(self, now: datetime, missing: dict[StateKey, Wanted], changed: dict[StateKey, Wanted],
                     old_hashes: dict[StateKey, str], gone: list[StateKey]) -> None:
        insert = sqlite_insert if self.db.is_sqlite else pg_insert
        async with self.db.write() as session:
            for (subscription_id, trigger), want in missing.items():
                await session.execute(insert(TriggerState).values(
                    subscription_id=subscription_id, trigger=trigger, team_id=want.team_id,
                    config_hash=want.fingerprint, next_at=self._first_due(want, now), created_at=now, failures=0,
                ).on_conflict_do_nothing(index_elements=["subscription_id", "trigger"]))
            for (subscription_id, trigger), want in changed.items():
                # Conditional on the old configuration, so of several processes only one resets it.
                reset: dict[str, Any] = {"config_hash": want.fingerprint, "next_at": self._first_due(want, now)}
                if trigger == "poll":
                    reset |= {"baseline_at": None, "etag": None, "last_modified": None, "failures": 0,
                              "last_error": None}
                    await session.execute(delete(PollSeenKey).where(PollSeenKey.subscription_id == subscription_id))
                await session.execute(update(TriggerState).where(
                    TriggerState.subscription_id == subscription_id, TriggerState.trigger == trigger,
                    TriggerState.config_hash == old_hashes[(subscription_id, trigger)]).values(**reset))
                log.info("subscription %s: its %s trigger changed; %s", subscription_id, trigger,
                         "a new baseline will be taken" if trigger == "poll" else "the schedule starts anew")
            for subscription_id, trigger in gone:
                await session.execute(delete(TriggerState).where(TriggerState.subscription_id == subscription_id,
                                                                 TriggerState.trigger == trigger))
                if trigger == "poll":
                    await session.execute(delete(PollSeenKey).where(PollSeenKey.subscription_id == subscription_id))

    def _first_due(self, want: Wanted, now: datetime) -> datetime:
        if isinstance(want.config, ScheduleTrigger):
            return schedule.first_due(want.config, subscribed_at=want.subscribed_at, now=now, grace=self.grace)
        return now

    # ------------------------------------------------------------------------------------------- work

    async def _handle(self, key: StateKey, now: datetime) -> None:
        subscription_id, trigger = key
        state: TriggerState | None = None
        try:
            async with self.db.read() as session:
                state = await session.get(TriggerState, key)
                subscription = await session.get(Subscription, subscription_id)
            workflow = self.catalog.get(subscription.workflow) if subscription else None
            config = workflow.triggers.get(trigger) if workflow else None
            if state is None or subscription is None or workflow is None or config is None:
                if state is not None:  # disabled meanwhile (the next sync removes it), or not in this catalog
                    await release(self.db, state, self.owner)
                return
            if state.config_hash != state_fingerprint(config, workflow, subscription.params or {}):  # type: ignore[arg-type]
                await release(self.db, state, self.owner)  # changed meanwhile: the next sync resets it
                return
            if isinstance(config, PollTrigger):
                await self.poller.poll(state, subscription, workflow, config, now)
            elif isinstance(config, ScheduleTrigger):
                await self._fire(state, subscription, workflow, config, now)
        except asyncio.CancelledError:
            raise
        except Exception:
            reference = reference_id()
            log.exception("%s trigger of subscription %s failed unexpectedly (reference %s)", trigger,
                          subscription_id, reference)
            if state is not None:
                failures = state.failures + 1
                with contextlib.suppress(Exception):
                    await release(self.db, state, self.owner, failures=failures, last_error_at=now,
                                  last_error=f"relaybot failed unexpectedly (reference {reference})",
                                  next_at=now + backoff(timedelta(minutes=1), failures))
        finally:
            self._active.pop(key, None)

    async def _fire(self, state: TriggerState, subscription: Subscription, workflow: CompiledWorkflow,
                    config: ScheduleTrigger, now: datetime) -> None:
        """The due time has come: store its event (if it is not too old) and move on to the next one."""
        plan = schedule.plan(config, due=state.next_at, now=now, grace=self.grace)
        if plan.missed_from is not None:
            log.warning("schedule of subscription %s (%s): skipped the due times from %s%s; %s",
                        subscription.id, workflow.name, plan.missed_from.isoformat(),
                        f" to before {plan.fire_for.isoformat()}" if plan.fire_for else "",
                        f"missed by more than the grace period ({self.grace})" if plan.fire_for is None
                        else "only the latest missed time runs")
        if plan.fire_for is not None:
            local = plan.fire_for.astimezone(config.zone)
            await self.inbox.store(NewEvent(
                team_id=subscription.team_id, source="schedule",
                # The due time makes the delivery id: of all processes, the inbox lets it through once.
                delivery_id=f"{subscription.id}@{plan.fire_for.strftime('%Y-%m-%dT%H:%MZ')}",
                kind="schedule", received_at=now, event_name="schedule", subscription_id=subscription.id,
                payload={"scheduled_at": local.isoformat(), "scheduled_at_utc": plan.fire_for.isoformat(),
                         "cron": config.cron, "timezone": config.timezone},
                summary=f"Scheduled for {local:%a %Y-%m-%d %H:%M} ({config.timezone})"))
            self.on_stored()
        await release(self.db, state, self.owner, next_at=plan.next_at,
                      last_fired_for=plan.fire_for or state.last_fired_for)

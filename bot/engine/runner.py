"""The run/step state machine.

`Runner.advance(run_id)` is called by a worker that holds the run's lease. It walks the steps in order and
writes each transition (state + audit record + thread reply + card refresh) in one transaction. An action runs
outside any transaction; its result is committed only if this worker still holds the lease and the step is
still in the attempt it started, so a step is committed at most once even if another process took over.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.audit import Actor
from bot.crypto import Keyring
from bot.engine import journal, states
from bot.engine.cards import UNAVAILABLE, render_card
from bot.engine.concurrency import holders, wake_queued
from bot.engine.context import expression_context
from bot.engine.loader import Catalog, CompiledStep, CompiledWorkflow
from bot.engine.posting import ThreadInOrder
from bot.errors import DecryptionError, ExpressionError, reference_id
from bot.masking import LogMasker, MaskedSlackPoster
from bot.metrics import Metrics
from bot.slack import messages
from bot.store.db import Database
from bot.store.models import Event, OutboxMessage, Run, Secret, Step, WorkflowVersion
from bot.store.storable import storable, storable_value
from integrations.base import ActionContext, ActionFailed, SlackPoster
from integrations.httpclient import HttpClient
from integrations.registry import ACTIONS

log = logging.getLogger(__name__)
SYSTEM = Actor.system()
THREAD_WAIT = timedelta(milliseconds=500)


def secret_names(step: CompiledStep) -> set[str]:
    names: set[str] = set()
    for template in step.inputs.templates():
        for expression in template.expressions():
            names |= set(re.findall(r"\bsecrets\s*\.\s*([A-Za-z_]\w*)", expression.source))
            names |= set(re.findall(r"""\bsecrets\s*\[\s*["']([^"']+)["']\s*\]""", expression.source))
    return names


@dataclass
class Execute:
    step_id: str
    attempt: int


@dataclass
class Outcome:
    outputs: dict[str, Any] | None = None
    error: str | None = None
    retryable: bool = False
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class LeaseLost(Exception):
    pass


async def finish_run(session: AsyncSession, *, run: Run, steps: list[Step], now: datetime, metrics: Metrics,
                     said_before: str | None = None, refresh_card: bool = True) -> None:
    """Every step is done: the run takes its outcome, and says so in its thread. `said_before`: a line not
    posted yet (the start of a run that ends where it starts), put in the same reply."""
    await wake_queued(session, run.concurrency_key)
    outcome = run.outcome or states.SUCCEEDED
    run.state = outcome
    run.outcome = outcome
    run.finished_at = now
    run.wake_at = None
    run.lease_owner = None
    run.lease_until = None
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.state] = counts.get(step.state, 0) + 1
    seconds = (now - run.created_at).total_seconds()
    metrics.runs_finished.labels(outcome=outcome).inc()
    said = messages.thread_run_finished(outcome=outcome, counts=counts, seconds=seconds)
    await journal.transition(session, run, actor=SYSTEM, action="run.finished", outcome=outcome, now=now,
                             details={"steps": counts, "seconds": round(seconds, 3)}, refresh_card=refresh_card,
                             thread=f"{said_before}\n{said}" if said_before else said)


async def _card_refused(session: AsyncSession, run_id: str) -> str | None:
    """Why Slack refused the run's card for good (the outbox gave up on it), or None while it may yet be posted."""
    return await session.scalar(select(OutboxMessage.last_error).where(
        OutboxMessage.run_id == run_id, OutboxMessage.kind == journal.CARD, OutboxMessage.state == "failed")
        .limit(1))


class Runner:
    def __init__(self, *, db: Database, catalog: Catalog, keyring: Keyring, http: HttpClient,
                 slack_poster: Callable[[str], SlackPoster], owner: str, lease: timedelta,
                 log_masker: LogMasker, metrics: Metrics, base_urls: Mapping[str, str] | None = None,
                 on_wake: Callable[[], None] | None = None, command: str = "/relay") -> None:
        self.db = db
        self.command = command  # the slash command, as Slack users type it (RELAYBOT_COMMAND)
        self.catalog = catalog
        self.keyring = keyring
        self.http = http
        self.slack_poster = slack_poster
        self.owner = owner
        self.lease = lease
        self.log_masker = log_masker
        self.metrics = metrics
        self.base_urls = dict(base_urls or {})
        self.on_wake = on_wake or (lambda: None)

    # ------------------------------------------------------------------------------------------ plumbing

    async def _workflow(self, session: AsyncSession, run: Run) -> CompiledWorkflow:
        try:
            return self.catalog.version(run.workflow_hash)
        except KeyError:
            version = await session.get(WorkflowVersion, run.workflow_hash)
            if version is None:
                raise
            return self.catalog.version(run.workflow_hash, source=version.source, path=version.path,
                                        name=version.name)

    async def _load(self, session: AsyncSession, run_id: str) -> tuple[Run, Event, list[Step]] | None:
        """The run, if this worker still holds its lease; the lease is extended for this transaction's work.

        The row is locked for the transaction (PostgreSQL), so a process that finds the lease expired cannot
        take the run over while this one is writing: every write of a worker is fenced by its lease.
        """
        now = datetime.now(UTC)
        run = await session.get(Run, run_id, populate_existing=True,
                                with_for_update=None if self.db.is_sqlite else True)
        if run is None or run.lease_owner != self.owner or run.lease_until is None or run.lease_until <= now:
            return None
        run.lease_until = now + self.lease
        event = await session.get(Event, run.event_id)
        assert event is not None
        steps = list((await session.execute(select(Step).where(Step.run_id == run.id).order_by(Step.position)
                                            .execution_options(populate_existing=True))).scalars())
        return run, event, steps

    def _refresh_card(self, workflow: CompiledWorkflow, run: Run, event: Event, steps: list[Step]) -> None:
        # Step states are drawn from the steps themselves; only text naming `steps` or `run` must be rendered again.
        if run.card and not workflow.card_follows_progress:
            return
        run.card = render_card(workflow=workflow, run=run, event=event, steps=steps)

    # ------------------------------------------------------------------------------------------ the loop

    async def advance(self, run_id: str) -> None:
        while True:
            step = await self.db.transaction(functools.partial(self._plan_next, run_id))
            if step is None:
                return
            compiled, context, plan, run_info = step
            outcome = await self._execute(compiled, context, plan, run_info)
            committed = await self.db.transaction(functools.partial(self._commit, run_id, plan, outcome))
            if not committed:
                return

    async def _plan_next(self, run_id: str, session: AsyncSession
                         ) -> tuple[CompiledStep, dict[str, Any], Execute, tuple[str, str, str, str | None]] | None:
        """In one transaction: move the run as far as it goes without executing anything; the step to execute
        next (its attempt recorded as started), or None when the run waits, ended or is not ours."""
        loaded = await self._load(session, run_id)
        if loaded is None:
            return None
        run, event, steps = loaded
        workflow = await self._workflow(session, run)
        plan = await self._next(session, workflow, run, event, steps)
        if plan is None:
            run.lease_owner = None
            run.lease_until = None
            return None
        context = expression_context(run=run, event=event, steps=steps)
        return workflow.step(plan.step_id), context, plan, (run.id, run.team_id, run.channel_id, run.card_ts)

    async def _next(self, session: AsyncSession, workflow: CompiledWorkflow, run: Run, event: Event,
                    steps: list[Step]) -> Execute | None:
        """Make every transition that needs no action; return the step to execute now, if any."""
        now = datetime.now(UTC)
        if run.state in states.FINAL_RUN_STATES:
            return None
        for step in steps:
            if step.state in states.FINAL_STEP_STATES:
                continue
            compiled = workflow.step(step.step_id)
            if step.state == states.STEP_WAITING:
                if step.deadline is not None and step.deadline <= now:
                    await self._time_out(session, workflow, run, event, steps, step, compiled, now)
                    continue
                run.state = states.WAITING
                run.wake_at = step.deadline
                return None
            if step.state == states.UNKNOWN:
                run.state = states.WAITING
                run.wake_at = None
                return None
            if step.state == states.STEP_RUNNING and not self._safe_to_repeat(compiled):
                await self._outcome_unknown(session, workflow, run, event, steps, step, compiled, now)
                return None
            if step.state == states.PENDING:
                if step.next_attempt_at is not None and step.next_attempt_at > now:
                    run.state = states.RUNNING
                    run.wake_at = step.next_attempt_at
                    return None
                if step.attempt == 0 and step.decision is None:
                    if not await self._condition(session, workflow, run, event, steps, step, compiled, now):
                        continue
                    if compiled.needs_approval:
                        await self._wait(session, workflow, run, event, steps, step, compiled, now)
                        return None
            # PENDING (ready), APPROVED, or RUNNING left behind by a process that died mid-step. The slot first:
            # a run waiting for its card below is `running`, which holds a slot.
            if not await self._take_slot(session, workflow, run, event, steps, now):
                return None
            if (compiled.model.uses == "slack.post" and compiled.model.with_.get("thread")
                    and run.card_ts is None):
                # A thread reply needs the card's ts; the outbox posts the card first, unless Slack refused it
                # for good (the bot is not in the channel, say): then there will never be a thread.
                refused = await _card_refused(session, run.id)
                if refused is not None:
                    await self._fail_step(session, workflow, run, event, steps, step,
                                          messages.NO_THREAD_TO_REPLY_IN.format(error=refused), now)
                    continue
                run.state = states.RUNNING
                run.wake_at = now + THREAD_WAIT
                return None
            return await self._start(session, workflow, run, event, steps, step, compiled, now)
        await self._finish(session, workflow, run, event, steps, now)
        return None

    @staticmethod
    def _safe_to_repeat(compiled: CompiledStep) -> bool:
        return ACTIONS[compiled.model.uses]().is_idempotent_static(compiled.model.with_)

    async def _outcome_unknown(self, session: AsyncSession, workflow: CompiledWorkflow, run: Run, event: Event,
                               steps: list[Step], step: Step, compiled: CompiledStep, now: datetime) -> None:
        """A step that was started and never finished, and that may not be repeated without a person's say."""
        step.state = states.UNKNOWN
        step.error = "the process running it stopped before it finished"
        held_a_slot = run.state == states.RUNNING
        run.state = states.WAITING
        run.wake_at = None
        if held_a_slot:  # waiting for a person holds no slot: the pool's queued runs go now, not at their fallback
            await wake_queued(session, run.concurrency_key)
        self._refresh_card(workflow, run, event, steps)
        await journal.transition(
            session, run, actor=SYSTEM, action="step.outcome_unknown", step=step.step_id, outcome=states.UNKNOWN,
            now=now, reason=f"attempt {step.attempt} of {compiled.model.uses} started and never finished; "
                            "it is not safe to repeat without a decision",
            thread=messages.thread_step_unknown(title=step.title, action=compiled.model.uses))

    async def _take_slot(self, session: AsyncSession, workflow: CompiledWorkflow, run: Run, event: Event,
                         steps: list[Step], now: datetime) -> bool:
        """True if the run may execute a step now (it has, or gets, a slot of its `concurrency:` pool)."""
        policy = workflow.model.concurrency
        if policy is None or run.concurrency_key is None or run.state == states.RUNNING:
            return True
        busy = await holders(session, run, sqlite=self.db.is_sqlite)
        if busy < policy.limit:
            return True
        nothing_done = all(step.attempt == 0 and step.decision is None for step in steps)
        if policy.on_conflict == "skip" and nothing_done:
            reason = f"{busy} run(s) of this pool already running (concurrency limit {policy.limit}, skip)"
            for step in steps:
                if step.state not in states.FINAL_STEP_STATES:
                    step.state = states.SKIPPED
                    step.finished_at = now
            run.outcome = states.CANCELLED
            self._refresh_card(workflow, run, event, steps)
            await journal.transition(session, run, actor=SYSTEM, action="run.skipped", outcome=states.CANCELLED,
                                     reason=reason, now=now, refresh_card=False,
                                     thread=messages.thread_run_not_run(reason=reason))
            await finish_run(session, run=run, steps=steps, now=now, metrics=self.metrics)
            return False
        if not run.context.get("queued_for_slot"):
            run.context = {**run.context, "queued_for_slot": True}
            reason = f"{busy} run(s) of this pool running; limit {policy.limit}"
            await journal.transition(session, run, actor=SYSTEM, action="run.queued", outcome="queued",
                                     reason=reason, now=now, thread=messages.thread_run_queued(reason=reason))
        run.state = states.QUEUED
        # Woken when a slot frees; the late fallback only covers a holder that vanished without saying so.
        run.wake_at = now + timedelta(seconds=30)
        return False

    async def _condition(self, session: AsyncSession, workflow: CompiledWorkflow, run: Run, event: Event,
                         steps: list[Step], step: Step, compiled: CompiledStep, now: datetime) -> bool:
        """True when the step should go on; otherwise it has been skipped or failed here."""
        reason: str | None = None
        if compiled.if_ is not None:
            try:
                if compiled.if_.truthy(expression_context(run=run, event=event, steps=steps)):
                    return True
                reason = f"its condition `{compiled.if_.source}` is false"
            except ExpressionError as exc:
                await self._fail_step(session, workflow, run, event, steps, step, f"if: {exc}", now)
                return False
        elif run.outcome == states.FAILED:
            reason = "an earlier step failed"
        else:
            return True
        step.title = self._step_title(compiled, run, event, steps)
        step.state = states.SKIPPED
        step.finished_at = now
        step.error = None
        self._refresh_card(workflow, run, event, steps)
        await journal.transition(session, run, actor=SYSTEM, action="step.skipped", step=step.step_id,
                                 outcome=states.SKIPPED, reason=reason, now=now,
                                 thread=messages.thread_step_skipped(title=step.title, reason=reason))
        return False

    async def _wait(self, session: AsyncSession, workflow: CompiledWorkflow, run: Run, event: Event,
                    steps: list[Step], step: Step, compiled: CompiledStep, now: datetime) -> None:
        approval = compiled.model.approval
        assert approval is not None
        step.state = states.STEP_WAITING
        step.waiting_since = now
        step.deadline = now + approval.timeout
        step.title = self._step_title(compiled, run, event, steps)
        was_running = run.state == states.RUNNING
        run.state = states.WAITING
        run.wake_at = step.deadline
        if was_running:  # waiting for a person holds no slot
            await wake_queued(session, run.concurrency_key)
        approvers = compiled.approvers
        who = messages.approvers_text(approvers.users if approvers else [], approvers.groups if approvers else [],
                                      allow_self=not (approvers and run.started_by and not approvers.allow_self))
        self._refresh_card(workflow, run, event, steps)
        await journal.transition(session, run, actor=SYSTEM, action="step.waiting", step=step.step_id,
                                 reason=f"approval by {who}", now=now,
                                 details={"deadline": step.deadline.isoformat()},
                                 thread=messages.thread_step_waiting(title=step.title, approvers=who,
                                                                     timeout=approval.timeout))

    def _step_title(self, compiled: CompiledStep, run: Run, event: Event, steps: list[Step]) -> str:
        if compiled.title is None:
            return compiled.id
        # As on the card, a part that cannot be rendered reads "(unavailable)", never the raw `${{ }}`.
        return compiled.title.render_text(expression_context(run=run, event=event, steps=steps),
                                          unavailable=UNAVAILABLE)[:150]

    async def _time_out(self, session: AsyncSession, workflow: CompiledWorkflow, run: Run, event: Event,
                        steps: list[Step], step: Step, compiled: CompiledStep, now: datetime) -> None:
        approval = compiled.model.approval
        assert approval is not None
        continues = approval.on_timeout == "skip"
        step.state = states.TIMED_OUT
        step.finished_at = now
        if not continues:
            run.outcome = states.FAILED
        waited = now - (step.waiting_since or now)
        self._refresh_card(workflow, run, event, steps)
        await journal.transition(session, run, actor=SYSTEM, action="step.timed_out", step=step.step_id,
                                 outcome=states.TIMED_OUT, now=now,
                                 reason=f"no decision within {messages.span(approval.timeout)}; "
                                        f"on_timeout: {approval.on_timeout}",
                                 thread=messages.thread_step_timed_out(title=step.title, waited=waited,
                                                                       continues=continues))

    async def _start(self, session: AsyncSession, workflow: CompiledWorkflow, run: Run, event: Event,
                     steps: list[Step], step: Step, compiled: CompiledStep, now: datetime) -> Execute:
        restarted = step.state == states.STEP_RUNNING
        if step.attempt == 0 or step.title == step.step_id:
            step.title = self._step_title(compiled, run, event, steps)
        step.state = states.STEP_RUNNING
        step.attempt += 1
        step.started_at = now
        step.next_attempt_at = None
        run.state = states.RUNNING
        run.lease_until = now + self.lease
        self._refresh_card(workflow, run, event, steps)
        await journal.transition(
            session, run, actor=SYSTEM, action="step.started", step=step.step_id, now=now,
            reason="resumed after the process running it stopped" if restarted else None,
            details={"attempt": step.attempt, "action": compiled.model.uses},
            thread=messages.thread_step_started(title=step.title, attempt=step.attempt, resumed=restarted,
                                                attempts=max(compiled.model.retry.attempts, step.attempt)))
        return Execute(step_id=step.step_id, attempt=step.attempt)

    async def _fail_step(self, session: AsyncSession, workflow: CompiledWorkflow, run: Run, event: Event,
                         steps: list[Step], step: Step, error: str, now: datetime) -> None:
        step.state = states.STEP_FAILED
        step.error = error
        step.finished_at = now
        run.outcome = states.FAILED
        self._refresh_card(workflow, run, event, steps)
        await journal.transition(session, run, actor=SYSTEM, action="step.finished", step=step.step_id,
                                 outcome=states.STEP_FAILED, reason=error, now=now,
                                 thread=messages.thread_step_finished(title=step.title, outcome="failed",
                                                                      seconds=0, result=messages.escape(error)))

    async def _finish(self, session: AsyncSession, workflow: CompiledWorkflow, run: Run, event: Event,
                      steps: list[Step], now: datetime) -> None:
        self._refresh_card(workflow, run, event, steps)
        await finish_run(session, run=run, steps=steps, now=now, metrics=self.metrics)

    # ------------------------------------------------------------------------------------------ actions

    async def _secrets(self, team_id: str, names: set[str]) -> tuple[dict[str, str], str | None, list[str]]:
        """The step's secrets by name, what stops the step (if anything), and every readable secret of the
        workspace: all of them are masked in what the step returns, since an API may hand back a value that an
        earlier step or run sent it."""
        values: dict[str, str] = {}
        readable: list[str] = []
        problem: str | None = None
        async with self.db.read() as session:
            rows = await session.execute(select(Secret).where(Secret.team_id == team_id).order_by(Secret.name))
            for row in rows.scalars():
                try:
                    value = (await self.keyring.open(session, team_id=team_id, purpose=f"secret:{row.name}",
                                                     sealed=row.ciphertext)).decode()
                except (DecryptionError, UnicodeDecodeError) as exc:
                    if row.name in names and problem is None:
                        problem = f"the secret {row.name} cannot be decrypted ({exc})"
                    continue
                readable.append(value)
                if row.name in names:
                    values[row.name] = value
        missing = sorted(names - set(values))
        if missing and problem is None:
            listed = ", ".join(missing)
            problem = (f"the secret {listed} is not set in this workspace; an admin can set it with "
                       f"`{self.command} secret set {missing[0]}`")
        return values, problem, readable

    async def _execute(self, compiled: CompiledStep, context: dict[str, Any], plan: Execute,
                       run_info: tuple[str, str, str, str | None]) -> Outcome:
        run_id, team_id, channel_id, card_ts = run_info
        secrets, problem, workspace_secrets = await self._secrets(team_id, secret_names(compiled))
        masker = await self.log_masker.masker_for(workspace_secrets)  # also masks them in the logs
        if problem:
            return Outcome(error=masker.text(problem))
        action = ACTIONS[compiled.model.uses]()
        try:
            raw_inputs = compiled.inputs.render({**context, "secrets": secrets})
            inputs = action.Input.model_validate(raw_inputs)
        except ExpressionError as exc:
            return Outcome(error=masker.text(f"with: {exc}"))
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            return Outcome(error=masker.text(f"input {where}: {error['msg']}"))
        except Exception as exc:
            # An input no check foresaw (a number too big for its type, say) fails the step now, saying so,
            # rather than leaving it `running` until its lease ends and then "outcome unknown".
            ref = reference_id()
            log.warning("step %s of run %s: its inputs could not be prepared [ref %s]", plan.step_id, run_id, ref,
                        exc_info=True)
            return Outcome(error=masker.text(f"input: {type(exc).__name__}: {exc} (reference {ref})"))
        timeout = compiled.model.timeout.total_seconds()
        poster = ThreadInOrder(MaskedSlackPoster(self.slack_poster(team_id), masker), db=self.db, run_id=run_id)
        ctx = ActionContext(http=self.http, slack=poster,
                            idempotency_key=f"{run_id}:{plan.step_id}", channel=channel_id, thread_ts=card_ts,
                            timeout=timeout, base_urls=self.base_urls)
        started = time.monotonic()
        renewer = asyncio.create_task(self._renew_lease(run_id))
        try:
            async with asyncio.timeout(timeout):
                output = await action.run(inputs, ctx)
            outputs = masker.data(output.model_dump(mode="json", by_alias=True))
            return Outcome(outputs=outputs, seconds=time.monotonic() - started)
        except TimeoutError:
            return Outcome(error=f"no result within {messages.span(compiled.model.timeout)}", retryable=True,
                           timed_out=True, seconds=time.monotonic() - started)
        except ActionFailed as exc:
            return Outcome(error=masker.text(exc.message), retryable=exc.retryable,
                           seconds=time.monotonic() - started)
        except Exception as exc:
            ref = reference_id()
            log.exception("step %s of run %s failed unexpectedly [ref %s]", plan.step_id, run_id, ref)
            return Outcome(error=masker.text(f"unexpected error {type(exc).__name__} (reference {ref})"),
                           retryable=True, seconds=time.monotonic() - started)
        finally:
            renewer.cancel()
            self.metrics.step_seconds.labels(action=compiled.model.uses).observe(time.monotonic() - started)

    async def _renew_lease(self, run_id: str) -> None:
        interval = max(self.lease.total_seconds() / 3, 0.05)
        delay = interval
        while True:
            await asyncio.sleep(delay)
            now = datetime.now(UTC)
            try:
                async with self.db.write() as session:
                    # Only a lease still held: once it has lapsed, another process may already own the run.
                    await session.execute(update(Run).where(Run.id == run_id, Run.lease_owner == self.owner,
                                                            Run.lease_until > now)
                                          .values(lease_until=now + self.lease))
            except Exception as exc:
                # One failed renewal must not end them all: the step is still running here, and a lapsed lease
                # would let another process take it over (repeat it, or call its outcome unknown).
                log.warning("run %s: renewing its lease failed (%s: %s); trying again", run_id,
                            type(exc).__name__, exc)
                delay = max(interval / 4, 0.05)
            else:
                delay = interval

    async def _commit(self, run_id: str, plan: Execute, outcome: Outcome, session: AsyncSession) -> bool:
        """Write the step's result if this worker still owns it; False when it no longer does."""
        now = datetime.now(UTC)
        # An API's answer may hold what no database stores (NUL, a lone surrogate): a result that can never be
        # committed would be run again at every lease, or called unknown.
        if outcome.error is not None:
            outcome.error = storable(outcome.error, len(outcome.error))
        if outcome.outputs is not None:
            outcome.outputs = storable_value(outcome.outputs)
        loaded = await self._load(session, run_id)
        if loaded is None:
            log.warning("run %s: lease lost while step %s ran; its result is dropped", run_id, plan.step_id)
            return False
        run, event, steps = loaded
        step = next(step for step in steps if step.step_id == plan.step_id)
        if step.state != states.STEP_RUNNING or step.attempt != plan.attempt:
            log.warning("run %s: step %s moved on while attempt %s ran; its result is dropped", run_id,
                        plan.step_id, plan.attempt)
            return False
        workflow = await self._workflow(session, run)
        compiled = workflow.step(plan.step_id)
        retry = compiled.model.retry
        # A run cancelled while this step ran: record what the step did, retry nothing, keep "cancelled".
        ended = run.state in states.FINAL_RUN_STATES
        step.duration_ms = int(outcome.seconds * 1000)
        if outcome.ok:
            step.state = states.STEP_SUCCEEDED
            step.outputs = outcome.outputs
            step.error = None
            step.finished_at = now
            self._refresh_card(workflow, run, event, steps)
            await journal.transition(
                session, run, actor=SYSTEM, action="step.finished", step=step.step_id,
                outcome=states.STEP_SUCCEEDED, now=now, details={"attempt": plan.attempt,
                                                                 "ms": step.duration_ms},
                thread=messages.thread_step_finished(title=step.title, outcome="succeeded",
                                                     seconds=outcome.seconds,
                                                     result=messages.short_result(outcome.outputs)))
        elif outcome.retryable and plan.attempt < retry.attempts and not ended:
            delay = min(retry.backoff * (2 ** (plan.attempt - 1)), retry.max_backoff)
            step.state = states.PENDING
            step.error = outcome.error
            step.next_attempt_at = now + delay
            run.wake_at = step.next_attempt_at
            self._refresh_card(workflow, run, event, steps)
            await journal.transition(
                session, run, actor=SYSTEM, action="step.retried", step=step.step_id,
                outcome="retrying", reason=outcome.error, now=now,
                details={"attempt": plan.attempt, "next_attempt_in_s": delay.total_seconds()},
                thread=messages.thread_step_retry(title=step.title, attempt=plan.attempt,
                                                  attempts=retry.attempts, error=outcome.error or "",
                                                  delay=delay))
        else:
            final = states.TIMED_OUT if outcome.timed_out else states.STEP_FAILED
            step.state = final
            step.error = outcome.error
            step.finished_at = now
            if not ended:
                run.outcome = states.FAILED
            self._refresh_card(workflow, run, event, steps)
            await journal.transition(
                session, run, actor=SYSTEM, action="step.finished", step=step.step_id, outcome=final,
                reason=outcome.error, now=now, details={"attempt": plan.attempt, "ms": step.duration_ms},
                thread=messages.thread_step_finished(title=step.title, outcome=final, seconds=outcome.seconds,
                                                     result=messages.escape(outcome.error or "")))
        if ended:  # a cancelled run held its slot until this step ended (`holders`)
            await wake_queued(session, run.concurrency_key)
        return True

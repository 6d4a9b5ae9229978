"""`concurrency:` pools. A run holds a slot of its pool while it is `running` (executing a step, or waiting to
retry one); waiting for approval holds none. Slots are counted in the same transaction that takes one, under a
lock on the pool (PostgreSQL; SQLite's write lock already is one), so the limit holds across processes.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.engine import states
from bot.engine.expressions import Scope, format_value
from bot.engine.loader import CompiledWorkflow
from bot.errors import ExpressionError
from bot.store.models import Run, Step

log = logging.getLogger(__name__)
MAX_KEY = 100


def pool_key(workflow: CompiledWorkflow, *, team_id: str, event: Any, trigger: dict[str, Any],
             params: dict[str, Any]) -> str | None:
    """The pool a new run belongs to, or None when the workflow sets no `concurrency:`."""
    if workflow.model.concurrency is None:
        return None
    value = ""
    if workflow.concurrency_key is not None:
        try:
            value = format_value(workflow.concurrency_key.evaluate(
                Scope({"event": event, "trigger": trigger, "params": params})))
        except ExpressionError as exc:
            # The run still gets a pool: the one of every run whose key could not be worked out.
            log.warning("workflow %s: concurrency key failed (%s); using the shared pool", workflow.name, exc)
            value = "(unavailable)"
    key = f"{team_id}:{workflow.name}:{value}"
    if len(key) > MAX_KEY:
        # The whole key hashed, after as much of it as still fits: a long workflow name (up to 63 characters)
        # with a hashed value alone did not fit the column, and PostgreSQL refused the run.
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        key = f"{key[:MAX_KEY - len(digest) - 1]}#{digest}"
    return key


async def holders(session: AsyncSession, run: Run, *, sqlite: bool) -> int:
    """How many other runs of the pool hold a slot now (and, on PostgreSQL, lock the pool until commit).

    A run cancelled while one of its steps runs holds its slot until that step ends (or its lease lapses,
    its process gone): `limit: 1` keeps two deploys apart even while someone cancels one."""
    if not sqlite:
        await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(run.concurrency_key))))
    step_in_flight = exists().where(Step.run_id == Run.id, Step.state == states.STEP_RUNNING)
    count = await session.scalar(select(func.count()).select_from(Run).where(
        Run.concurrency_key == run.concurrency_key, Run.id != run.id,
        or_(Run.state == states.RUNNING,
            and_(Run.state == states.CANCELLED, Run.lease_until > datetime.now(UTC), step_in_flight))))
    return int(count or 0)


async def wake_queued(session: AsyncSession, key: str | None) -> None:
    """A slot may be free: the pool's queued runs are due again, oldest first."""
    if key is None:
        return
    await session.execute(update(Run).where(Run.concurrency_key == key, Run.state == states.QUEUED)
                          .values(wake_at=Run.created_at))

"""The append-only, hash-chained audit log.

Each workspace has one chain: record N carries the hash of record N-1 and its own hash over a canonical
encoding of every field. `append` is the only write path; there is no update or delete in the code. Appends
lock the workspace's head row (`audit_heads`), so concurrent writers — several processes on PostgreSQL —
still produce one unbroken chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot.store.db import insert_later
from bot.store.models import AuditHead, AuditRecord

GENESIS = "0" * 64
HASHED_FIELDS = ("team_id", "seq", "at", "actor", "actor_name", "action", "run_id", "workflow",
                 "workflow_hash", "step", "outcome", "reason", "details", "prev_hash")


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps({name: fields[name] for name in HASHED_FIELDS}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def record_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(fields)).hexdigest()


def record_fields(record: AuditRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in (*HASHED_FIELDS, "hash")}


@dataclass(frozen=True)
class Actor:
    """Who did it: a Slack user (id and the name at that time) or `webhook:<integration>`, `schedule`, `system`."""

    id: str
    name: str | None = None

    @classmethod
    def system(cls) -> Actor:
        return cls("system")


_HEADS_KEY = "relaybot.audit_heads"


async def _lock_head(session: AsyncSession, team_id: str) -> AuditHead:
    heads: dict[str, AuditHead] = session.info.setdefault(_HEADS_KEY, {})
    head = heads.get(team_id)
    if head is not None:
        return head
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    await session.execute(insert(AuditHead).values(team_id=team_id, seq=0, hash=GENESIS)
                          .on_conflict_do_nothing(index_elements=["team_id"]))
    query = select(AuditHead).where(AuditHead.team_id == team_id).execution_options(populate_existing=True)
    if dialect == "postgresql":
        query = query.with_for_update()
    head = (await session.execute(query)).scalar_one()
    heads[team_id] = head
    return head


async def append(
    session: AsyncSession,
    *,
    team_id: str,
    actor: Actor,
    action: str,
    run_id: str | None = None,
    workflow: str | None = None,
    workflow_hash: str | None = None,
    step: str | None = None,
    outcome: str | None = None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """Add one record to the workspace's chain, inside the caller's transaction; returns its fields."""
    head = await _lock_head(session, team_id)
    fields: dict[str, Any] = {
        "team_id": team_id, "seq": head.seq + 1, "at": rfc3339(at or datetime.now(UTC)),
        "actor": actor.id, "actor_name": actor.name, "action": action, "run_id": run_id,
        "workflow": workflow, "workflow_hash": workflow_hash, "step": step, "outcome": outcome,
        "reason": reason, "details": details or {}, "prev_hash": head.hash,
    }
    fields["hash"] = record_hash(fields)
    if not insert_later(session, AuditRecord, fields):
        session.add(AuditRecord(**fields))
    head.seq = fields["seq"]
    head.hash = fields["hash"]
    return fields


@dataclass(frozen=True)
class ChainBreak:
    team_id: str
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"workspace {self.team_id}: record {self.seq}: {self.problem}"


def verify_chain(team_id: str, records: Iterable[dict[str, Any]], head: dict[str, Any] | None) -> ChainBreak | None:
    """Walk one workspace's records in sequence order; the first that does not fit is named."""
    expected_seq, prev_hash = 1, GENESIS
    for fields in records:
        if fields["seq"] != expected_seq:
            if fields["seq"] > expected_seq:
                return ChainBreak(team_id, expected_seq, f"missing (the next record found is {fields['seq']})")
            return ChainBreak(team_id, fields["seq"], "out of order or duplicated")
        if fields["prev_hash"] != prev_hash:
            return ChainBreak(team_id, fields["seq"], "does not follow the previous record "
                              "(a record was inserted, deleted or reordered)")
        if record_hash(fields) != fields["hash"]:
            return ChainBreak(team_id, fields["seq"], "its content does not match its hash (edited)")
        prev_hash = fields["hash"]
        expected_seq += 1
    if head is not None and (head["seq"] != expected_seq - 1 or head["hash"] != prev_hash):
        return ChainBreak(team_id, expected_seq, f"the chain ends at {expected_seq - 1} but the head says "
                          f"{head['seq']} (records were removed from the end)")
    return None


async def iter_records(session: AsyncSession, *, team_id: str | None = None, run_id: str | None = None,
                       since: datetime | None = None, batch: int = 1000) -> AsyncIterator[AuditRecord]:
    """Records in (workspace, sequence) order, fetched in batches so a large log streams."""
    query = select(AuditRecord).order_by(AuditRecord.team_id, AuditRecord.seq)
    if team_id:
        query = query.where(AuditRecord.team_id == team_id)
    if run_id:
        query = query.where(AuditRecord.run_id == run_id)
    if since:
        query = query.where(AuditRecord.at >= rfc3339(since))
    result = await session.stream_scalars(query.execution_options(yield_per=batch))
    async for record in result:
        yield record

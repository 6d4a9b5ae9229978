"""The append-only, hash-chained audit log.

Each workspace has one chain: record N carries the hash of record N-1 and its own hash over a canonical
encoding of every field. `append` is the only write path; there is no update or delete in the code. The
records a transaction appends are chained at its end, under a lock on the workspace's head row
(`audit_heads`), so concurrent writers — several processes on PostgreSQL — still produce one unbroken chain.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot.store.db import before_commit, insert_rows
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


_PENDING_KEY = "relaybot.audit_pending"
_RECORDS = cast(Table, AuditRecord.__table__)
_HEADS = cast(Table, AuditHead.__table__)
# Built once (building a statement cost more than running it).
_MOVE_HEAD = (update(_HEADS).where(_HEADS.c.team_id == bindparam("team"))
              .values(seq=bindparam("seq"), hash=bindparam("hash")))


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
) -> None:
    """Add one record to the workspace's chain, inside the caller's transaction.

    The records of a transaction are chained and written at its end, in the order they were appended: the
    workspace's head row is locked (PostgreSQL) only for those last statements, not for the whole transaction.
    """
    fields: dict[str, Any] = {
        "team_id": team_id, "seq": None, "at": rfc3339(at or datetime.now(UTC)),
        "actor": actor.id, "actor_name": actor.name, "action": action, "run_id": run_id,
        "workflow": workflow, "workflow_hash": workflow_hash, "step": step, "outcome": outcome,
        "reason": reason, "details": details or {}, "prev_hash": None, "hash": None,
    }
    pending: list[dict[str, Any]] | None = session.info.get(_PENDING_KEY)
    if pending is None:
        if not before_commit(session, "audit", _write_pending):
            await _write_chained(session, [fields])  # a session not opened by `Database`: at once
            return
        pending = session.info[_PENDING_KEY] = []
    pending.append(fields)


async def _write_pending(session: AsyncSession) -> None:
    await _write_chained(session, session.info.pop(_PENDING_KEY, []))


async def _write_chained(session: AsyncSession, records: list[dict[str, Any]]) -> None:
    by_team: dict[str, list[dict[str, Any]]] = {}
    for fields in records:
        by_team.setdefault(fields["team_id"], []).append(fields)
    heads = []
    for team_id in sorted(by_team):  # every process locks heads in one order: two cannot wait for each other
        seq, prev_hash = await _lock_head(session, team_id)
        for fields in by_team[team_id]:
            seq += 1
            fields["seq"], fields["prev_hash"] = seq, prev_hash
            fields["hash"] = prev_hash = record_hash(fields)
        heads.append({"team": team_id, "seq": seq, "hash": prev_hash})
    if not heads:
        return
    await insert_rows(session, _RECORDS, records)
    await session.execute(_MOVE_HEAD, heads)


async def _lock_head(session: AsyncSession, team_id: str) -> tuple[int, str]:
    """The workspace's head (sequence number and hash), created if new, and locked until the transaction ends:
    one statement, an upsert that changes nothing and returns the row (on PostgreSQL it takes the row's lock
    and returns its latest committed version; on SQLite the write lock is already held)."""
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    seq, head_hash = (await session.execute(_head_upsert(dialect), {"team": team_id})).one()
    return seq, head_hash


@functools.cache
def _head_upsert(dialect: str) -> Any:
    insert_head = (pg_insert if dialect == "postgresql" else sqlite_insert)(_HEADS)
    return (insert_head.values(team_id=bindparam("team"), seq=0, hash=GENESIS)
            .on_conflict_do_update(index_elements=["team_id"], set_={"seq": _HEADS.c.seq})
            .returning(_HEADS.c.seq, _HEADS.c.hash))


@dataclass(frozen=True)
class ChainBreak:
    team_id: str
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"workspace {self.team_id}: record {self.seq}: {self.problem}"


def verify_chain(team_id: str, records: Iterable[dict[str, Any]], head: dict[str, Any] | None) -> ChainBreak | None:
    """Walk one workspace's records in sequence order; the first that does not fit is named.

    `head` is the workspace's chain head as read before the records: records appended since (the bot running)
    continue the chain past it, so it must be one of the records, not the last one; a missing head, or one
    past the last record, means records were taken away."""
    expected_seq, prev_hash = 1, GENESIS
    hash_at_head: str | None = GENESIS if head is not None and head["seq"] == 0 else None
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
        if head is not None and fields["seq"] == head["seq"]:
            hash_at_head = fields["hash"]
        expected_seq += 1
    last = expected_seq - 1
    if head is None:
        if last:
            return ChainBreak(team_id, last, "the chain's head is missing (records, and the head with them, "
                              "were removed from the end)")
        return None
    if head["seq"] > last:
        return ChainBreak(team_id, expected_seq, f"the chain ends at {last} but the head says "
                          f"{head['seq']} (records were removed from the end)")
    if hash_at_head != head["hash"]:
        return ChainBreak(team_id, head["seq"], "does not match the chain's head (records were rewritten)")
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

"""`relaybot audit verify` and `relaybot audit export`: the audit log for the security team."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from bot.settings import Settings

EXPORT_FIELDS = ("team_id", "seq", "at", "actor", "actor_name", "action", "run_id", "workflow", "workflow_hash",
                 "step", "outcome", "reason", "details", "prev_hash", "hash")


def register(sub: Any) -> None:
    parser = sub.add_parser("audit", help="verify or export the hash-chained audit log")
    actions = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = actions.add_parser("verify", help="walk every chain; name the first record that was edited, "
                                               "deleted, inserted or reordered")
    verify.add_argument("--team", help="only this workspace (team id)")
    export = actions.add_parser("export", help="stream records with their hashes (JSON lines or CSV)")
    export.add_argument("--team", help="only this workspace (team id)")
    export.add_argument("--run", help="only the records of this run")
    export.add_argument("--since", type=_moment, help="only records at or after this time (ISO 8601, UTC if no zone)")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    parser.set_defaults(handler=run)


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time such as 2026-11-01T00:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.audit_command == "verify":
        return asyncio.run(verify(settings, team=args.team, out=sys.stdout))
    return asyncio.run(export(settings, team=args.team, run_id=args.run, since=args.since, fmt=args.format,
                              out=sys.stdout))


async def verify(settings: Settings, *, team: str | None, out: TextIO) -> int:
    from sqlalchemy import select

    from bot import audit
    from bot.store.db import Database
    from bot.store.models import AuditHead, AuditRecord

    db = Database(settings.database_url)
    try:
        # The heads first, then the records: what the bot appends meanwhile only continues the chains.
        async with db.read() as session:
            heads = {head.team_id: {"seq": head.seq, "hash": head.hash}
                     for head in (await session.execute(select(AuditHead))).scalars()}
            teams_query = select(AuditRecord.team_id).distinct()
            teams = set((await session.execute(teams_query)).scalars()) | set(heads)
        if team:
            teams &= {team}
        failures = 0
        for team_id in sorted(teams):
            async with db.read() as session:
                records = [audit.record_fields(record)
                           async for record in audit.iter_records(session, team_id=team_id)]
            problem = audit.verify_chain(team_id, records, heads.get(team_id))
            if problem is None:
                last = records[-1] if records else {"seq": 0, "hash": audit.GENESIS}
                print(f"{team_id}: {len(records)} records, chain intact, head #{last['seq']} {last['hash']}", file=out)
            else:
                failures += 1
                print(f"{problem}", file=out)
        if not teams:
            print("no audit records", file=out)
        return 1 if failures else 0
    finally:
        await db.dispose()


def _row(record: Any) -> dict[str, Any]:
    return {field: getattr(record, field) for field in EXPORT_FIELDS}


async def export(settings: Settings, *, team: str | None, run_id: str | None, since: datetime | None, fmt: str,
                 out: TextIO) -> int:
    from bot import audit
    from bot.store.db import Database

    db = Database(settings.database_url)
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    exported = 0
    try:
        async with db.read() as session:
            async for record in audit.iter_records(session, team_id=team, run_id=run_id, since=since):
                exported += 1
                row = _row(record)
                if writer is not None:
                    writer.writerow({**row, "details": json.dumps(row["details"], sort_keys=True)})
                else:
                    out.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        if run_id is not None and not exported:  # a run always has records: the id is mistyped
            scope = f" in workspace {team}" if team else ""
            print(f"relaybot audit export: no records of run {run_id}{scope} (ids look like R7K2M9QX4P)",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        await db.dispose()

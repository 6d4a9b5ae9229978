"""`relaybot events list` and `relaybot events retry`: the events the intake set aside.

An event the intake failed on, on its own, is set aside so that the events stored after it still start their
runs (`bot.engine.intake`). Its row keeps the payload and says why; once the cause is fixed (usually a new
relaybot release), `retry` puts it back in the inbox and a running bot takes it within a poll interval.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, TextIO

from bot.settings import Settings


def register(sub: Any) -> None:
    parser = sub.add_parser("events", help="events the intake failed on and set aside: list them, retry them")
    actions = parser.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    lister = actions.add_parser("list", help="the events set aside, oldest first, with the reason")
    lister.add_argument("--team", help="only this workspace (team id)")
    retry = actions.add_parser("retry", help="put events set aside back in the inbox")
    retry.add_argument("ids", nargs="*", type=int, metavar="EVENT_ID", help="the events to retry")
    retry.add_argument("--all", action="store_true", help="every event set aside (with --team: of that workspace)")
    retry.add_argument("--team", help="with --all: only this workspace (team id)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.events_command == "list":
        return asyncio.run(list_set_aside(settings, team=args.team, out=sys.stdout))
    if bool(args.ids) == bool(args.all):
        which = "not both" if args.all else "`relaybot events list` shows them"
        print(f"relaybot events retry: name the events (EVENT_ID …) or --all; {which}", file=sys.stderr)
        return 2
    return asyncio.run(retry(settings, ids=args.ids, team=args.team, out=sys.stdout))


async def list_set_aside(settings: Settings, *, team: str | None, out: TextIO) -> int:
    from sqlalchemy import select

    from bot.store.db import Database
    from bot.store.models import Event

    db = Database(settings.database_url)
    try:
        async with db.read() as session:
            query = select(Event).where(Event.intake_error.is_not(None)).order_by(Event.id)
            if team:
                query = query.where(Event.team_id == team)
            events = list((await session.execute(query)).scalars())
    finally:
        await db.dispose()
    if not events:
        print("no events are set aside", file=out)
        return 0
    for event in events:
        print(f"{event.id}\t{event.team_id}\t{event.source}\t{event.kind}\t{event.delivery_id}\t"
              f"{event.received_at:%Y-%m-%d %H:%M:%S}Z\t{event.intake_error}", file=out)
    return 0


async def retry(settings: Settings, *, ids: list[int], team: str | None, out: TextIO) -> int:
    from sqlalchemy import select

    from bot import audit
    from bot.cli.secrets import cli_actor
    from bot.store.db import Database
    from bot.store.models import Event

    db = Database(settings.database_url)
    try:
        async with db.write() as session:
            query = select(Event).where(Event.intake_error.is_not(None)).order_by(Event.id)
            if ids:
                query = query.where(Event.id.in_(ids))
            elif team:
                query = query.where(Event.team_id == team)
            events = list((await session.execute(query)).scalars())
            for event in events:
                await audit.append(session, team_id=event.team_id, actor=cli_actor(), action="event.retried",
                                   outcome="ok", details={"event_id": event.id, "error": event.intake_error})
                event.processed_at = event.intake_error = None
    finally:
        await db.dispose()
    missing = sorted(set(ids) - {event.id for event in events})
    for event_id in missing:
        print(f"event {event_id} is not set aside (it does not exist, or it started its runs)", file=out)
    print(f"{len(events)} event(s) back in the inbox", file=out)
    return 1 if missing else 0

"""`relaybot db upgrade`: apply the schema migrations."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bot.settings import Settings


def register(sub: Any) -> None:
    parser = sub.add_parser("db", help="database schema")
    actions = parser.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    actions.add_parser("upgrade", help="apply every migration (also done when the bot starts)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store import migrate
    from bot.store.db import Database

    async def upgrade() -> None:
        db = Database(settings.database_url)
        try:
            await migrate.upgrade(db)
            print(f"database at revision {await migrate.current_revision(db)}")
        finally:
            await db.dispose()

    asyncio.run(upgrade())
    return 0

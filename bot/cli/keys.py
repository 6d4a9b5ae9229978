"""`relaybot keys generate|status|rotate`: the master keys that wrap each workspace's data key."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from bot.settings import Settings

ROTATION_STEPS = """\
Rotating the master key, without downtime:
  1. relaybot keys generate                       prints a new key
  2. RELAYBOT_MASTER_KEYS=<new>,<old>             on every relaybot process; restart them
  3. relaybot keys rotate                         re-wraps every workspace's data key under <new>
                                                  (resumable; safe while the bot runs)
  4. relaybot keys status                         once <old> wraps nothing, remove it from the list
"""


def register(sub: Any) -> None:
    parser = sub.add_parser("keys", help="master keys: generate one, see what each wraps, rotate",
                            description=ROTATION_STEPS, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    actions.add_parser("generate", help="print a new master key (base64, 32 bytes)")
    actions.add_parser("status", help="how many workspace data keys each master key wraps")
    rotate = actions.add_parser("rotate", help="re-wrap every data key under the newest master key")
    rotate.add_argument("--limit", type=int, metavar="N",
                        help="re-wrap at most N workspaces, then stop (run again to go on)")
    parser.set_defaults(handler=run)


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[tuple[Any, Any]]:
    """The database (schema brought up to date) and the keyring, as the bot would have them.

    Unlike the bot, the command line never generates a master key: a new key here would seal values that the
    running bot cannot read.
    """
    from bot.app import default_key_file
    from bot.crypto import Keyring, load_master_keys
    from bot.store import migrate
    from bot.store.db import Database

    keyring = Keyring(load_master_keys(keys=settings.master_keys, key_file=settings.master_key_file,
                                       default_file=default_key_file(settings), generate=False))
    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db)
        yield db, keyring
    finally:
        await db.dispose()


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.keys_command == "generate":
        return generate()
    if args.keys_command == "status":
        return asyncio.run(status(settings))
    return asyncio.run(rotate(settings, limit=args.limit))


def generate() -> int:
    import base64

    from bot.crypto import generate_master_key_text, master_key_id

    text = generate_master_key_text()
    print(text)
    print(f"master key {master_key_id(base64.b64decode(text))}: put it first in RELAYBOT_MASTER_KEYS (the old keys "
          f"after it), restart every relaybot process, then run `relaybot keys rotate`.", file=sys.stderr)
    return 0


async def status(settings: Settings) -> int:
    from bot.crypto import key_usage

    async with open_store(settings) as (db, keyring), db.read() as session:
        usage = await key_usage(session)
    rows: list[tuple[str, str, int, str]] = []
    for position, master in enumerate(keyring.master_keys, start=1):
        count = usage.get(master.id, 0)
        if position == 1:
            note = "newest: new data keys are wrapped by it"
        elif count:
            note = "in use: run `relaybot keys rotate`"
        else:
            note = "wraps nothing: can be removed"
        rows.append((master.id, "1 (newest)" if position == 1 else str(position), count, note))
    unknown = {key_id: count for key_id, count in usage.items() if not keyring.knows(key_id)}
    for key_id, count in sorted(unknown.items()):
        rows.append((key_id, "-", count, "NOT CONFIGURED: these workspaces' secrets cannot be read"))
    print(f"{'master key':<18}{'position':<12}{'data keys':>9}  ")
    for key_id, position_text, count, note in rows:
        print(f"{key_id:<18}{position_text:<12}{count:>9}  {note}")
    older = sum(count for key_id, count in usage.items() if key_id != keyring.newest.id)
    if unknown:
        print(f"\n{sum(unknown.values())} data key(s) are wrapped by a master key that is not configured: add it "
              f"back to RELAYBOT_MASTER_KEYS (after the newest) and run `relaybot keys rotate`.", file=sys.stderr)
        return 1
    print("\nEvery data key is wrapped by the newest master key; older keys can be removed." if not older
          else f"\n{older} data key(s) are still wrapped by older keys: run `relaybot keys rotate`.")
    return 0


async def rotate(settings: Settings, *, limit: int | None) -> int:
    from bot.crypto import rotate_data_keys

    async with open_store(settings) as (db, keyring):
        rotation = await rotate_data_keys(db, keyring, limit=limit)
        newest = keyring.newest.id
    print(f"re-wrapped {rotation.rewrapped} workspace data key(s) under master key {newest}; "
          f"{rotation.remaining} remain on older keys.")
    for team_id, problem in sorted(rotation.failed.items()):
        print(f"  {team_id}: not re-wrapped: {problem}", file=sys.stderr)
    if rotation.failed:
        return 1
    if rotation.remaining:
        print("Run `relaybot keys rotate` again to go on.")
    else:
        print("Done: `relaybot keys status` shows which older keys can now be removed.")
    return 0

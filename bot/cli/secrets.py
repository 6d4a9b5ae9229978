"""`relaybot secrets set|list|delete --team T`: a workspace's secrets from the server's shell.

The value of `set` comes from standard input (`relaybot secrets set --team T KEY < key.pem`), or from a prompt
that does not echo when standard input is a terminal; never from an argument, which would land in the shell
history and the process list. It is read before the event loop starts, so nothing blocks it.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import socket
import sys
from typing import Any, TextIO

from sqlalchemy import select

from bot.audit import Actor
from bot.settings import Settings


def register(sub: Any) -> None:
    parser = sub.add_parser("secrets", help="a workspace's secrets: set (value from stdin or a prompt), list, delete")
    actions = parser.add_subparsers(dest="secrets_command", required=True, metavar="ACTION")
    setter = actions.add_parser(
        "set", help="store or replace a secret",
        description="Store or replace a secret. The value is read from standard input (one trailing newline "
                    "removed, as `echo` adds one), or asked for without echo when standard input is a terminal.")
    lister = actions.add_parser("list", help="names, who set them and when (never values)")
    deleter = actions.add_parser("delete", help="delete a secret")
    for action in (setter, lister, deleter):
        action.add_argument("--team", required=True, metavar="T", help="the workspace's Slack team id (T…)")
    for action in (setter, deleter):
        action.add_argument("name", metavar="NAME", help="the secret's name, as in ${{ secrets.NAME }}")
    parser.set_defaults(handler=run)


def cli_actor() -> Actor:
    try:
        who = f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):  # no user name in a bare container
        who = socket.gethostname()
    return Actor("cli", f"{who} (command line)")


def read_value(name: str, stdin: TextIO) -> str:
    if stdin.isatty():
        return getpass.getpass(f"Value of {name} (not shown; Enter to finish): ")
    value = stdin.read()
    if value.endswith("\r\n"):
        return value[:-2]
    return value.removesuffix("\n")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from bot.slack.secrets import name_problem, value_problem

    if args.secrets_command == "list":
        return asyncio.run(list_command(settings, team_id=args.team))
    if problem := name_problem(args.name):
        print(f"relaybot: {problem}", file=sys.stderr)
        return 1
    if args.secrets_command == "delete":
        return asyncio.run(delete_command(settings, team_id=args.team, name=args.name))
    value = read_value(args.name, sys.stdin)
    if problem := value_problem(value):
        print(f"relaybot: {problem}", file=sys.stderr)
        return 1
    return asyncio.run(set_command(settings, team_id=args.team, name=args.name, value=value))


async def set_command(settings: Settings, *, team_id: str, name: str, value: str) -> int:
    from bot.cli.keys import open_store
    from bot.slack.secrets import store_secret
    from bot.store.models import DataKey, Workspace

    async with open_store(settings) as (db, keyring):
        async with db.read() as session:
            # Known from Slack, or from secrets stored here before (which gave it a data key).
            known = (await session.get(Workspace, team_id) is not None
                     or await session.scalar(select(DataKey.team_id).where(DataKey.team_id == team_id).limit(1))
                     is not None)
        if not known:
            print(f"relaybot: note: workspace {team_id} has not used relaybot yet; check --team if that is "
                  f"unexpected. Storing the secret anyway.", file=sys.stderr)
        replaced = await store_secret(db, keyring, team_id=team_id, name=name, value=value, actor=cli_actor())
    print(f"secret {name} {'replaced' if replaced else 'stored'} for workspace {team_id} (encrypted; "
          f"workflows use it as ${{{{ secrets.{name} }}}}).")
    return 0


async def list_command(settings: Settings, *, team_id: str) -> int:
    from bot.cli.keys import open_store
    from bot.slack.secrets import list_secrets

    async with open_store(settings) as (db, _keyring):
        rows = await list_secrets(db, team_id=team_id)
    if not rows:
        print(f"workspace {team_id} has no secrets.")
        return 0
    width = max(len("NAME"), *(len(row.name) for row in rows))
    print(f"{'NAME':<{width}}  {'SET AT (UTC)':<16}  SET BY")
    for row in rows:
        print(f"{row.name:<{width}}  {row.set_at:%Y-%m-%d %H:%M}  {row.set_by_name or row.set_by}")
    return 0


async def delete_command(settings: Settings, *, team_id: str, name: str) -> int:
    from bot.cli.keys import open_store
    from bot.slack.secrets import delete_secret

    async with open_store(settings) as (db, _keyring):
        deleted = await delete_secret(db, team_id=team_id, name=name, actor=cli_actor())
    if not deleted:
        print(f"relaybot: workspace {team_id} has no secret {name}.", file=sys.stderr)
        return 1
    print(f"secret {name} deleted from workspace {team_id}.")
    return 0

"""The `relaybot` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bot.errors import ConfigError, WorkflowError
from bot.settings import Settings, load_settings

EXIT_CONFIG = 2


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # Bolt logs request bodies at debug level; keep that out of INFO logs.
    logging.getLogger("slack_bolt").setLevel(max(logging.INFO, logging.getLogger().level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from bot.app import create_app

    settings.require_for_serve(socket_mode=args.socket_mode)
    if args.socket_mode:
        raise ConfigError("--socket-mode is not available yet; serve over HTTP (the default)")
    if args.port is not None:
        settings = settings.model_copy(update={"port": args.port})
    app = create_app(settings)
    print(f"relaybot serving on http://{settings.host}:{settings.port} "
          f"(Slack requests at /slack/events, webhooks at /hooks/<connection>)", file=sys.stderr)
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)
    return 0


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from bot.engine.loader import load_file, workflow_files

    paths = [Path(path) for path in args.paths] or [settings.workflows_dir]
    missing = [path for path in paths if not path.exists()]
    if missing:
        for path in missing:
            print(f"{path}: no such file or directory", file=sys.stderr)
        return 1
    files = workflow_files(paths)
    problems = 0
    names: dict[str, Path] = {}
    for file in files:
        try:
            workflow = load_file(file)
        except WorkflowError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            problems += len(exc.problems)
            continue
        if workflow.name in names:
            print(f"{file}: the name {workflow.name!r} is already used by {names[workflow.name]}", file=sys.stderr)
            problems += 1
        names[workflow.name] = file
    if problems:
        print(f"{problems} problem{'s' if problems != 1 else ''} in {len(files)} file{'s' if len(files) != 1 else ''}",
              file=sys.stderr)
        return 1
    print(f"{len(files)} workflow{'s' if len(files) != 1 else ''} OK")
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store import migrate
    from bot.store.db import Database

    async def run() -> None:
        db = Database(settings.database_url)
        try:
            await migrate.upgrade(db)
            print(f"database at revision {await migrate.current_revision(db)}")
        finally:
            await db.dispose()

    asyncio.run(run())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaybot", description="Event-driven DevOps workflows in Slack.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the bot over HTTP (Slack events, webhooks, health, metrics)")
    serve.add_argument("--port", type=int, help="HTTP port (default: PORT or 3000)")
    serve.add_argument("--socket-mode", action="store_true", help="connect to Slack with Socket Mode")
    serve.set_defaults(handler=cmd_serve)

    validate = sub.add_parser("validate", help="check workflow files; every problem with file and line")
    validate.add_argument("paths", nargs="*", help="files or directories (default: the workflows directory)")
    validate.set_defaults(handler=cmd_validate)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", help="apply every migration (also done when the bot starts)")
    db.set_defaults(handler=cmd_db)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        return handler(args, settings)
    except ConfigError as exc:
        print(f"relaybot: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except WorkflowError as exc:
        print("relaybot: the workflows have problems:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

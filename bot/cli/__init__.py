"""The `relaybot` command: one module per subcommand, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from bot.cli import audit, db, dev, dryrun, events, keys, secrets, serve, validate
from bot.cli.common import EXIT_CONFIG, configure_logging
from bot.errors import ConfigError, DecryptionError, WorkflowError
from bot.settings import Settings, load_settings

SUBCOMMANDS = (serve, dev, validate, dryrun, db, secrets, keys, audit, events)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaybot", description="Event-driven DevOps workflows in Slack.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
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
    except DecryptionError as exc:
        print(f"relaybot: cannot decrypt: {exc}. The master keys configured (RELAYBOT_MASTER_KEYS or the key "
              "file) must include the one that sealed it; `relaybot keys status` shows which are in use.",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

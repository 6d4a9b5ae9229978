"""`relaybot serve`: the bot over HTTP."""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

from bot.settings import Settings


def register(sub: Any) -> None:
    parser = sub.add_parser("serve", help="run the bot over HTTP (Slack events, webhooks, health, metrics)")
    parser.add_argument("--port", type=int, help="HTTP port (default: PORT or 3000)")
    parser.add_argument("--socket-mode", action="store_true", help="connect to Slack with Socket Mode")
    parser.set_defaults(handler=run)


def tune_garbage_collector() -> None:
    """Python's cyclic collector stops the process while it walks every tracked object; with default settings
    and a busy bot it did so often enough to add 50-100 ms to one request in a hundred. What was built at start
    (modules, the catalog, compiled expressions) is set aside for good, and collections run less often: the
    young generation is collected after 20,000 allocations instead of 700, the oldest after 400 of those."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from bot.app import create_app

    settings.require_for_serve(socket_mode=args.socket_mode)
    if args.port is not None:
        settings = settings.model_copy(update={"port": args.port})
    # SQLite work runs on aiosqlite's threads: every query hands the GIL over and back. With Python's default
    # 5 ms switch interval a busy event loop makes each hand-over wait up to 5 ms; 0.5 ms keeps queries quick.
    sys.setswitchinterval(0.0005)
    app = create_app(settings, socket_mode=args.socket_mode)
    tune_garbage_collector()
    slack_door = "Slack over Socket Mode" if args.socket_mode else "Slack requests at /slack/events"
    print(f"relaybot serving on http://{settings.host}:{settings.port} "
          f"({slack_door}, webhooks at /hooks/<connection>)", file=sys.stderr)
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)
    return 0

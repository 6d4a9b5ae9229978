"""`relaybot serve`: the bot over HTTP; with `--workers N`, N processes sharing the port (bot/cli/workers.py)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from bot.cli.common import name_the_worker
from bot.errors import ConfigError
from bot.settings import Settings


def register(sub: Any) -> None:
    parser = sub.add_parser("serve", help="run the bot over HTTP (Slack events, webhooks, health, metrics)")
    parser.add_argument("--port", type=int, help="HTTP port (default: PORT or 3000)")
    parser.add_argument("--socket-mode", action="store_true", help="connect to Slack with Socket Mode")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="bot processes sharing the port, to use N cores (default: RELAYBOT_WORKERS or 1)")
    # Internal: set by the supervisor of `--workers N` on each worker it starts (never by hand).
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def tune_garbage_collector() -> None:
    """Python's cyclic collector stops the process while it walks every tracked object; with default settings
    and a busy bot it did so often enough to add 50-100 ms to one request in a hundred. What was built at start
    (modules, the catalog, compiled expressions) is set aside for good, and collections run less often: the
    young generation is collected after 20,000 allocations instead of 700, the oldest after 400 of those."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def worker_count(args: argparse.Namespace, settings: Settings) -> int:
    """How many processes to run, checked against the other options; 1 in a worker itself."""
    if args.worker_index is not None:
        return 1
    workers: int = args.workers if args.workers is not None else settings.workers
    option = f"--workers {workers}" if args.workers is not None else f"RELAYBOT_WORKERS={workers}"
    if workers < 1:
        raise ConfigError(f"{option}: the number of worker processes must be at least 1")
    if workers > 1 and args.socket_mode:
        raise ConfigError(f"{option} cannot be used with --socket-mode: Socket Mode receives Slack's requests over "
                          "the bot's own WebSocket, there is no port to share; run one process")
    return workers


def run(args: argparse.Namespace, settings: Settings) -> int:
    workers = worker_count(args, settings)
    settings.require_for_serve(socket_mode=args.socket_mode)
    if args.port is not None:
        if not 0 <= args.port <= 65535:  # model_copy does not validate: the field's own check never ran
            raise ConfigError(f"--port: {args.port} is not a port (0-65535)")
        settings = settings.model_copy(update={"port": args.port})
    if workers > 1:
        return supervise(settings, workers=workers)
    return serve(settings, socket_mode=args.socket_mode, worker_index=args.worker_index)


def serve(settings: Settings, *, socket_mode: bool, worker_index: int | None) -> int:
    """One bot process: the whole of `relaybot serve`, or one worker of `--workers N`."""
    from aiohttp import web

    from bot.app import create_app

    # SQLite work runs on aiosqlite's threads: every query hands the GIL over and back. With Python's default
    # 5 ms switch interval a busy event loop makes each hand-over wait up to 5 ms; 0.5 ms keeps queries quick.
    sys.setswitchinterval(0.0005)
    app = create_app(settings, socket_mode=socket_mode)
    if worker_index is not None:
        app.cleanup_ctx.append(stop_with_the_supervisor(os.getppid()))
        name_the_worker(worker_index)
    tune_garbage_collector()
    slack_door = "Slack over Socket Mode" if socket_mode else "Slack requests at /slack/events"
    who = "relaybot" if worker_index is None else f"relaybot worker {worker_index} (pid {os.getpid()})"

    def announce(_aiohttp_says: str) -> None:
        # Once the app's own start-up (the database reached, migrations applied) is done and the port is bound:
        # either may stop it instead.
        print(f"{who} serving on http://{settings.host}:{settings.port} "
              f"({slack_door}, webhooks at /hooks/<connection>)", file=sys.stderr)

    try:
        # A worker shares the port with its siblings: the kernel spreads the connections over them.
        web.run_app(app, host=settings.host, port=settings.port, print=announce, access_log=None,
                    reuse_port=worker_index is not None)
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {os.strerror(exc.errno)} "
                          "(PORT or --port chooses another port, RELAYBOT_HOST another address)") from None
    return 0


def stop_with_the_supervisor(supervisor_pid: int) -> Any:
    from bot.cli.workers import watch_supervisor

    async def watching(app: Any) -> AsyncIterator[None]:
        watcher = asyncio.create_task(watch_supervisor(supervisor_pid))
        yield
        watcher.cancel()

    return watching


def supervise(settings: Settings, *, workers: int) -> int:
    """What must happen once before the workers start, then the supervisor."""
    from bot.app import default_key_file
    from bot.cli.workers import Supervisor
    from bot.crypto import load_master_keys
    from bot.engine.loader import Catalog

    if settings.port == 0:
        raise ConfigError("--workers needs a fixed port (PORT or --port), not 0: each worker would get its own")
    # Problems are reported here, once, rather than by N workers that would each die of them.
    Catalog.load([settings.workflows_dir])
    # Generates ./relaybot.key on a first start without keys, here, before N workers would race to.
    load_master_keys(keys=settings.master_keys, key_file=settings.master_key_file,
                     default_file=default_key_file(settings))
    asyncio.run(apply_migrations(settings))
    print(f"relaybot serving on http://{settings.host}:{settings.port} with {workers} worker processes "
          f"(Slack requests at /slack/events, webhooks at /hooks/<connection>)", file=sys.stderr)
    return asyncio.run(Supervisor(count=workers, port=settings.port).run())


async def apply_migrations(settings: Settings) -> None:
    from bot.store import migrate
    from bot.store.db import Database

    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db)
    finally:
        await db.dispose()

"""Shared pieces of the `relaybot` subcommands."""

from __future__ import annotations

import logging
import sys

EXIT_CONFIG = 2


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    # Bolt logs request bodies at debug level; keep that out of INFO logs.
    logging.getLogger("slack_bolt").setLevel(max(logging.INFO, logging.getLogger().level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def name_the_worker(index: int) -> None:
    """Every log line of a `serve --workers N` worker says which worker wrote it (they share one stderr)."""
    formatter = logging.Formatter(LOG_FORMAT.replace("%(name)s", f"worker {index} %(name)s"))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)

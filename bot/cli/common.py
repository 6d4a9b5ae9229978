"""Shared pieces of the `relaybot` subcommands."""

from __future__ import annotations

import logging
import sys

EXIT_CONFIG = 2


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # Bolt logs request bodies at debug level; keep that out of INFO logs.
    logging.getLogger("slack_bolt").setLevel(max(logging.INFO, logging.getLogger().level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

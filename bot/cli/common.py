"""Shared pieces of the `relaybot` subcommands."""

from __future__ import annotations

import logging
import sys

from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped

EXIT_CONFIG = 2


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    # Bolt logs request bodies at debug level; keep that out of INFO logs.
    logging.getLogger("slack_bolt").setLevel(max(logging.INFO, logging.getLogger().level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("slack_bolt.AsyncApp").addFilter(_TokenReadTwice())


class _TokenReadTwice(logging.Filter):
    """Bolt reads SLACK_BOT_TOKEN from the environment by itself, and then warns on every start that the client
    relaybot gives it wins over that token: it is the same token, so the warning only worries the operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != warning_client_prioritized_and_token_skipped()


def name_the_worker(index: int) -> None:
    """Every log line of a `serve --workers N` worker says which worker wrote it (they share one stderr)."""
    formatter = logging.Formatter(LOG_FORMAT.replace("%(name)s", f"worker {index} %(name)s"))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)

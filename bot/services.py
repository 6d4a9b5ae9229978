"""What listeners and doors need, built once by the app factory and passed down (never a global)."""

from __future__ import annotations

from dataclasses import dataclass

from bot.crypto import Keyring
from bot.engine.intake import Intake
from bot.engine.loader import Catalog
from bot.engine.triggers.loop import TriggerLoop
from bot.engine.worker import Engine
from bot.hooks import ConnectionCache
from bot.housekeeping import Housekeeping
from bot.masking import LogMasker
from bot.metrics import Metrics
from bot.settings import Settings
from bot.slack.client import SlackApi
from bot.slack.installations import EncryptedInstallationStore
from bot.slack.outbox import Outbox
from bot.slack.people import People
from bot.store.db import Database
from bot.store.inbox import Inbox
from integrations.httpclient import HttpClient


@dataclass
class Services:
    settings: Settings
    db: Database
    catalog: Catalog
    keyring: Keyring
    metrics: Metrics
    slack: SlackApi
    people: People
    inbox: Inbox
    intake: Intake
    engine: Engine
    outbox: Outbox
    log_masker: LogMasker
    connections: ConnectionCache
    http: HttpClient
    installations: EncryptedInstallationStore | None = None
    housekeeping: Housekeeping | None = None
    triggers: TriggerLoop | None = None

    def wake(self) -> None:
        """New work was committed: let the engine and the outbox look now rather than at their next poll."""
        self.engine.wake()
        self.outbox.wake()

    def forget_connection(self, connection_id: str) -> None:
        self.connections.forget(connection_id)

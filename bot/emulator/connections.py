"""What a person would copy from the bot's replies into their tool's webhook settings: URL and secret.

The emulator plays the tools too ("send event"), so it reads the connection URL and the secret from the
ephemeral replies of `/relay enable` and `/relay connect`, exactly as a person reads them. It never asks the
bot's database: a connection whose secret it has not seen needs `/relay connect <integration> rotate`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

_HOOK_URL = re.compile(r"`(https?://[^`\s]+/hooks/([A-Za-z0-9_.-]+))`")
_INTEGRATION = re.compile(r"\*([a-z0-9_-]+)\*[^\n]*connection")
# "Secret: `…`" or "New secret for the *github* connection: `…`"; a command in backticks has spaces, a secret not.
_SECRET = re.compile(r"[Ss]ecret[^`\n]*`([^`\s]+)`")


@dataclass
class KnownConnection:
    integration: str
    connection_id: str
    url: str
    secret: str | None


def read_connections(text: str) -> list[KnownConnection]:
    """Every connection a reply announces, one per paragraph that holds a `/hooks/` URL."""
    found: list[KnownConnection] = []
    for paragraph in text.split("\n\n"):
        url = _HOOK_URL.search(paragraph)
        integration = _INTEGRATION.search(paragraph)
        if url is None or integration is None:
            continue
        secret = _SECRET.search(paragraph)
        found.append(KnownConnection(integration=integration.group(1), connection_id=url.group(2),
                                     url=url.group(1), secret=secret.group(1) if secret else None))
    return found


class ConnectionBook:
    """team → integration → the connection last announced to anyone in that workspace."""

    def __init__(self) -> None:
        self.by_team: dict[str, dict[str, KnownConnection]] = {}

    def learn(self, team_id: str, text: str | None) -> list[KnownConnection]:
        learned = read_connections(text or "")
        for connection in learned:
            known = self.by_team.setdefault(team_id, {})
            previous = known.get(connection.integration)
            if (connection.secret is None and previous is not None
                    and previous.connection_id == connection.connection_id):
                connection.secret = previous.secret  # "the secret was shown before": keep the one we saw
            known[connection.integration] = connection
        return learned

    def get(self, team_id: str, integration: str) -> KnownConnection | None:
        return self.by_team.get(team_id, {}).get(integration)

    def for_team(self, team_id: str) -> dict[str, KnownConnection]:
        return dict(self.by_team.get(team_id, {}))

    def to_data(self) -> dict[str, Any]:
        return {team: {name: asdict(known) for name, known in connections.items()}
                for team, connections in self.by_team.items()}

    def load_data(self, data: dict[str, Any]) -> None:
        self.by_team = {team: {name: KnownConnection(**known) for name, known in connections.items()}
                        for team, connections in data.items()}

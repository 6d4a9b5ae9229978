"""What a person would copy from the bot's replies into their tool's webhook settings: URL and secret.

The emulator plays the tools too ("send event"), so it reads the connection URL and the secret from the
ephemeral replies of `/relay enable` and `/relay connect`, exactly as a person reads them. It never asks the
bot's database: a connection whose secret it has not seen needs `/relay connect <integration> rotate`.

Some tools make the signing secret themselves (PagerDuty): the emulated tool has one of its own, shown on the
page, and when the person pastes it into relaybot's form (`/relay connect <integration> set-secret`) and the
form is accepted, the tool signs with it from then on.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import asdict, dataclass
from typing import Any

_HOOK_URL = re.compile(r"`(https?://[^`\s]+/hooks/([A-Za-z0-9_.-]+))`")
_INTEGRATION = re.compile(r"\*([a-z0-9_-]+)\*[^\n]*connection")
# Exactly where relaybot shows a secret: "Secret: `…`" or "New secret for the *github* connection: `…`". Other
# backticked words near "secret" (a header name in a setup hint, say) are not secrets.
_SECRET = re.compile(r"(?:^|\n)(?:Secret: |:arrows_counterclockwise: New secret for the \*[a-z0-9_-]+\* connection: )"
                     r"`([^`\s]+)`")


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
        self.tool_secrets: dict[str, dict[str, str]] = {}  # team → integration → the tool's own secret

    def learn(self, team_id: str, text: str | None) -> list[KnownConnection]:
        learned = read_connections(text or "")
        for connection in learned:
            known = self.by_team.setdefault(team_id, {})
            previous = known.get(connection.integration)
            if (connection.secret is None and previous is not None
                    and previous.connection_id in (connection.connection_id, "")):
                connection.secret = previous.secret  # "the secret was shown before": keep the one we saw
            known[connection.integration] = connection
        return learned

    def get(self, team_id: str, integration: str) -> KnownConnection | None:
        return self.by_team.get(team_id, {}).get(integration)

    def for_team(self, team_id: str) -> dict[str, KnownConnection]:
        return dict(self.by_team.get(team_id, {}))

    def tool_secret(self, team_id: str, integration: str) -> str:
        """The secret a tool that makes its own would show when its webhook is set up (made on first use)."""
        return self.tool_secrets.setdefault(team_id, {}).setdefault(integration, secrets.token_urlsafe(36))

    def adopt_pasted(self, team_id: str, value: str) -> str | None:
        """A form relaybot accepted held a tool's own secret: that tool signs with it now. Its integration."""
        for integration, own in self.tool_secrets.get(team_id, {}).items():
            if hmac.compare_digest(value.strip().encode(), own.encode()):
                previous = self.get(team_id, integration)
                self.by_team.setdefault(team_id, {})[integration] = KnownConnection(
                    integration=integration, connection_id=previous.connection_id if previous else "",
                    url=previous.url if previous else "", secret=own)
                return integration
        return None

    def to_data(self) -> dict[str, Any]:
        return {"known": {team: {name: asdict(known) for name, known in connections.items()}
                          for team, connections in self.by_team.items()},
                "tool_secrets": self.tool_secrets}

    def load_data(self, data: dict[str, Any], *, teams: set[str]) -> None:
        self.by_team = {team: {name: KnownConnection(**known) for name, known in connections.items()}
                        for team, connections in (data.get("known") or {}).items() if team in teams}
        self.tool_secrets = {team: dict(own) for team, own in (data.get("tool_secrets") or {}).items()
                             if team in teams}

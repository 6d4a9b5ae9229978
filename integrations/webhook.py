"""The generic `webhook` trigger: any JSON or form body, verified by whichever scheme the sender can do.

- Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
  "id.timestamp.body">` (several space-separated signatures allowed; 5-minute window). The key is the secret's
  bytes, or the base64-decoded part of a `whsec_…` secret.
- `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`.
- `Authorization: Bearer <secret>`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from typing import ClassVar

from integrations.base import (
    IncomingWebhook,
    Integration,
    ParsedEvent,
    constant_time_equal,
    parse_json_body,
    verify_bearer,
    verify_hub_signature,
)

TOLERANCE_SECONDS = 5 * 60


def standard_webhooks_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except binascii.Error:
            return secret.encode()
    return secret.encode()


def standard_webhooks_signature(*, secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(standard_webhooks_key(secret), f"{msg_id}.{timestamp}.".encode("utf-8", "surrogateescape") + body,
                      hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


_EPOCH_SECONDS = re.compile(r"[0-9]{1,12}")


def verify_standard_webhooks(*, secret: str, request: IncomingWebhook, now: float) -> bool:
    msg_id = request.header("webhook-id")
    timestamp = request.header("webhook-timestamp")
    signatures = request.header("webhook-signature")
    if not secret or not msg_id or not timestamp or not signatures:
        return False
    # Seconds since the epoch, as ASCII digits: `int()` would also take a 400-digit number (which overflows the
    # comparison below), signs, underscores and other scripts' digits.
    if not _EPOCH_SECONDS.fullmatch(timestamp):
        return False
    if abs(now - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    expected = standard_webhooks_signature(secret=secret, msg_id=msg_id, timestamp=timestamp, body=request.body)
    matched = False
    for candidate in signatures.split():
        # Compare every candidate so the time taken does not depend on which one matched.
        matched |= constant_time_equal(expected, candidate)
    return matched


class Webhook(Integration):
    name: ClassVar[str] = "webhook"
    title: ClassVar[str] = "Any JSON webhook"

    def verify(self, *, secret: str, request: IncomingWebhook, now: float) -> bool:
        """Any one valid scheme of those the request carries: a relay that forwards the original sender's
        signature header and adds relaybot's bearer token is the sender relaybot knows (every scheme present is
        checked, whichever matched)."""
        valid = False
        if request.header("webhook-signature") is not None:
            valid |= verify_standard_webhooks(secret=secret, request=request, now=now)
        if request.header("X-Hub-Signature-256") is not None:
            valid |= verify_hub_signature(secret=secret, body=request.body,
                                          header=request.header("X-Hub-Signature-256"))
        if request.header("Authorization") is not None:
            valid |= verify_bearer(secret=secret, header=request.header("Authorization"))
        return valid

    def parse(self, request: IncomingWebhook) -> ParsedEvent:
        payload = parse_json_body(request)
        delivery = request.header("webhook-id") or request.header("X-Request-Id")
        summary = ""
        if isinstance(payload, dict):
            for key in ("summary", "title", "message", "text", "name"):
                if isinstance(payload.get(key), str) and payload[key].strip():
                    summary = payload[key].strip().splitlines()[0][:200]
                    break
        link = payload.get("url") if isinstance(payload, dict) and isinstance(payload.get("url"), str) else None
        kept = {name: request.header(name) or "" for name in ("Content-Type", "User-Agent", "webhook-id",
                                                                "X-Request-Id") if request.header(name)}
        return ParsedEvent(kind="webhook", payload=payload, delivery_id=delivery, summary=summary or "Webhook",
                           link=link, headers=kept, event_name="webhook")

    def setup_hint(self, *, url: str, secret: str) -> str:
        return (f"POST JSON to {url} signed with {secret}: Standard Webhooks (`webhook-signature`), "
                "`X-Hub-Signature-256: sha256=<hex HMAC>`, or `Authorization: Bearer <secret>`.")

"""The tools' side of a webhook: example payloads, and how each tool signs what it sends.

Examples are JSON files packaged with the code under `integrations/examples/<integration>/*.json`, each exactly
the body the tool sends. A file's name says what it is: for GitHub `<X-GitHub-Event>.<action>.json`
(`pull_request.closed.json`), for the others a short label. Adding an integration's examples is dropping files
in its folder; adding its signer is one function in `SIGNERS`.

The signers are written from the tools' documentation, independently of `integrations/*.verify()`, so the
emulator checks the bot the way the real tools would.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import integrations

GITLAB_EVENT_HEADERS = {
    "push": "Push Hook", "tag_push": "Tag Push Hook", "issue": "Issue Hook", "note": "Note Hook",
    "merge_request": "Merge Request Hook", "wiki_page": "Wiki Page Hook", "pipeline": "Pipeline Hook",
    "build": "Job Hook", "deployment": "Deployment Hook", "release": "Release Hook",
    "feature_flag": "Feature Flag Hook", "emoji": "Emoji Hook",
}


def examples_root() -> Path:
    return Path(integrations.__file__).resolve().parent / "examples"


@dataclass(frozen=True)
class Example:
    integration: str
    name: str  # the file name without `.json`
    path: Path

    def body(self) -> bytes:
        return self.path.read_bytes()


def list_examples(root: Path | None = None) -> dict[str, list[Example]]:
    """integration → its example files, sorted by name (folders without JSON files are left out)."""
    root = root or examples_root()
    found: dict[str, list[Example]] = {}
    if not root.is_dir():
        return found
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        files = sorted(folder.glob("*.json"))
        if files:
            found[folder.name] = [Example(folder.name, file.stem, file) for file in files]
    return found


def find_example(integration: str, name: str, root: Path | None = None) -> Example | None:
    for example in list_examples(root).get(integration, []):
        if example.name == name:
            return example
    return None


@dataclass(frozen=True)
class Delivery:
    """One signed request, ready to POST to a connection URL."""

    body: bytes
    headers: dict[str, str]


def _hmac_hex(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_github(*, body: bytes, secret: str, event: str | None, now: float) -> Delivery:
    """GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`, the event in `X-GitHub-Event`."""
    return Delivery(body, {
        "Content-Type": "application/json", "User-Agent": "GitHub-Hookshot/relaybot-emulator",
        "X-GitHub-Event": event or "ping", "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "1", "X-Hub-Signature-256": "sha256=" + _hmac_hex(secret.encode(), body),
    })


def _standard_webhooks_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            pass
    return secret.encode()


def sign_webhook(*, body: bytes, secret: str, event: str | None, now: float) -> Delivery:
    """The generic webhook, signed the Standard Webhooks way (`webhook-id`, `-timestamp`, `-signature`)."""
    message_id = "msg_" + secrets.token_hex(12)
    stamp = str(int(now))
    digest = hmac.new(_standard_webhooks_key(secret), f"{message_id}.{stamp}.".encode() + body, hashlib.sha256)
    return Delivery(body, {
        "Content-Type": "application/json", "webhook-id": message_id, "webhook-timestamp": stamp,
        "webhook-signature": "v1," + base64.b64encode(digest.digest()).decode(),
    })


def sign_gitlab(*, body: bytes, secret: str, event: str | None, now: float) -> Delivery:
    """GitLab sends the secret itself in `X-Gitlab-Token`; `X-Gitlab-Event` follows the body's object_kind."""
    if event is None:
        try:
            kind = json.loads(body).get("object_kind", "")
        except (ValueError, AttributeError):
            kind = ""
        event = GITLAB_EVENT_HEADERS.get(kind, "System Hook")
    return Delivery(body, {
        "Content-Type": "application/json", "User-Agent": "GitLab/17.5.0", "X-Gitlab-Event": event,
        "X-Gitlab-Token": secret, "X-Gitlab-Event-UUID": str(uuid.uuid4()), "Idempotency-Key": str(uuid.uuid4()),
        "X-Gitlab-Instance": "https://gitlab.example.com",
    })


def sign_pagerduty(*, body: bytes, secret: str, event: str | None, now: float) -> Delivery:
    """PagerDuty V3: `X-PagerDuty-Signature: v1=<hex HMAC-SHA256 of the body>`."""
    return Delivery(body, {
        "Content-Type": "application/json", "User-Agent": "PagerDuty-Webhook/V3.0",
        "X-PagerDuty-Signature": "v1=" + _hmac_hex(secret.encode(), body), "X-Webhook-Id": str(uuid.uuid4()),
        "X-Webhook-Subscription": "PSUBSCR",
    })


def sign_alertmanager(*, body: bytes, secret: str, event: str | None, now: float) -> Delivery:
    """Alertmanager's `http_config.authorization` (bearer credentials)."""
    return Delivery(body, {"Content-Type": "application/json", "User-Agent": "Alertmanager/0.27.0",
                           "Authorization": f"Bearer {secret}"})


Signer = Callable[..., Delivery]

SIGNERS: dict[str, Signer] = {
    "github": sign_github, "webhook": sign_webhook, "gitlab": sign_gitlab, "pagerduty": sign_pagerduty,
    "alertmanager": sign_alertmanager,
}


def event_name_for(integration: str, example_name: str) -> str | None:
    """The event header an example stands for, where the tool sends one outside the body (GitHub)."""
    if integration == "github":
        return example_name.split(".")[0]
    return None


def sign(integration: str, *, body: bytes, secret: str, event: str | None = None,
         now: float | None = None) -> Delivery:
    signer = SIGNERS.get(integration)
    if signer is None:
        raise KeyError(f"the emulator cannot sign {integration} webhooks yet (add a signer to SIGNERS)")
    return signer(body=body, secret=secret, event=event, now=time.time() if now is None else now)

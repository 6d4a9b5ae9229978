"""What every integration is made of: a webhook `verify()` and `parse()`, a trigger filter, a default card, and
actions with typed inputs and outputs.

Integrations never import `bot`: whatever they need (an HTTP client, a Slack poster, base URLs) arrives per call
in an `ActionContext`, so the same code runs in the server, in `relaybot test` and in the tests.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict

from integrations import jsontext
from integrations.httpclient import HttpClient

# ---------------------------------------------------------------------------------------------- webhooks


@dataclass(frozen=True)
class IncomingWebhook:
    """One inbound request, as the webhook door received it."""

    body: bytes
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDict, or a dict with lower-case keys)
    query: Mapping[str, str] = field(default_factory=dict)
    remote: str | None = None

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        if value is None:
            value = self.headers.get(name.lower())
        return value


class BadPayload(Exception):
    """The body is not what the integration accepts (malformed JSON, a missing field): HTTP 400."""


@dataclass
class ParsedEvent:
    """An event in the shape workflows see: `event` is `payload`, `trigger.kind` is `kind`."""

    kind: str
    payload: Any
    delivery_id: str | None
    summary: str
    link: str | None = None
    # Headers kept for `trigger.headers` (never an Authorization or signature header).
    headers: dict[str, str] = field(default_factory=dict)
    # Filter value compared with a trigger's `events:` list (X-GitHub-Event, object_kind, event_type …).
    event_name: str | None = None
    # False for events that only test the connection (GitHub's `ping`): answered, and run only if subscribed.
    actionable: bool = True
    # For senders without a delivery id (Alertmanager): `delivery_id` is a content hash, and the same hash
    # seen within this many seconds is a duplicate.
    dedupe_window: float | None = None


def parse_json_body(request: IncomingWebhook) -> Any:
    """JSON, or a form body (`application/x-www-form-urlencoded`, with GitHub's `payload=` convention), in the
    charset the `Content-Type` names (UTF-8 if none)."""
    content_type, _, parameters = (request.header("Content-Type") or "").partition(";")
    content_type = content_type.strip().lower()
    charset = "utf-8"
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    try:
        text = request.body.decode(charset) if request.body else ""
        # RFC 8259 lets a parser ignore a byte order mark; some senders (PowerShell, .NET) write one.
        text = text.removeprefix("\ufeff")
        if content_type == "application/x-www-form-urlencoded":
            form = dict(parse_qsl(text, keep_blank_values=True))
            if set(form) == {"payload"}:
                return jsontext.loads(form["payload"])
            return form
        return jsontext.loads(text)
    except LookupError:
        raise BadPayload(f"the body's charset {charset!r} is unknown") from None
    except UnicodeDecodeError as exc:
        raise BadPayload(f"the body is not valid {charset} text: {exc}") from None
    except RecursionError:
        raise BadPayload("the body's JSON is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, and numbers too long to read ("Exceeds the limit …")
        raise BadPayload(f"the body is not valid JSON: {exc}") from None


def dig(data: Any, *path: str | int) -> Any:
    """`data[path[0]][path[1]]…`, or None where the payload has no such value (payloads are untrusted)."""
    for key in path:
        if isinstance(key, int) and isinstance(data, list) and -len(data) <= key < len(data):
            data = data[key]
        elif isinstance(key, str) and isinstance(data, dict):
            data = data.get(key)
        else:
            return None
    return data


def mapping(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (payloads are untrusted)."""
    return value if isinstance(value, dict) else {}


def text_of(value: Any, *, limit: int = 200) -> str:
    """A payload value as one short line of text ('' for None, lists, maps)."""
    if value is None or isinstance(value, dict | list):
        return ""
    line = str(value).strip().splitlines()[0] if str(value).strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def hmac_sha256_hex(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    # Header values that were not UTF-8 arrive with surrogates in place of their bytes: never equal, never an error.
    a_bytes = a.encode("utf-8", "surrogatepass") if isinstance(a, str) else a
    b_bytes = b.encode("utf-8", "surrogatepass") if isinstance(b, str) else b
    return hmac.compare_digest(a_bytes, b_bytes)


def verify_hub_signature(*, secret: str, body: bytes, header: str | None) -> bool:
    """`X-Hub-Signature-256: sha256=<hex>` (GitHub and many others). No secret or no header: rejected."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    expected = "sha256=" + hmac_sha256_hex(secret.encode(), body)
    return constant_time_equal(expected, header.strip())


def verify_bearer(*, secret: str, header: str | None) -> bool:
    if not secret or not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and constant_time_equal(token.strip(), secret)


# ---------------------------------------------------------------------------------------------- cards


class CardSpec(BaseModel):
    """What an integration proposes for a run's card; a workflow's `card:` overrides any of it."""

    title: str | None = None
    fields: dict[str, str] = {}
    link: str | None = None


# ---------------------------------------------------------------------------------------------- actions


class SlackPoster(Protocol):
    async def post_message(self, *, channel: str, text: str, blocks: list[dict[str, Any]] | None = None,
                           thread_ts: str | None = None) -> dict[str, Any]: ...


class ActionFailed(Exception):
    """An action failed; the message is shown in the step's audit thread reply (after masking)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


@dataclass
class ActionContext:
    http: HttpClient
    slack: SlackPoster | None
    idempotency_key: str
    channel: str | None = None
    thread_ts: str | None = None
    timeout: float = 30.0
    base_urls: Mapping[str, str] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("relaybot.actions"))

    def base_url(self, integration: str, default: str) -> str:
        return self.base_urls.get(integration, default).rstrip("/")


class ActionInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActionOutput(BaseModel):
    model_config = ConfigDict(extra="allow")


InputT = TypeVar("InputT", bound=ActionInput)
OutputT = TypeVar("OutputT", bound=ActionOutput)


class Action(Generic[InputT, OutputT]):
    """One `uses:` name. Subclasses set the class variables and implement `run`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Input: ClassVar[type[ActionInput]]
    Output: ClassVar[type[ActionOutput]]
    # True when running it twice has the effect of running it once (or the target dedupes on Idempotency-Key).
    idempotent: ClassVar[bool] = False

    async def run(self, inputs: InputT, ctx: ActionContext) -> OutputT:
        raise NotImplementedError

    def is_idempotent(self, inputs: InputT) -> bool:
        return self.idempotent

    def is_idempotent_static(self, raw_inputs: dict[str, Any]) -> bool:
        """Whether running it again is safe, judged from the workflow file's `with:` before rendering."""
        return self.idempotent


# ---------------------------------------------------------------------------------------------- integrations


class TriggerConfig(BaseModel):
    """A trigger's keys under `on.<integration>:`; most integrations filter on an event name."""

    model_config = ConfigDict(extra="forbid")
    events: list[str] | None = None


class Integration:
    """An external tool: its inbound webhooks and its actions."""

    name: ClassVar[str]
    title: ClassVar[str]
    trigger_config: ClassVar[type[TriggerConfig]] = TriggerConfig
    actions: ClassVar[tuple[type[Action[Any, Any]], ...]] = ()
    # Whether relaybot generates the connection's secret (most) or the tool generates it and an admin pastes it
    # in with `/relay connect <integration> set-secret` (PagerDuty).
    secret_generated_by_tool: ClassVar[bool] = False
    receives_webhooks: ClassVar[bool] = True
    default_base_url: ClassVar[str | None] = None

    def verify(self, *, secret: str, request: IncomingWebhook, now: float) -> bool:
        raise NotImplementedError

    def parse(self, request: IncomingWebhook) -> ParsedEvent:
        raise NotImplementedError

    def matches(self, config: TriggerConfig, event: ParsedEvent) -> bool:
        if config.events is None:
            return event.actionable
        return event.event_name in config.events or event.kind in config.events

    def default_card(self, event: ParsedEvent) -> CardSpec:
        return CardSpec(title=event.summary or event.kind, link=event.link)

    def setup_hint(self, *, url: str, secret: str) -> str:
        """How to point the tool at the connection URL (one or two sentences, mrkdwn). `secret` is how to name
        the connection's secret to the reader ("the secret above" when it is shown with the hint)."""
        return f"Send webhooks to {url}, signed with {secret}."


Handler = Callable[..., Awaitable[Any]]

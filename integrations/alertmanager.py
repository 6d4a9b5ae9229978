"""Prometheus Alertmanager: webhook notifications (`version: "4"`) with bearer or basic auth, and
`alertmanager.silence` on the API v2.

Alertmanager sends no delivery id, and a highly available pair sends every notification once from each peer, so
a notification's identity is a hash of what it says; the same hash within five minutes is a duplicate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, model_validator

from integrations.apicall import call_api, json_object, output_from
from integrations.base import (
    Action,
    ActionContext,
    ActionInput,
    ActionOutput,
    BadPayload,
    CardSpec,
    IncomingWebhook,
    Integration,
    ParsedEvent,
    constant_time_equal,
    dig,
    parse_json_body,
    text_of,
    verify_bearer,
)

BASIC_AUTH_USER = "relaybot"
DEDUPE_SECONDS = 300.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def verify_basic(*, secret: str, header: str | None) -> bool:
    """`Authorization: Basic base64(relaybot:<secret>)`."""
    if not secret or not header:
        return False
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    # Both compared, so the time taken does not tell which one was wrong.
    user_ok = constant_time_equal(user, BASIC_AUTH_USER)
    password_ok = constant_time_equal(password, secret)
    return user_ok and password_ok


def notification_hash(payload: dict[str, Any]) -> str:
    """What makes two notifications the same: the group, the receiver, the status and each alert's identity
    and times — not `externalURL` or `generatorURL`, which differ between the peers of an HA pair."""
    alerts = sorted(
        json.dumps({"fingerprint": alert.get("fingerprint"), "labels": alert.get("labels"),
                     "status": alert.get("status"), "startsAt": alert.get("startsAt"),
                     "endsAt": alert.get("endsAt")}, sort_keys=True)
         for alert in payload.get("alerts") or [] if isinstance(alert, dict))
    identity = {"groupKey": payload.get("groupKey"), "receiver": payload.get("receiver"),
                "status": payload.get("status"), "alerts": alerts}
    return "am-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _labels(payload: dict[str, Any]) -> dict[str, str]:
    labels = payload.get("commonLabels")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def alert_names(payload: dict[str, Any]) -> list[str]:
    common = _labels(payload).get("alertname") or text_of(dig(payload, "groupLabels", "alertname"))
    if common:
        return [common]
    names: list[str] = []
    for alert in payload.get("alerts") or []:
        name = text_of(dig(alert, "labels", "alertname"))
        if name and name not in names:
            names.append(name)
    return names


def summarize(payload: dict[str, Any]) -> str:
    """`[FIRING:2] HighErrorRate (job=api, severity=page): API 5xx ratio above 5%`, as Alertmanager's own
    templates title a notification."""
    status = text_of(payload.get("status")) or "unknown"
    alerts = [alert for alert in payload.get("alerts") or [] if isinstance(alert, dict)]
    count = sum(1 for alert in alerts if alert.get("status") == status) or len(alerts)
    names = alert_names(payload)
    name = names[0] if len(names) == 1 else (f"{names[0]} and {len(names) - 1} more" if names else "alert")
    others = ", ".join(f"{key}={value}" for key, value in sorted(_labels(payload).items()) if key != "alertname")
    text = f"[{status.upper()}:{count}] {name}" + (f" ({others})" if others else "")
    description = text_of(dig(payload, "commonAnnotations", "summary")
                          or dig(payload, "commonAnnotations", "description"))
    return f"{text}: {description}" if description else text


class Alertmanager(Integration):
    name: ClassVar[str] = "alertmanager"
    title: ClassVar[str] = "Prometheus Alertmanager"

    def verify(self, *, secret: str, request: IncomingWebhook, now: float) -> bool:
        header = request.header("Authorization")
        if header and header.strip().lower().startswith("basic "):
            return verify_basic(secret=secret, header=header)
        return verify_bearer(secret=secret, header=header)

    def parse(self, request: IncomingWebhook) -> ParsedEvent:
        payload = parse_json_body(request)
        if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
            raise BadPayload("an Alertmanager notification is a JSON object with `alerts`")
        status = payload.get("status")
        if status not in ("firing", "resolved"):
            raise BadPayload("an Alertmanager notification's status is firing or resolved")
        external = payload.get("externalURL")
        headers = {name: request.header(name) or "" for name in ("User-Agent",) if request.header(name)}
        return ParsedEvent(kind=f"alert.{status}", payload=payload, delivery_id=notification_hash(payload),
                           summary=summarize(payload), link=external if isinstance(external, str) else None,
                           headers=headers, event_name=status, dedupe_window=DEDUPE_SECONDS,
                           # A notification without alerts (a hand-made test) has nothing to act on.
                           actionable=bool(payload["alerts"]))

    def default_card(self, event: ParsedEvent) -> CardSpec:
        payload = event.payload if isinstance(event.payload, dict) else {}
        labels = _labels(payload)
        alerts = [alert for alert in payload.get("alerts") or [] if isinstance(alert, dict)]
        fields = {"Alert": ", ".join(alert_names(payload)) or "alert",
                  "Status": f"{len(alerts)} {payload.get('status')}"}
        if labels.get("severity"):
            fields["Severity"] = labels["severity"]
        instances = [text_of(dig(alert, "labels", "instance")) for alert in alerts if dig(alert, "labels", "instance")]
        if instances:
            fields["Instances"] = ", ".join(instances[:10]) + (" …" if len(instances) > 10 else "")
        runbook = text_of(dig(payload, "commonAnnotations", "runbook_url"), limit=500)
        if runbook:
            fields["Runbook"] = runbook
        return CardSpec(title=event.summary, fields=fields, link=event.link)

    def setup_hint(self, *, url: str, secret: str) -> str:
        return (f"In alertmanager.yml, add a receiver with `webhook_configs: [{{url: '{url}', "
                "http_config: {authorization: {credentials: '<secret>'}}}]`, where `<secret>` is "
                f"{secret} (or `basic_auth` with username `{BASIC_AUTH_USER}`).")


# ------------------------------------------------------------------------------------------------- actions


def parse_duration(value: Any) -> timedelta:
    """`2h`, `1h30m`, `3d`, or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return timedelta(seconds=value)
        except OverflowError:
            raise ValueError(f"{value!r} is longer than any duration can be") from None
    text = str(value).replace(" ", "") if isinstance(value, str) else ""
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise ValueError(f"{value!r} is not a duration (use e.g. 30m, 2h or 1d)")
    try:
        return timedelta(seconds=total)
    except OverflowError:
        raise ValueError(f"{value!r} is longer than any duration can be") from None


class Matcher(ActionInput):
    name: str = Field(min_length=1)
    value: str
    isRegex: bool = False  # Alertmanager's own field names
    isEqual: bool = True


class SilenceInput(ActionInput):
    url: str = Field(pattern=r"^https?://", description="the Alertmanager's URL (http://alertmanager:9093)")
    labels: dict[str, str] = Field(default_factory=dict,
                                   description="labels to match exactly, e.g. the alert's commonLabels")
    matchers: list[Matcher] = Field(default_factory=list, description="more matchers (regex or negative)")
    duration: Annotated[timedelta, BeforeValidator(parse_duration)] = Field(description="how long, e.g. 2h")
    created_by: str = Field(default="relaybot", min_length=1)
    comment: str = Field(default="Silenced from Slack with relaybot", min_length=1)
    headers: dict[str, str] = Field(default_factory=dict, description="e.g. Authorization for a proxy in front")

    @model_validator(mode="after")
    def _something_to_match(self) -> SilenceInput:
        if not self.labels and not self.matchers:
            raise ValueError("give labels or matchers: a silence without matchers would silence everything")
        if self.duration.total_seconds() <= 0:
            raise ValueError("duration must be longer than 0s")
        return self


class SilenceOutput(ActionOutput):
    silence_id: str
    starts_at: str
    ends_at: str
    url: str


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Silence(Action[SilenceInput, SilenceOutput]):
    name: ClassVar[str] = "alertmanager.silence"
    description: ClassVar[str] = "Silence alerts matching labels for a while."
    Input = SilenceInput
    Output = SilenceOutput

    async def run(self, inputs: SilenceInput, ctx: ActionContext) -> SilenceOutput:
        base = inputs.url.rstrip("/")
        path = "/api/v2/silences"
        starts = datetime.now(UTC)
        ends = starts + inputs.duration
        matchers = [{"name": name, "value": value, "isRegex": False, "isEqual": True}
                    for name, value in sorted(inputs.labels.items())]
        matchers += [matcher.model_dump() for matcher in inputs.matchers]
        body = {"matchers": matchers, "startsAt": _rfc3339(starts), "endsAt": _rfc3339(ends),
                "createdBy": inputs.created_by, "comment": inputs.comment}
        response = await call_api(ctx, service="Alertmanager", method="POST", url=base + path, path=path,
                                  headers=inputs.headers, json_body=body)
        data = json_object(response, service="Alertmanager", path=path)
        silence_id = data.get("silenceID")
        return output_from(SilenceOutput, {"silence_id": silence_id, "starts_at": body["startsAt"],
                                           "ends_at": body["endsAt"], "url": f"{base}/#/silences/{silence_id}"},
                           service="Alertmanager", path=path)


Alertmanager.actions = (Silence,)

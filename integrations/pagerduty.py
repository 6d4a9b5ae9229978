"""PagerDuty: V3 webhooks signed with `X-PagerDuty-Signature`, and incident actions on the REST API v2.

PagerDuty generates a webhook subscription's signing secret itself; an admin stores it in relaybot with
`/relay connect pagerduty set-secret`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

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
    hmac_sha256_hex,
    mapping,
    parse_json_body,
    text_of,
)

API = "https://api.pagerduty.com"
PING = "pagey.ping"


def verify_v3_signature(*, secret: str, body: bytes, header: str | None) -> bool:
    """Any of the comma-separated `v1=<hex HMAC-SHA256 of the body>` signatures matches (several during a
    secret rotation). No secret or no header: rejected."""
    if not secret or not header:
        return False
    expected = "v1=" + hmac_sha256_hex(secret.encode(), body)
    matched = False
    for candidate in header.split(","):
        # Compare every candidate so the time taken does not depend on which one matched.
        matched |= constant_time_equal(expected, candidate.strip())
    return matched


def _service(data: dict[str, Any]) -> str:
    if data.get("type") in ("service", "service_reference"):
        return text_of(data.get("summary") or data.get("name"))
    return text_of(dig(data, "service", "summary") or dig(data, "incident", "service", "summary"))


def summarize(event: dict[str, Any]) -> tuple[str, str | None]:
    """A one-line summary naming the service (or the incident, where the event names no service), and a link."""
    event_type = str(event.get("event_type") or "")
    data = mapping(event.get("data"))
    service = _service(data) or "PagerDuty"
    agent = text_of(dig(event, "agent", "summary"))
    by = f" by {agent}" if agent else ""
    link = data.get("html_url") or dig(data, "incident", "html_url")
    if event_type == PING:
        return "PagerDuty: webhook ping", None
    if event_type.startswith("incident.") and data.get("type") == "incident":
        what = event_type.removeprefix("incident.").replace("_", " ").replace(".", " ")
        if event_type == "incident.priority_updated" and dig(data, "priority", "summary"):
            what += f" to {text_of(dig(data, 'priority', 'summary'))}"
        return f"{service}: incident #{data.get('number')} {what}{by}: {text_of(data.get('title'))}", link
    if event_type == "incident.annotated":
        incident = text_of(dig(data, "incident", "summary")) or "an incident"
        return f"{service}: note{by} on {incident}: {text_of(data.get('content'))}", link
    what = event_type.replace("_", " ").replace(".", " ") or "event"
    return f"{service}: {what}{by}", link


class PagerDuty(Integration):
    name: ClassVar[str] = "pagerduty"
    title: ClassVar[str] = "PagerDuty"
    default_base_url: ClassVar[str | None] = API
    secret_generated_by_tool: ClassVar[bool] = True

    def verify(self, *, secret: str, request: IncomingWebhook, now: float) -> bool:
        return verify_v3_signature(secret=secret, body=request.body, header=request.header("X-PagerDuty-Signature"))

    def parse(self, request: IncomingWebhook) -> ParsedEvent:
        payload = parse_json_body(request)
        event = payload.get("event") if isinstance(payload, dict) else None
        if not isinstance(event, dict) or not isinstance(event.get("event_type"), str) or not event["event_type"]:
            raise BadPayload("a PagerDuty V3 webhook body is {\"event\": {\"event_type\": …}}")
        event_type = event["event_type"]
        summary, link = summarize(event)
        # Without X-Webhook-Id the event's own id still tells a redelivery from a new event.
        delivery = request.header("X-Webhook-Id") or (str(event["id"]) if event.get("id") else None)
        headers = {name: request.header(name) or "" for name in
                   ("X-Webhook-Id", "X-Webhook-Subscription", "User-Agent") if request.header(name)}
        return ParsedEvent(kind=event_type, payload=payload, delivery_id=delivery, summary=summary,
                           link=link if isinstance(link, str) else None, headers=headers, event_name=event_type,
                           actionable=event_type != PING)

    def default_card(self, event: ParsedEvent) -> CardSpec:
        data = mapping(dig(event.payload, "event", "data"))
        fields: dict[str, str] = {}
        candidates = {"Service": _service(data), "Status": text_of(data.get("status")),
                      "Urgency": text_of(data.get("urgency")), "Priority": text_of(dig(data, "priority", "summary")),
                      "Assigned to": ", ".join(text_of(dig(item, "summary")) for item in data.get("assignees") or []
                                               if text_of(dig(item, "summary")))}
        for label, value in candidates.items():
            if value:
                fields[label] = value
        return CardSpec(title=event.summary, fields=fields, link=event.link)

    def setup_hint(self, *, url: str, secret: str) -> str:
        # PagerDuty makes the signing secret itself, so `secret` (relaybot's) is never the one to use.
        return (f"In PagerDuty: *Integrations → Generic Webhooks (v3) → New Webhook*; Webhook URL {url}. PagerDuty "
                "shows its signing secret once, when the subscription is created: that is the one to paste.")


# ------------------------------------------------------------------------------------------------- actions


def _headers(token: str, from_email: str) -> dict[str, str]:
    return {"Authorization": f"Token token={token}", "Accept": "application/vnd.pagerduty+json;version=2",
            "From": from_email}


class IncidentInput(ActionInput):
    incident: str = Field(pattern=r"^[A-Za-z0-9]+$", description="incident id (PGR0VU2)")
    token: str = Field(min_length=1, description="a REST API key")
    from_: str = Field(alias="from", pattern=r"^[^@\s]+@[^@\s]+$",
                       description="email of the PagerDuty user the change is made as")


class ResolveInput(IncidentInput):
    resolution: str | None = Field(default=None, description="why it is resolved (kept in the incident's log)")


class IncidentOutput(ActionOutput):
    id: str
    number: int | None = None
    status: str
    title: str | None = None
    url: str | None = None


async def _set_status(ctx: ActionContext, inputs: IncidentInput, status: Literal["acknowledged", "resolved"],
                      resolution: str | None = None) -> IncidentOutput:
    path = f"/incidents/{inputs.incident}"
    change: dict[str, Any] = {"type": "incident_reference", "status": status}
    if resolution:
        change["resolution"] = resolution
    response = await call_api(ctx, service="PagerDuty", method="PUT", url=ctx.base_url("pagerduty", API) + path,
                              path=path, headers=_headers(inputs.token, inputs.from_), json_body={"incident": change})
    incident = json_object(response, service="PagerDuty", path=path, key="incident")
    return output_from(IncidentOutput, {"id": incident.get("id"), "number": incident.get("incident_number"),
                                        "status": incident.get("status"), "title": incident.get("title"),
                                        "url": incident.get("html_url")}, service="PagerDuty", path=path)


class Acknowledge(Action[IncidentInput, IncidentOutput]):
    name: ClassVar[str] = "pagerduty.acknowledge"
    description: ClassVar[str] = "Acknowledge an incident."
    Input = IncidentInput
    Output = IncidentOutput
    idempotent: ClassVar[bool] = True  # acknowledging an acknowledged incident changes nothing

    async def run(self, inputs: IncidentInput, ctx: ActionContext) -> IncidentOutput:
        return await _set_status(ctx, inputs, "acknowledged")


class Resolve(Action[ResolveInput, IncidentOutput]):
    name: ClassVar[str] = "pagerduty.resolve"
    description: ClassVar[str] = "Resolve an incident."
    Input = ResolveInput
    Output = IncidentOutput
    idempotent: ClassVar[bool] = True

    async def run(self, inputs: ResolveInput, ctx: ActionContext) -> IncidentOutput:
        return await _set_status(ctx, inputs, "resolved", inputs.resolution)


class NoteInput(IncidentInput):
    content: str = Field(min_length=1, description="the note's text")


class NoteOutput(ActionOutput):
    id: str
    content: str
    created_at: str | None = None


class Note(Action[NoteInput, NoteOutput]):
    name: ClassVar[str] = "pagerduty.note"
    description: ClassVar[str] = "Add a note to an incident's timeline."
    Input = NoteInput
    Output = NoteOutput

    async def run(self, inputs: NoteInput, ctx: ActionContext) -> NoteOutput:
        path = f"/incidents/{inputs.incident}/notes"
        response = await call_api(ctx, service="PagerDuty", method="POST",
                                  url=ctx.base_url("pagerduty", API) + path, path=path,
                                  headers=_headers(inputs.token, inputs.from_),
                                  json_body={"note": {"content": inputs.content}})
        note = json_object(response, service="PagerDuty", path=path, key="note")
        return output_from(NoteOutput, {"id": note.get("id"), "content": note.get("content"),
                                        "created_at": note.get("created_at")}, service="PagerDuty", path=path)


PagerDuty.actions = (Acknowledge, Resolve, Note)

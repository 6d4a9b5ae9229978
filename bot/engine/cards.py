"""What a run's card says, rendered from the workflow's `card:` (or the integration's default card).

The result is stored on the run (`runs.card`) at every transition, so the outbox only turns stored data into
Block Kit and never evaluates an expression. A card expression that fails shows as "(unavailable)" instead of
failing the run: the card is for reading, the steps are what acts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from bot.engine.context import expression_context
from bot.engine.expressions import CompiledValue, Template, format_value
from bot.engine.loader import CompiledWorkflow
from bot.errors import ExpressionError
from bot.slack import messages
from bot.store.models import Event, Run, Step
from integrations.base import CardSpec, ParsedEvent
from integrations.registry import INTEGRATIONS

log = logging.getLogger(__name__)
UNAVAILABLE = "(unavailable)"
MAX_FIELD = 1900


def default_card(event: Event) -> CardSpec:
    integration_class = INTEGRATIONS.get(event.source)
    parsed = ParsedEvent(kind=event.kind, payload=event.payload, delivery_id=event.delivery_id,
                         summary=event.summary, link=event.link, event_name=event.event_name)
    plain = CardSpec(title=event.summary or event.kind, link=event.link)
    if integration_class is None:
        return plain
    try:
        return integration_class().default_card(parsed)
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
        # A payload not shaped as the tool's events usually are still gets its run, with a plainer card.
        log.info("event %s: the %s card could not be made (%s: %s); showing its summary only", event.id,
                 event.source, type(exc).__name__, exc)
        return plain


def _text(template: Template | CompiledValue | None, context: dict[str, Any]) -> str | None:
    if template is None:
        return None
    try:
        return format_value(template.render(context))[:MAX_FIELD]
    except ExpressionError as exc:
        log.info("card expression failed: %s", exc)
        return UNAVAILABLE


def render_card(*, workflow: CompiledWorkflow, run: Run, event: Event, steps: Iterable[Step]) -> dict[str, Any]:
    context = expression_context(run=run, event=event, steps=steps)
    default = default_card(event)
    fields: list[list[str]] = []
    if workflow.card_fields:
        for label, value in workflow.card_fields.items():
            fields.append([label, _text(value, context) or ""])
    else:
        fields = [[label, value] for label, value in default.fields.items()]
    title = _text(workflow.card_title, context) or workflow.title
    # `allow_self: false` concerns a run someone started by hand; a tool's event has no starter to exclude.
    approvers = {step.id: messages.approvers_text(step.approvers.users if step.approvers else [],
                                                  step.approvers.groups if step.approvers else [],
                                                  allow_self=not (step.approvers and run.started_by
                                                                  and not step.approvers.allow_self))
                 for step in workflow.steps if step.needs_approval}
    return {
        "approvers": approvers,
        "title": title,
        "summary": event.summary or "",
        "text": _text(workflow.card_text, context),
        "fields": fields,
        "link": _text(workflow.card_link, context) or default.link or event.link,
    }

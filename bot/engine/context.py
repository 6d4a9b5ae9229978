"""The data expressions see: `event`, `trigger`, `params`, `steps`, `run` (and `secrets`, only in step inputs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bot.engine.expressions import Scope
from bot.engine.states import FINAL_STEP_STATES
from bot.store.models import Event, Run, Step

_PERMALINK = "https://app.slack.com/client/{team}/{channel}/thread/{channel}-{ts}"


def run_url(run: Run) -> str:
    if run.card_ts:
        return _PERMALINK.format(team=run.team_id, channel=run.channel_id, ts=run.card_ts)
    return f"https://app.slack.com/client/{run.team_id}/{run.channel_id}"


def trigger_data(event: Event) -> dict[str, Any]:
    return {"source": event.source, "kind": event.kind, "delivery": event.delivery_id,
            "headers": dict(event.headers or {}), "received_at": event.received_at.isoformat()}


def step_data(step: Step) -> dict[str, Any]:
    decided_name = step.decided_by_name or step.decided_by
    approved = step.decision == "approved"
    skipped = step.decision == "skipped"
    return {
        "outcome": step.state if step.state in FINAL_STEP_STATES else None,
        "state": step.state,
        "outputs": step.outputs or {},
        "error": step.error,
        "approved_by": decided_name if approved else None,
        "approved_by_id": step.decided_by if approved else None,
        "skipped_by": decided_name if skipped else None,
        "skipped_by_id": step.decided_by if skipped else None,
        "attempts": step.attempt,
    }


def expression_context(*, run: Run, event: Event, steps: Iterable[Step]) -> Scope:
    """Everything but secrets, which only a step's inputs may see, at the moment it runs."""
    return Scope({
        "event": event.payload,
        "trigger": trigger_data(event),
        "params": dict(run.context.get("params", {})),
        "steps": {step.step_id: step_data(step) for step in steps},
        "run": {"id": run.id, "url": run_url(run), "workflow": run.workflow, "channel": run.channel_id,
                "started_by": run.started_by, "started_by_name": run.started_by_name, "team": run.team_id},
    })

"""Block Kit for the run card, as plain dicts, every text clipped to Slack's limits.

Plain dicts rather than slack-sdk's model classes: the card is rendered for every message a run posts, and the
models' validation and `to_dict()` cost more CPU than the rest of delivering that message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bot.engine import states
from bot.slack import messages
from bot.store.models import Run, Step

APPROVE_ACTION = "approve"
SKIP_ACTION = "skip"
RETRY_ACTION = "retry"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


Block = dict[str, Any]


def _mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": text}


def _plain(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text}


def _section(text: str) -> Block:
    return {"type": "section", "text": _mrkdwn(text)}


def _button(text: str, action_id: str, value: str, *, primary: bool = False) -> dict[str, Any]:
    button = {"type": "button", "text": _plain(_clip(text, 75)), "action_id": action_id, "value": value}
    if primary:
        button["style"] = "primary"
    return button


def button_value(run_id: str, step_id: str) -> str:
    return json.dumps({"run": run_id, "step": step_id}, separators=(",", ":"))


def parse_button_value(value: str) -> tuple[str, str] | None:
    try:
        data = json.loads(value)
        return str(data["run"]), str(data["step"])
    except (ValueError, KeyError, TypeError):
        return None


def decision_buttons(run_id: str, step_id: str, *, unknown: bool, block_id: str) -> Block:
    """Approve / Skip for a step waiting for approval; Retry / Skip for one whose outcome is unknown."""
    value = button_value(run_id, step_id)
    first = (_button(messages.RETRY, RETRY_ACTION, value, primary=True) if unknown
             else _button(messages.APPROVE, APPROVE_ACTION, value, primary=True))
    return {"type": "actions", "block_id": _clip(block_id, 255),
            "elements": [first, _button(messages.SKIP, SKIP_ACTION, value)]}


def _decided(step: Step) -> str | None:
    if step.decision and step.decided_by:
        verb = "approved by" if step.decision == "approved" else "skipped by"
        return f"{verb} {messages.user(step.decided_by, step.decided_by_name)}"
    return None


def _detail(step: Step) -> str | None:
    if step.state == states.STEP_SUCCEEDED:
        return messages.short_result(step.outputs) or None
    if step.state in (states.STEP_FAILED, states.TIMED_OUT) and step.error:
        return messages.escape(_clip(step.error, 200))
    if step.state == states.PENDING and step.error and step.next_attempt_at:
        return f"retrying after: {messages.escape(_clip(step.error, 150))}"
    return None


def step_lines(steps: Sequence[Step]) -> list[str]:
    """One line per step: its state, who decided it, and a short result or error."""
    return [messages.card_step_line(state=step.state, title=step.title, decided=_decided(step),
                                    detail=_detail(step)) for step in steps]


def run_card(run: Run, steps: Sequence[Step]) -> tuple[str, list[Block]]:
    """(fallback text, blocks) for a run's card in its current state."""
    card = run.card or {}
    title = card.get("title") or run.workflow
    summary = card.get("summary") or ""
    link = messages.link_target(card.get("link"))
    blocks: list[Block] = [{"type": "header", "text": {**_plain(_clip(title, 150)), "emoji": True}}]
    if summary or link:
        text = messages.escape(summary) or "source"
        if link:
            text = f"<{link}|{_clip(text, 400)}>" if summary else f"<{link}|open the source>"
        blocks.append(_section(_clip(text, 3000)))
    if card.get("text"):
        blocks.append(_section(_clip(messages.escape(card["text"]), 3000)))
    fields = [_mrkdwn(_clip(f"*{messages.escape(label)}*\n{messages.escape(value)}", 2000))
              for label, value in (card.get("fields") or [])[:10]]
    if fields:
        blocks.append({"type": "section", "fields": fields})
    if steps:
        lines = step_lines(steps)
        blocks.append(_section(_clip("\n".join(lines), 3000)))
    waiting = next((step for step in steps if step.state in (states.STEP_WAITING, states.UNKNOWN)), None)
    if waiting is not None and run.state == states.WAITING:
        who = (card.get("approvers") or {}).get(waiting.step_id, "anyone in the channel")
        unknown = waiting.state == states.UNKNOWN
        prompt = (messages.card_unknown(title=waiting.title, approvers=who) if unknown
                  else messages.card_waiting(title=waiting.title, approvers=who))
        blocks.append(_section(_clip(prompt, 3000)))
        blocks.append(decision_buttons(run.id, waiting.step_id, unknown=unknown,
                                       block_id=f"run:{run.id}:{waiting.step_id}"))
    status = messages.STATUS_TEXT.get(run.state, run.state)
    context = f"{status} · run `{run.id}` · `{run.workflow}`"
    blocks.append({"type": "context", "elements": [_mrkdwn(_clip(context, 3000))]})
    fallback = f"{title}: {summary}" if summary else title
    return _clip(f"{fallback} ({run.state})", 3000), blocks


def as_dicts(blocks: Sequence[Block]) -> list[dict[str, Any]]:
    """The blocks as sent (a copy the caller may keep and compare with the next rendering)."""
    return [dict(block) for block in blocks]

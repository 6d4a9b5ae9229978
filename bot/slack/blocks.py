"""Block Kit for the run card, built with slack-sdk's model classes (which check Slack's limits)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ContextBlock,
    HeaderBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)

from bot.engine import states
from bot.slack import messages
from bot.store.models import Run, Step

APPROVE_ACTION = "approve"
SKIP_ACTION = "skip"
RETRY_ACTION = "retry"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def button_value(run_id: str, step_id: str) -> str:
    return json.dumps({"run": run_id, "step": step_id}, separators=(",", ":"))


def parse_button_value(value: str) -> tuple[str, str] | None:
    try:
        data = json.loads(value)
        return str(data["run"]), str(data["step"])
    except (ValueError, KeyError, TypeError):
        return None


def decision_buttons(run_id: str, step_id: str, *, unknown: bool, block_id: str) -> ActionsBlock:
    """Approve / Skip for a step waiting for approval; Retry / Skip for one whose outcome is unknown."""
    value = button_value(run_id, step_id)
    first = (ButtonElement(text=PlainTextObject(text=messages.RETRY), action_id=RETRY_ACTION, value=value,
                           style="primary") if unknown else
             ButtonElement(text=PlainTextObject(text=messages.APPROVE), action_id=APPROVE_ACTION, value=value,
                           style="primary"))
    return ActionsBlock(block_id=block_id, elements=[
        first, ButtonElement(text=PlainTextObject(text=messages.SKIP), action_id=SKIP_ACTION, value=value)])


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
    link = card.get("link")
    blocks: list[Block] = [HeaderBlock(text=PlainTextObject(text=_clip(title, 150), emoji=True))]
    if summary or link:
        text = messages.escape(summary) or "source"
        if link:
            text = f"<{link}|{_clip(text, 400)}>" if summary else f"<{link}|open the source>"
        blocks.append(SectionBlock(text=MarkdownTextObject(text=_clip(text, 3000))))
    if card.get("text"):
        blocks.append(SectionBlock(text=MarkdownTextObject(text=_clip(messages.escape(card["text"]), 3000))))
    fields = [MarkdownTextObject(text=_clip(f"*{messages.escape(label)}*\n{messages.escape(value)}", 2000))
              for label, value in (card.get("fields") or [])[:10]]
    if fields:
        blocks.append(SectionBlock(fields=fields))
    if steps:
        lines = step_lines(steps)
        blocks.append(SectionBlock(text=MarkdownTextObject(text=_clip("\n".join(lines), 3000))))
    waiting = next((step for step in steps if step.state in (states.STEP_WAITING, states.UNKNOWN)), None)
    if waiting is not None and run.state == states.WAITING:
        who = (card.get("approvers") or {}).get(waiting.step_id, "anyone in the channel")
        unknown = waiting.state == states.UNKNOWN
        prompt = (messages.card_unknown(title=waiting.title, approvers=who) if unknown
                  else messages.card_waiting(title=waiting.title, approvers=who))
        blocks.append(SectionBlock(text=MarkdownTextObject(text=prompt)))
        blocks.append(decision_buttons(run.id, waiting.step_id, unknown=unknown,
                                       block_id=f"run:{run.id}:{waiting.step_id}"))
    status = messages.STATUS_TEXT.get(run.state, run.state)
    context = f"{status} · run `{run.id}` · `{run.workflow}`"
    blocks.append(ContextBlock(elements=[MarkdownTextObject(text=context)]))
    fallback = f"{title}: {summary}" if summary else title
    return _clip(f"{fallback} ({run.state})", 3000), blocks


def as_dicts(blocks: Sequence[Block]) -> list[dict[str, Any]]:
    return [block.to_dict() for block in blocks]

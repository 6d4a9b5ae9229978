"""Slack messages as terminal text: what `relaybot test` prints for a thread and a card.

mrkdwn stays mrkdwn (it reads well as it is); only what a terminal cannot show is turned into text: mentions
become `@name`, links `text (url)`, dates their fallback, known emoji the character, entities the character.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

EMOJI = {
    "arrow_forward": "▶", "arrows_counterclockwise": "🔄",
    "black_right_pointing_double_triangle_with_vertical_bar": "⏭",
    "checkered_flag": "🏁", "double_vertical_bar": "⏸", "grey_question": "❔", "heavy_check_mark": "✔",
    "hourglass": "⌛", "large_blue_circle": "🔵", "large_green_circle": "🟢", "link": "🔗", "octagonal_sign": "🛑",
    "repeat": "🔁", "white_check_mark": "✅", "white_circle": "⚪", "x": "❌", "warning": "⚠",
}

_TOKEN = re.compile(r"<([^<>\n]+)>")


def _same(name: str) -> str:
    return name


def text(source: str, *, name_of: Callable[[str], str] = _same, channel_of: Callable[[str], str] = _same) -> str:
    def token(match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        if target.startswith("@"):
            return "@" + (label or name_of(target[1:]))
        if target.startswith("#"):
            return "#" + (label or channel_of(target[1:]))
        if target.startswith("!date^"):
            return label or target
        if target.startswith("!subteam^"):
            return "@" + (label or target[len("!subteam^"):])
        if target.startswith("!"):
            return "@" + target[1:]
        return f"{label} ({target})" if label and label != target else target

    result = _TOKEN.sub(token, source or "")
    result = re.sub(r":([a-z0-9_+-]+):", lambda match: EMOJI.get(match.group(1), match.group(0)), result)
    return result.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def blocks(items: list[dict[str, Any]] | None, *, name_of: Callable[[str], str] = _same,
           channel_of: Callable[[str], str] = _same) -> list[str]:
    """One or more lines per block, in order."""

    def _object(value: Any) -> str:
        raw = value.get("text") if isinstance(value, dict) else value
        return text(str(raw or ""), name_of=name_of, channel_of=channel_of)

    lines: list[str] = []
    for block in items or []:
        kind = block.get("type")
        if kind == "header":
            lines.append(_object(block.get("text")))
        elif kind == "section":
            if block.get("text"):
                lines.extend(_object(block["text"]).splitlines())
            for field in block.get("fields") or []:
                label, _, value = _object(field).partition("\n")
                lines.append(f"{label.strip('*')}: {value}" if value else label)
        elif kind == "context":
            lines.append(" ".join(_object(element) for element in block.get("elements") or []))
        elif kind == "actions":
            lines.append(" ".join(f"[{_object(element.get('text'))}]"
                                  for element in block.get("elements") or []))
        elif kind == "divider":
            lines.append("---")
        else:
            lines.append(f"[{kind} block]")
    return lines

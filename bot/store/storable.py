"""Text from outside (a sender's request, an API's answer) as the database can store it.

PostgreSQL refuses NUL in text, and neither database (nor the audit chain's hashing) takes a lone UTF-16
surrogate, which a JSON escape can give. One odd string must not fail a write shared with others, or a step's
result that can then never be committed.
"""

from __future__ import annotations

from typing import Any


def storable(text: str, limit: int) -> str:
    """At most `limit` characters, without NUL, with anything that is not Unicode (bytes that were not UTF-8 in a
    header, lone surrogates from a JSON escape) replaced."""
    cleaned = text.replace("\x00", "")
    if not cleaned.isascii():
        cleaned = cleaned.encode("utf-8", "replace").decode("utf-8")
    return cleaned[:limit]


def storable_value(value: Any) -> Any:
    """A JSON value with every string (and key) made `storable`."""
    if isinstance(value, str):
        return storable(value, len(value))
    if isinstance(value, dict):
        return {storable(key, len(key)) if isinstance(key, str) else key: storable_value(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [storable_value(item) for item in value]
    return value

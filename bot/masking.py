"""Replace secret values, and the forms a tool may echo them in, by `***`.

A value is masked raw, line by line, base64-encoded (at each of the three byte offsets it can sit at inside a
longer encoded text, and with the trailing newline `echo | base64` adds), URL-encoded and JSON-escaped.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_LENGTH = 4


def _base64_cores(data: bytes) -> set[str]:
    """The part of base64(prefix + data + suffix) that depends only on `data`, for any prefix length mod 3."""
    cores = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data).decode()
        start = (0, 2, 3)[offset]
        end = len(encoded)
        if encoded.endswith("=="):
            end -= 3
        elif encoded.endswith("="):
            end -= 2
        core = encoded[start:end]
        if len(core) >= MIN_LENGTH:
            cores.add(core)
            cores.add(core.replace("+", "-").replace("/", "_"))
    return cores


def variants(value: str) -> set[str]:
    forms: set[str] = set()
    pieces = [value] + [line.strip("\r") for line in value.split("\n")] if "\n" in value else [value]
    for piece in pieces:
        if len(piece) < MIN_LENGTH:
            continue
        raw = piece.encode()
        forms.update({piece, quote(piece, safe=""), quote_plus(piece), json.dumps(piece)[1:-1],
                      json.dumps(piece, ensure_ascii=False)[1:-1]})
        forms.add(base64.b64encode(raw).decode())
        forms.update(_base64_cores(raw))
        forms.update(_base64_cores(raw + b"\n"))
    return {form for form in forms if len(form) >= MIN_LENGTH}


class Masker:
    """Masks a fixed set of secret values; build one per run from the values it used."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._forms: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(*values)

    def add(self, *values: str) -> None:
        before = len(self._forms)
        for value in values:
            if value:
                self._forms |= variants(value)
        if len(self._forms) != before:
            ordered = sorted(self._forms, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(form) for form in ordered))

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, value: str) -> str:
        if self._pattern is None or not value:
            return value
        return self._pattern.sub(MASK, value)

    def data(self, value: Any) -> Any:
        """Mask every string inside JSON-like data, keys included."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(key)): self.data(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(item) for item in value]
        return value


class LogMasker:
    """Masks every secret value this process has decrypted out of every log record, whatever its handler.

    Logging is process-wide by nature, so this hooks the record factory: a record is masked when it is made,
    before any handler (a file, stderr, pytest's capture) sees it.
    """

    def __init__(self) -> None:
        self._masker = Masker()
        self._lock = threading.Lock()

    def register(self, *values: str) -> None:
        with self._lock:
            self._masker.add(*values)

    def mask(self, record: logging.LogRecord) -> logging.LogRecord:
        if not self._masker:
            return record
        message = record.getMessage()
        masked = self._masker.text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[0] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self._masker.text(text)
            record.exc_info = None
        return record

    def install(self) -> None:
        current = logging.getLogRecordFactory()
        if getattr(current, "relaybot_masker", None) is self:
            return

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return self.mask(current(*args, **kwargs))

        factory.relaybot_masker = self  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)

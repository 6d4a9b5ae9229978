"""Replace secret values, and the forms a tool may echo them in, by `***`.

A value is masked raw and line by line; base64-encoded (at each of the three byte offsets it can sit at inside
a longer encoded text, standard and URL-safe alphabets, and with the trailing newline `echo | base64` adds);
JSON-escaped; HTML-escaped; and URL-encoded in any of the ways encoders differ on (which characters they
escape, `%2f` or `%2F`, `+` or `%20` for a space, once or twice), including URL-encodings of the other forms.
A JSON document (a service-account file) also has each string inside it masked, since a tool may echo one
field alone. Not covered: base64 wrapped into lines (MIME, `base64` without `-w0`) of a value longer than a line.

Every occurrence of every form is found, overlapping ones included, and each run of covered text becomes one
`***`. A text that ends part-way into a form (an error message cut at 300 characters) has that tail masked too.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import string
import threading
import weakref
from collections.abc import Iterable
from typing import Any

MASK = "***"
MIN_LENGTH = 4
# A text's tail that is the start of a form is masked from this many characters on: shorter tails are too
# likely to be ordinary text.
PARTIAL_MIN_LENGTH = 6
_URL_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


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


def _json_strings(value: str) -> list[str]:
    """The strings inside `value` if it is a JSON object or array (keys excluded), else nothing."""
    if not value.lstrip().startswith(("{", "[")):
        return []
    try:
        document = json.loads(value)
    except ValueError:
        return []
    found: list[str] = []
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return found


def _pieces(value: str) -> set[str]:
    """The value, each of its lines, and the strings inside it when it is a JSON document (and their lines)."""
    pieces: set[str] = set()
    pending = [value]
    seen: set[str] = set()
    while pending:
        text = pending.pop()
        if text in seen:
            continue
        seen.add(text)
        pieces.update({text, text.strip()})
        if "\n" in text or "\r" in text:
            for line in re.split(r"\r\n|\r|\n", text):
                pieces.update({line, line.strip()})
        pending.extend(_json_strings(text))
    return {piece for piece in pieces if len(piece) >= MIN_LENGTH}


def variants(value: str) -> set[str]:
    """The literal forms of `value` to mask (URL-encodings of them are matched by the pattern, not listed)."""
    forms: set[str] = set()
    for piece in _pieces(value):
        raw = piece.encode()
        forms.add(piece)
        for escaped in (json.dumps(piece)[1:-1], json.dumps(piece, ensure_ascii=False)[1:-1]):
            forms.update({escaped, escaped.replace("/", "\\/")})
        forms.update({html.escape(piece, quote=False), html.escape(piece, quote=True)})
        encoded = base64.b64encode(raw).decode()
        forms.update({encoded, encoded.replace("+", "-").replace("/", "_")})
        forms.update(_base64_cores(raw))
        forms.update(_base64_cores(raw + b"\n"))
    return {form for form in forms if len(form) >= MIN_LENGTH}


def _hex_any_case(encoded: str) -> str:
    return "".join(f"[{char}{char.lower()}]" if char in "ABCDEF" else char for char in encoded)


def _url_token(char: str) -> str:
    """A regex for one character as it may appear after URL-encoding, once or twice (a URL inside a URL's
    query): itself, %XX or %25XX (any case), or + for a space."""
    if char in _URL_UNRESERVED:
        return re.escape(char)
    escaped = "".join(f"%{byte:02X}" for byte in char.encode())
    options = [re.escape(char), _hex_any_case(escaped), _hex_any_case(escaped.replace("%", "%25"))]
    if char == " ":
        options.append(r"\+")
    return "(?:" + "|".join(options) + ")"


def _pattern(forms: Iterable[str]) -> re.Pattern[str]:
    """Matches, at every position (a lookahead), the longest form that starts there, URL-encoded or not."""
    ordered = sorted(forms, key=lambda form: (-len(form), form))
    alternation = "|".join("".join(_url_token(char) for char in form) for form in ordered)
    return re.compile(f"(?=({alternation}))")


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class Masker:
    """Masks a fixed set of secret values; build one per run from the values it used."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self._forms: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(*values)

    def add(self, *values: str) -> None:
        new = {value for value in values if value and value not in self._values}
        if not new:
            return
        self._values |= new
        before = len(self._forms)
        for value in new:
            self._forms |= variants(value)
        if len(self._forms) != before:
            self._pattern = _pattern(self._forms)

    def __bool__(self) -> bool:
        return self._pattern is not None

    def _spans(self, value: str) -> list[tuple[int, int]]:
        assert self._pattern is not None
        spans = [(match.start(), match.start() + len(match.group(1))) for match in self._pattern.finditer(value)]
        tail = self._partial_tail(value)
        if tail is not None:
            spans.append((tail, len(value)))
        return _merge(spans)

    def _partial_tail(self, value: str) -> int | None:
        """Where the text's end starts to be a form that was cut off, if it does (from PARTIAL_MIN_LENGTH on)."""
        best: int | None = None
        for form in self._forms:
            if len(form) <= PARTIAL_MIN_LENGTH:
                continue
            head = form[:PARTIAL_MIN_LENGTH]
            window_start = max(0, len(value) - len(form) + 1)
            position = value.find(head, window_start)
            while position >= 0:
                if form.startswith(value[position:]):
                    if best is None or position < best:
                        best = position
                    break
                position = value.find(head, position + 1)
        return best

    def text(self, value: str) -> str:
        if self._pattern is None or not value:
            return value
        # Replacing can only shorten the text (every form is longer than the mask), so this ends; a second
        # round catches a form that the mask itself completed (a value that contains `***`).
        while True:
            spans = self._spans(value)
            if not spans:
                return value
            parts: list[str] = []
            position = 0
            for start, end in spans:
                parts.append(value[position:start])
                parts.append(MASK)
                position = end
            parts.append(value[position:])
            masked = "".join(parts)
            if masked == value:
                return value
            value = masked

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


class MaskedSlackPoster:
    """Wraps a step's Slack poster so that what a step posts (`slack.post`) is masked before it leaves."""

    def __init__(self, poster: Any, masker: Masker) -> None:
        self._poster = poster
        self._masker = masker

    async def post_message(self, *, channel: str, text: str, blocks: list[dict[str, Any]] | None = None,
                           thread_ts: str | None = None) -> dict[str, Any]:
        masked_blocks = self._masker.data(blocks) if blocks else blocks
        result: dict[str, Any] = await self._poster.post_message(channel=channel, text=self._masker.text(text),
                                                                 blocks=masked_blocks, thread_ts=thread_ts)
        return result


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

    def text(self, value: str) -> str:
        return self._masker.text(value)

    def mask(self, record: logging.LogRecord) -> logging.LogRecord:
        if not self._masker:
            return record
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it itself, with nothing formatted
            return record
        masked = self._masker.text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[0] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self._masker.text(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self._masker.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self._masker.text(record.stack_info)
        return record

    def install(self) -> None:
        """Mask records from now on. Several maskers (several apps in one process) share one factory."""
        current = logging.getLogRecordFactory()
        maskers: weakref.WeakSet[LogMasker] | None = getattr(current, "relaybot_maskers", None)
        if maskers is not None:
            maskers.add(self)
            return
        # Held weakly, so an app that is gone stops costing anything; the factory is installed once, so
        # records never pass through a growing chain of wrappers.
        maskers = weakref.WeakSet([self])

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = current(*args, **kwargs)
            for masker in list(maskers):
                record = masker.mask(record)
            return record

        factory.relaybot_maskers = maskers  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)

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

import asyncio
import base64
import html
import itertools
import json
import logging
import os
import re
import string
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
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


def _prefix_tree(forms: list[str]) -> str:
    """A regex matching any of `forms` (sorted, distinct, non-empty), longest first, as a prefix tree: at each
    position the regex engine tries one branch per distinct next character instead of every form in turn."""
    # Of sorted strings, the first and the last share the prefix all share; character by character is meant.
    prefix = os.path.commonprefix([forms[0], forms[-1]])  # noqa: RUF071
    head = "".join(_url_token(char) for char in prefix)
    rest = [form[len(prefix):] for form in forms]
    ends_here = rest[0] == ""
    tails = rest[1:] if ends_here else rest
    if not tails:
        return head
    branches = [_prefix_tree(list(group)) for _, group in itertools.groupby(tails, key=lambda tail: tail[0])]
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    # Greedy: the longer forms are tried before stopping at the shorter one that ends here.
    return head + (f"(?:{body})?" if ends_here else body)


def _pattern(forms: Iterable[str]) -> re.Pattern[str]:
    """Matches, at every position (a lookahead), the longest form that starts there, URL-encoded or not."""
    ordered = sorted(forms)
    try:
        alternation = _prefix_tree(ordered)
        return re.compile(f"(?=({alternation}))")
    except (RecursionError, re.error):
        # Thousands of forms each a prefix of the next nest too deeply for a tree: a flat list, longest first.
        flat = "|".join("".join(_url_token(char) for char in form)
                        for form in sorted(ordered, key=lambda form: (-len(form), form)))
        return re.compile(f"(?=({flat}))")


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True)
class CompiledValue:
    """The forms of one secret value and the pattern that finds them: compiled once, shared by maskers."""

    forms: frozenset[str]
    pattern: re.Pattern[str]

    @classmethod
    def of(cls, value: str) -> CompiledValue | None:
        forms = variants(value)
        return cls(frozenset(forms), _pattern(forms)) if forms else None

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [(match.start(), match.start() + len(match.group(1))) for match in self.pattern.finditer(text)]


class _CutOffForms:
    """The forms long enough to be recognised when a text ends part-way into one, indexed by their first
    PARTIAL_MIN_LENGTH characters, so a text's tail is checked with one lookup per position."""

    def __init__(self, parts: Iterable[CompiledValue]) -> None:
        self.by_head: dict[str, list[str]] = {}
        self.longest = 0
        for part in parts:
            for form in part.forms:
                if len(form) > PARTIAL_MIN_LENGTH:
                    self.by_head.setdefault(form[:PARTIAL_MIN_LENGTH], []).append(form)
                    self.longest = max(self.longest, len(form))

    def start(self, text: str) -> int | None:
        """Where the text's end starts to be a form that was cut off, if it does."""
        for position in range(max(0, len(text) - self.longest + 1), len(text) - PARTIAL_MIN_LENGTH + 1):
            forms = self.by_head.get(text[position:position + PARTIAL_MIN_LENGTH])
            if forms and any(form.startswith(text[position:]) for form in forms):
                return position
        return None


class Masker:
    """Masks a fixed set of secret values; build one per step from the values it may see."""

    def __init__(self, values: Iterable[str] = (), *, compiled: Iterable[CompiledValue] = ()) -> None:
        self._values: set[str] = set()
        self._parts: tuple[CompiledValue, ...] = tuple(compiled)
        self._cut_off = _CutOffForms(self._parts)
        self.add(*values)

    def add(self, *values: str) -> None:
        new = [value for value in dict.fromkeys(values) if value and value not in self._values]
        self._values.update(new)
        parts = [part for part in map(CompiledValue.of, new) if part is not None]
        if parts:
            # New objects, not updates in place: another thread may be masking with the old ones right now.
            self._parts = (*self._parts, *parts)
            self._cut_off = _CutOffForms(self._parts)

    def __bool__(self) -> bool:
        return bool(self._parts)

    def text(self, value: str) -> str:
        parts, cut_off = self._parts, self._cut_off
        if not parts or not value:
            return value
        # Every occurrence of every form, overlapping ones and those of different values included, is one span;
        # each run of covered text becomes one mask. Replacing only shortens the text (every form is longer
        # than the mask), so the loop ends; a second round catches a form the mask itself completed.
        while True:
            spans = [span for part in parts for span in part.spans(value)]
            if (tail := cut_off.start(value)) is not None:
                spans.append((tail, len(value)))
            spans = _merge(spans)
            if not spans:
                return value
            pieces: list[str] = []
            position = 0
            for start, end in spans:
                pieces.append(value[position:start])
                pieces.append(MASK)
                position = end
            pieces.append(value[position:])
            masked = "".join(pieces)
            if masked == value:
                return value
            value = masked

    def data(self, value: Any) -> Any:
        """Mask every string inside JSON-like data, keys included."""
        if not self._parts:
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
    before any handler (a file, stderr, pytest's capture) sees it. It also keeps each value compiled, so the
    maskers of steps (`masker_for`) reuse the work instead of compiling the same PEM at every step.
    """

    def __init__(self) -> None:
        self._compiled: dict[str, CompiledValue | None] = {}
        self._masker = Masker()
        self._lock = threading.Lock()

    def _remember(self, compiled: dict[str, CompiledValue | None]) -> None:
        with self._lock:
            for value, part in compiled.items():
                self._compiled.setdefault(value, part)
            self._masker = Masker(compiled=[part for part in self._compiled.values() if part is not None])

    def register(self, *values: str) -> None:
        new = [value for value in dict.fromkeys(values) if value and value not in self._compiled]
        if new:
            self._remember({value: CompiledValue.of(value) for value in new})

    async def masker_for(self, values: Iterable[str]) -> Masker:
        """A masker for exactly `values`, which are registered for the logs too. Values not seen before are
        compiled in a worker thread (a large one takes a noticeable moment), not on the event loop."""
        wanted = [value for value in dict.fromkeys(values) if value]
        new = [value for value in wanted if value not in self._compiled]
        if new:
            self._remember(await asyncio.to_thread(lambda: {value: CompiledValue.of(value) for value in new}))
        return Masker(compiled=[part for value in wanted if (part := self._compiled.get(value)) is not None])

    def text(self, value: str) -> str:
        return self._masker.text(value)

    def mask(self, record: logging.LogRecord) -> logging.LogRecord:
        masker = self._masker
        if not masker:
            return record
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it itself, with nothing formatted
            return record
        masked = masker.text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[0] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = masker.text(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = masker.text(record.exc_text)
        if record.stack_info:
            record.stack_info = masker.text(record.stack_info)
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

"""CEL expressions and `${{ }}` templates.

Only strings from workflow files are parsed; they are compiled once when the catalog loads. Rendering inserts
values into the result and never parses them again, so event data stays data however often it is passed on.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import cel
import cel.stdlib

from bot.errors import ExpressionError

OPEN, CLOSE = "${{", "}}"
CONTEXT_NAMES = frozenset({"event", "trigger", "params", "secrets", "steps", "run"})
# cel-go's extension libraries (strings, math, lists, sets, encoders): `"abc".substring(0, 2)`, `math.greatest(…)`.
STDLIB_NAMESPACES = frozenset({"math", "sets", "base64", "lists", "strings"})


@functools.cache
def _functions() -> dict[str, Callable[..., Any]]:
    context = cel.Context()
    cel.stdlib.add_stdlib_to_context(context)
    return context.functions


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _cel_message(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"ERROR: <input>:(\d+):(\d+): (.*?)\n", text)
    if match:
        return f"column {match.group(2)}: {match.group(3)}"
    return _first_line(text)


class Scope(dict[str, Any]):
    """An expression context whose CEL form is built once and shared by every expression evaluated in it.

    Converting a payload to CEL values costs far more than evaluating an expression (a 2 KB webhook: ~230 µs
    against ~10 µs), and a card renders a dozen expressions against the same data.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cel: Any = None

    def cel_context(self) -> Any:
        if self._cel is None:
            self._cel = cel.Context(variables=dict(self), functions=_functions())
        return self._cel


_FIELD_PATH = re.compile(r"[A-Za-z_]\w*(?:\s*\.\s*[A-Za-z_]\w*)*")
_INT64 = range(-(2**63), 2**63)
_NOT_FOUND = object()


def _field_path(source: str) -> tuple[str, ...] | None:
    """`event.pull_request.number` as its names, if the expression is nothing but a field path."""
    if not _FIELD_PATH.fullmatch(source) or source in ("true", "false", "null"):
        return None
    return tuple(name.strip() for name in source.split("."))


def _look_up(path: tuple[str, ...], context: dict[str, Any]) -> Any:
    """A field path's value found by plain dict lookups, or `_NOT_FOUND` where CEL must decide (a missing key, a
    value that is not a map, a result CEL would convert). Most card and input templates are such paths; this
    spares them turning the whole event into CEL values, and gives exactly what CEL would."""
    value: Any = context
    for name in path:
        if type(value) is not dict and not isinstance(value, dict):
            return _NOT_FOUND
        value = value.get(name, _NOT_FOUND)
        if value is _NOT_FOUND:
            return _NOT_FOUND
    if value is None or type(value) in (str, bool, float):
        return value
    if type(value) is int and value in _INT64:
        return value
    return _NOT_FOUND


_CHAIN = re.compile(r"[A-Za-z_]\w*(?:\s*\.\s*[A-Za-z_]\w*)*")
Paths = tuple[tuple[str, ...], ...]


def _used_paths(source: str) -> dict[str, Paths] | None:
    """For each context name the expression uses, the field paths it reads below it; `()` among them means the
    whole value. None when that cannot be told safely from the text (comments, triple quotes, escapes).

    CEL reads data only along such paths, so a copy of the context holding just them evaluates the same; and it
    is much cheaper to hand to CEL than a whole webhook payload."""
    if "'''" in source or '"""' in source or "\\" in source:
        return None
    code = _STRING_LITERAL.sub('""', source)
    if "//" in code:
        return None
    used: dict[str, set[tuple[str, ...]]] = {}
    for match in _CHAIN.finditer(code):
        if code[:match.start()].rstrip().endswith("."):
            continue  # a field of something else, such as a call's result: `f(x).event`
        names = [name.strip() for name in match.group(0).split(".")]
        if names[0] not in CONTEXT_NAMES:
            continue
        if code[match.end():].lstrip().startswith("("):
            names = names[:-1]  # `event.items.exists(…)`, `event.title.startsWith(…)`: a function, not a field
        used.setdefault(names[0], set()).add(tuple(names[1:]))
    return {name: tuple(sorted(paths)) for name, paths in used.items()}


def _prune(value: Any, paths: Paths) -> Any:
    if type(value) is not dict or any(not path for path in paths):
        return value
    below: dict[str, list[tuple[str, ...]]] = {}
    for path in paths:
        below.setdefault(path[0], []).append(path[1:])
    return {key: _prune(value[key], tuple(rest)) for key, rest in below.items() if key in value}


@functools.cache
def _function_names() -> frozenset[str]:
    return frozenset(part for name in _functions() for part in name.split("."))


def _uses_functions(source: str) -> bool:
    names = set(re.findall(r"[A-Za-z_]\w*", _STRING_LITERAL.sub('""', source)))
    return bool(names & _function_names())


@dataclass(frozen=True)
class Expression:
    source: str
    program: Any
    path: tuple[str, ...] | None = None
    reads: dict[str, Paths] | None = None
    uses_functions: bool = True

    def evaluate(self, context: dict[str, Any]) -> Any:
        if self.path is not None:
            found = _look_up(self.path, context)
            if found is not _NOT_FOUND:
                return found
        if self.reads is not None:
            variables = {name: _prune(context[name], paths) for name, paths in self.reads.items()
                         if name in context}
            prepared = (cel.Context(variables=variables, functions=_functions()) if self.uses_functions
                        else cel.Context(variables=variables))
        elif isinstance(context, Scope):
            prepared = context.cel_context()
        else:
            prepared = cel.Context(variables=context, functions=_functions())
        try:
            return self.program.execute(prepared)
        except KeyError as exc:
            raise ExpressionError(f"`{self.source}`: no such key {exc}") from None
        except Exception as exc:  # CEL raises ValueError, TypeError, ZeroDivisionError, RuntimeError...
            raise ExpressionError(f"`{self.source}`: {_first_line(str(exc))}") from None

    def truthy(self, context: dict[str, Any]) -> bool:
        value = self.evaluate(context)
        if not isinstance(value, bool):
            raise ExpressionError(f"`{self.source}` must give true or false, not {type(value).__name__}")
        return value

    def references(self) -> set[str]:
        return set(self.program.variables())

    def step_references(self) -> set[str]:
        return step_references(self.source)


def compile_expression(source: str) -> Expression:
    source = source.strip()
    if not source:
        raise ExpressionError("empty expression")
    try:
        program = cel.compile(source)
    except Exception as exc:
        raise ExpressionError(f"`{source}`: {_cel_message(exc)}") from None
    unknown = set(program.variables()) - CONTEXT_NAMES - STDLIB_NAMESPACES - _bound_names(source)
    if unknown:
        names = ", ".join(sorted(unknown))
        raise ExpressionError(f"`{source}`: unknown name {names} (use event, trigger, params, secrets, steps or "
                              "run)")
    reads = _used_paths(source)
    if reads is not None and not set(program.variables()) - STDLIB_NAMESPACES - _bound_names(source) <= set(reads):
        reads = None  # CEL sees a name the text scan missed: give it everything
    return Expression(source=source, program=program, path=_field_path(source), reads=reads,
                      uses_functions=_uses_functions(source))


_MACRO_BINDING = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_STRING_LITERAL = re.compile(r"""(?:[rR]?[bB]?)("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')""")


def _bound_names(source: str) -> set[str]:
    return set(_MACRO_BINDING.findall(_STRING_LITERAL.sub('""', source)))


def step_references(source: str) -> set[str]:
    """Step ids named in `steps.<id>` or `steps["<id>"]` (string literals elsewhere ignored)."""
    names = set(re.findall(r"""\bsteps\s*\[\s*["']([^"']+)["']\s*\]""", source))
    stripped = _STRING_LITERAL.sub('""', source)
    names |= set(re.findall(r"\bsteps\s*\.\s*([A-Za-z_][\w]*)", stripped))
    return names


# ------------------------------------------------------------------------------------------------ templates


def format_value(value: Any) -> str:
    """How a value reads when it is part of a longer string."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else str(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _split_template(text: str) -> list[str | Expression]:
    parts: list[str | Expression] = []
    position = 0
    while True:
        start = text.find(OPEN, position)
        if start < 0:
            if position < len(text):
                parts.append(text[position:])
            return parts
        if start > position:
            parts.append(text[position:start])
        end = _find_close(text, start + len(OPEN))
        if end < 0:
            raise ExpressionError(f"`{text}`: `${{{{` is never closed by `}}}}`")
        parts.append(compile_expression(text[start + len(OPEN):end]))
        position = end + len(CLOSE)


def _find_close(text: str, position: int) -> int:
    """Index of the `}}` that ends an interpolation, skipping string literals inside it."""
    quote: str | None = None
    index = position
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\":
                index += 2
                continue
            if char == quote:
                quote = None
        elif char in ("'", '"'):
            quote = char
        elif text.startswith(CLOSE, index):
            return index
        index += 1
    return -1


@dataclass(frozen=True)
class Template:
    """A string from a workflow file, compiled. `render` of exactly one `${{ }}` keeps the value's type."""

    source: str
    parts: tuple[str | Expression, ...]

    @property
    def is_static(self) -> bool:
        return all(isinstance(part, str) for part in self.parts)

    def expressions(self) -> list[Expression]:
        return [part for part in self.parts if isinstance(part, Expression)]

    def render(self, context: dict[str, Any]) -> Any:
        if len(self.parts) == 1 and isinstance(self.parts[0], Expression):
            return self.parts[0].evaluate(context)
        return "".join(part if isinstance(part, str) else format_value(part.evaluate(context))
                       for part in self.parts)

    def render_text(self, context: dict[str, Any], *, unavailable: str) -> str:
        """As text for people to read, each expression that fails shown as `unavailable` (a title, not an input)."""
        rendered: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                rendered.append(part)
                continue
            try:
                rendered.append(format_value(part.evaluate(context)))
            except ExpressionError:
                rendered.append(unavailable)
        return "".join(rendered)


def compile_template(text: str) -> Template:
    return Template(source=text, parts=tuple(_split_template(text)))


def has_template(value: Any) -> bool:
    if isinstance(value, str):
        return OPEN in value
    if isinstance(value, dict):
        return any(has_template(item) for item in value.values())
    if isinstance(value, list):
        return any(has_template(item) for item in value)
    return False


@dataclass(frozen=True)
class CompiledValue:
    """Any YAML value with its templates compiled: strings become Templates, containers are walked."""

    value: Any

    def render(self, context: dict[str, Any]) -> Any:
        return _render(self.value, context)

    def templates(self) -> list[Template]:
        found: list[Template] = []
        _collect(self.value, found)
        return found


def compile_value(value: Any) -> CompiledValue:
    return CompiledValue(_compile(value))


def _compile(value: Any) -> Any:
    if isinstance(value, str):
        return compile_template(value) if OPEN in value else value
    if isinstance(value, dict):
        return {key: _compile(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_compile(item) for item in value]
    return value


def _render(value: Any, context: dict[str, Any]) -> Any:
    if isinstance(value, Template):
        return value.render(context)
    if isinstance(value, dict):
        return {key: _render(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [_render(item, context) for item in value]
    return value


def _collect(value: Any, found: list[Template]) -> None:
    if isinstance(value, Template):
        found.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, found)
    elif isinstance(value, list):
        for item in value:
            _collect(item, found)

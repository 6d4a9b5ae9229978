"""`on.poll` and `on.schedule` as pydantic models, checked completely when the catalog loads.

Every CEL expression and `${{ }}` template is compiled here and its names checked, and a cron string and a time
zone are tried, inside pydantic validators: the loader turns a validation error's location into the file's
line, so `relaybot validate` names the exact line of a bad `items:`, header or `cron:`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import cel
from croniter import croniter
from pydantic import AfterValidator, BeforeValidator, Field, PrivateAttr, field_validator, model_validator

# The loader's own helpers: the same parser, error wording and macro-variable rule as every other expression.
from bot.engine.expressions import (
    STDLIB_NAMESPACES,
    CompiledValue,
    Expression,
    _bound_names,
    _cel_message,
    compile_value,
)
from bot.engine.workflow import Duration, Strict
from bot.errors import ExpressionError

# What each part of a poll may name. Secrets only reach the request: `items` and `key` see the answer.
REQUEST_NAMES = frozenset({"params", "secrets"})
ITEMS_NAMES = frozenset({"response", "params"})
KEY_NAMES = frozenset({"item", "response", "params"})
MIN_POLL_EVERY = timedelta(seconds=10)
CRON_MACROS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})


def _names_text(names: frozenset[str]) -> str:
    return ", ".join(sorted(names))


def _check_names(expression: Expression, names: frozenset[str]) -> None:
    unknown = expression.references() - names - STDLIB_NAMESPACES - _bound_names(expression.source)
    if unknown:
        raise ValueError(f"`{expression.source}`: unknown name {', '.join(sorted(unknown))} "
                         f"(here you can use {_names_text(names)})")


def compile_trigger_expression(source: str, names: frozenset[str]) -> Expression:
    """A bare CEL expression that may name only `names` (and CEL's extension namespaces)."""
    source = source.strip()
    if not source:
        raise ExpressionError("empty expression")
    try:
        program = cel.compile(source)
    except Exception as exc:
        raise ExpressionError(f"`{source}`: {_cel_message(exc)}") from None
    expression = Expression(source=source, program=program)
    try:
        _check_names(expression, names)
    except ValueError as exc:
        raise ExpressionError(str(exc)) from None
    return expression


def _expression_of(names: frozenset[str]) -> Any:
    def check(source: str) -> str:
        try:
            compile_trigger_expression(source, names)
        except ExpressionError as exc:
            raise ValueError(f"bad expression: {exc}") from None
        return source

    return AfterValidator(check)


def compile_request_value(value: Any) -> CompiledValue:
    """A request part with its templates compiled; raises ValueError naming a bad template or name."""
    try:
        compiled = compile_value(value)
    except ExpressionError as exc:
        # The template compiler's hint lists a step's names; a request has fewer (if the wording ever changes,
        # the message is merely less precise).
        message = str(exc).replace("(use event, trigger, params, secrets, steps or run)",
                                   f"(here you can use {_names_text(REQUEST_NAMES)})")
        raise ValueError(f"bad expression: {message}") from None
    for template in compiled.templates():
        for expression in template.expressions():
            _check_names(expression, REQUEST_NAMES)
    return compiled


def _request_value(value: Any) -> Any:
    compile_request_value(value)
    return value


RequestText = Annotated[str, BeforeValidator(lambda value: value if isinstance(value, str) else
                                             json.dumps(value) if isinstance(value, bool) else str(value)),
                        AfterValidator(_request_value)]


class PollRequest(Strict):
    """What to request; any string may use `${{ params.X }}` and `${{ secrets.NAME }}`."""

    method: Literal["GET", "POST"] = "GET"
    url: RequestText = Field(description="http(s) URL")
    headers: dict[str, RequestText] = {}
    query: dict[str, RequestText] = Field(default_factory=dict, description="query string parameters")
    json_: Annotated[Any, AfterValidator(_request_value)] = Field(default=None, alias="json",
                                                                  description="a JSON body")
    body: RequestText | None = Field(default=None, description="a text body")

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "${{")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _one_body(self) -> PollRequest:
        if self.json_ is not None and self.body is not None:
            raise ValueError("give either `json` or `body`, not both")
        return self

    def compiled(self) -> CompiledValue:
        return compile_request_value({"method": self.method, "url": self.url, "headers": self.headers,
                                      "query": self.query, "json": self.json_, "body": self.body})


class PollTrigger(Strict):
    """`poll`: request a URL every so often; each new item of the answer (by its `key`) starts one run.

    The first successful poll sets the baseline and starts nothing. `items` sees `response` (`status`,
    `headers`, `json`, `text`) and `params`; `key` also sees `item`.
    """

    every: Duration = Field(description="how often to poll (at least 10s)")
    request: PollRequest
    items: Annotated[str, _expression_of(ITEMS_NAMES)] = Field(
        description="CEL giving the list of items, e.g. `response.json.items`")
    key: Annotated[str, _expression_of(KEY_NAMES)] = Field(
        description="CEL giving each item's unique key, e.g. `item.id`")
    _request: CompiledValue = PrivateAttr()
    _items: Expression = PrivateAttr()
    _key: Expression = PrivateAttr()

    @field_validator("every")
    @classmethod
    def _not_too_often(cls, value: timedelta) -> timedelta:
        if value < MIN_POLL_EVERY:
            raise ValueError(f"poll at most every {MIN_POLL_EVERY.seconds}s")
        return value

    def model_post_init(self, context: Any) -> None:
        self._request = self.request.compiled()
        self._items = compile_trigger_expression(self.items, ITEMS_NAMES)
        self._key = compile_trigger_expression(self.key, KEY_NAMES)

    @property
    def compiled_request(self) -> CompiledValue:
        return self._request

    @property
    def items_expression(self) -> Expression:
        return self._items

    @property
    def key_expression(self) -> Expression:
        return self._key

    def fingerprint(self) -> str:
        """Changes when what is polled or how items are told apart changes (a new baseline is taken then)."""
        return config_hash(self.model_dump(mode="json", by_alias=True, exclude={"every"}))


def _cron(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("a cron string such as \"0 9 * * 1-5\"")
    text = " ".join(value.split())
    if text.lower() in CRON_MACROS:
        return text.lower()
    if len(text.split(" ")) != 5:
        raise ValueError(f"{value!r}: a cron string has five fields (minute hour day-of-month month day-of-week) "
                         "or is one of @hourly, @daily, @weekly, @monthly, @yearly")
    try:
        croniter(text)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{value!r} is not a valid cron string: {exc}") from None
    return text


def _timezone(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ValueError("an IANA time zone name such as Europe/Berlin")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin or UTC)") from None
    return value


class ScheduleTrigger(Strict):
    """`schedule`: a run at each time the cron string names, in a time zone (each time fires once)."""

    cron: Annotated[str, BeforeValidator(_cron)] = Field(
        description="five fields (minute hour day-of-month month day-of-week) or @hourly, @daily, @weekly, …")
    timezone: Annotated[str, AfterValidator(_timezone)] = Field(default="UTC",
                                                                description="IANA name, e.g. Europe/Berlin")
    # Loaded once here, so computing due times never reads the time zone database on the event loop.
    _zone: ZoneInfo = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._zone = ZoneInfo(self.timezone)

    @property
    def zone(self) -> ZoneInfo:
        return self._zone

    def fingerprint(self) -> str:
        return config_hash({"cron": self.cron, "timezone": self.timezone})


def config_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()

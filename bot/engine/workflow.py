"""The workflow file format (SPEC.md, "Workflow files") as pydantic models."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

SLUG = r"^[a-z0-9][a-z0-9_-]{0,62}$"
STEP_ID = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
# What a value that does not match one of the patterns above should look like, in words.
PATTERN_HELP = {
    SLUG: "lowercase letters, digits, - and _, starting with a letter or digit, at most 63 characters",
    STEP_ID: "letters, digits and _, not starting with a digit, at most 63 characters",
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


def parse_duration(value: Any) -> timedelta:
    """`90s`, `10m`, `1h30m`, `2d`, or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return timedelta(seconds=value)
        except OverflowError:
            raise ValueError(f"{value!r} is longer than any duration can be") from None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a duration looks like 30s, 10m, 1h30m or 2d")
    text = value.strip().replace(" ", "")
    position, total = 0, 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    for match in _DURATION.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * units[match.group(2)]
        position = match.end()
    if position != len(text) or position == 0:
        raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 10m, 1h30m or 2d)")
    try:
        return timedelta(seconds=total)
    except OverflowError:
        raise ValueError(f"{value!r} is longer than any duration can be") from None


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Param(Strict):
    default: Any = None
    choices: list[Any] | None = None
    description: str = ""
    required: bool = False

    @model_validator(mode="after")
    def _default_in_choices(self) -> Param:
        if self.choices is not None and self.default is not None and self.default not in self.choices:
            raise ValueError(f"default {self.default!r} is not one of the choices {self.choices}")
        return self


class Approvers(Strict):
    users: list[str] = []
    groups: list[str] = []
    allow_self: bool = True

    @field_validator("users")
    @classmethod
    def _user_ids(cls, users: list[str]) -> list[str]:
        for user in users:
            if not re.fullmatch(r"[UW][A-Z0-9]{2,}", user):
                raise ValueError(f"{user!r} is not a Slack user id (U012ABCDEF)")
        return users

    @property
    def anyone(self) -> bool:
        return not self.users and not self.groups


class Approval(Strict):
    """`approval: required`, or a mapping that also sets the approvers and the approval timeout."""

    timeout: Duration = timedelta(hours=24)
    on_timeout: Literal["skip", "fail"] = "skip"
    approvers: Approvers | None = None


def _approval(value: Any) -> Any:
    if value in (None, False, "none", "never", "auto"):
        return None
    if value in ("required", True):
        return {}
    return value


class Retry(Strict):
    attempts: int = Field(default=1, ge=1, le=20, description="total attempts, the first included")
    backoff: Duration = timedelta(seconds=5)
    max_backoff: Duration = timedelta(minutes=10)


class Step(Strict):
    id: str = Field(pattern=STEP_ID)
    title: str | None = None
    if_: str | None = Field(default=None, alias="if")
    approval: Annotated[Approval | None, BeforeValidator(_approval)] = None
    approvers: Approvers | None = None
    timeout: Duration = timedelta(minutes=5)
    retry: Retry = Retry()
    uses: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("must be longer than 0s")
        return value


class Card(Strict):
    title: str | None = None
    text: str | None = None
    fields: dict[str, Any] = {}
    link: str | None = None


def _triggers(value: Any) -> Any:
    if isinstance(value, str):
        return {value: {}}
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            raise ValueError("a list under `on:` names triggers, e.g. [webhook, github]")
        return {item: {} for item in value}
    if isinstance(value, dict):
        return {key: ({} if config is None else config) for key, config in value.items()}
    return value


class Concurrency(Strict):
    """At most `limit` runs at a time per `key` (CEL over event, trigger and params; default: the workflow).

    A run holds a slot while it runs or waits to retry; waiting for approval does not hold one. A run that finds
    no free slot waits for one (`on_conflict: queue`) or is not run at all (`skip`).
    """

    limit: int = Field(ge=1, le=10_000)
    key: str | None = None
    on_conflict: Literal["queue", "skip"] = "queue"


class Workflow(Strict):
    name: str = Field(pattern=SLUG)
    title: str | None = None
    description: str = ""
    params: dict[str, Param] = {}
    on: Annotated[dict[str, dict[str, Any]], BeforeValidator(_triggers)] = Field(default_factory=dict)
    if_: str | None = Field(default=None, alias="if")
    card: Card = Card()
    approvers: Approvers | None = None
    run_by: Literal["anyone", "admins"] = Field(default="anyone",
                                                description="who may start it with /relay run")
    concurrency: Concurrency | None = None
    steps: list[Step] = Field(default_factory=list)

    @field_validator("params")
    @classmethod
    def _param_names(cls, params: dict[str, Param]) -> dict[str, Param]:
        for name in params:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
                raise ValueError(f"{name!r} is not a valid parameter name (letters, digits, _)")
        return params

    @model_validator(mode="after")
    def _unique_step_ids(self) -> Workflow:
        seen: set[str] = set()
        for step in self.steps:
            if step.id in seen:
                raise ValueError(f"step id {step.id!r} is used twice")
            seen.add(step.id)
        return self

    @property
    def display_title(self) -> str:
        return self.title or self.name

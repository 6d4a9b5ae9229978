"""One request from an action to a tool's API, through the outbound guard; every failure becomes an
`ActionFailed` whose message says what went wrong in a line, and whether trying again may help."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from integrations.base import ActionContext, ActionFailed, ActionOutput
from integrations.httpclient import BlockedAddress, HttpResponse, RequestFailed, ResponseTooLarge

OutputT = TypeVar("OutputT", bound=ActionOutput)

# Answers worth another attempt: the server was busy or broken, not the request.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


async def send(ctx: ActionContext, method: str, url: str, *, headers: Mapping[str, str] | None = None,
               json_body: Any = None, data: str | bytes | None = None,
               params: Mapping[str, str] | None = None) -> HttpResponse:
    """The answer, whatever its status; ActionFailed when there is none.

    A TimeoutError is left to the step runner, which reports the step as timed out (and retries it if asked).
    """
    try:
        return await ctx.http.request(method, url, headers=headers, json_body=json_body, data=data,
                                      params=params, timeout=ctx.timeout)
    except BlockedAddress as exc:
        raise ActionFailed(f"refused: {exc}", retryable=False) from None
    except ResponseTooLarge as exc:
        raise ActionFailed(str(exc), retryable=False) from None
    except RequestFailed as exc:
        raise ActionFailed(str(exc)) from None


def error_detail(response: HttpResponse) -> str:
    """The most telling part of an error answer, in the shapes the supported APIs use."""
    data = response.json_or_none()
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):  # PagerDuty: {"error": {"message": …, "errors": […]}}
            parts = [str(error.get("message") or "")] + [str(item) for item in error.get("errors") or []]
            return "; ".join(part for part in parts if part)[:300]
        for key in ("message", "error", "error_description"):  # GitHub, GitLab, Alertmanager
            if data.get(key):
                return str(data[key])[:300]
    return response.text.strip()[:300]


async def call_api(ctx: ActionContext, *, service: str, method: str, url: str, path: str,
                   headers: Mapping[str, str], json_body: Any = None) -> HttpResponse:
    """A request that must succeed: a 4xx/5xx answer is an ActionFailed naming the service and the call."""
    response = await send(ctx, method, url, headers=headers, json_body=json_body)
    if response.status >= 400:
        detail = error_detail(response)
        raise ActionFailed(f"{service} answered {response.status} to {method} {path}: {detail}",
                           retryable=response.status in RETRYABLE_STATUSES or _rate_limited(response, detail))
    return response


def json_object(response: HttpResponse, *, service: str, path: str, key: str | None = None) -> dict[str, Any]:
    """The answer's JSON object (or its `key` member); ActionFailed when the API answered something else."""
    data = response.json_or_none()
    if key is not None and isinstance(data, dict):
        data = data.get(key)
    if not isinstance(data, dict):
        what = f"a JSON object with {key!r}" if key else "a JSON object"
        raise ActionFailed(f"{service} answered {path} without {what}: {response.text[:200]}", retryable=False)
    return data


def output_from(model: type[OutputT], values: dict[str, Any], *, service: str, path: str) -> OutputT:
    """The action's outputs from values read out of an answer; ActionFailed when the answer lacked them."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ActionFailed(f"{service} answered {path} without a usable {where}: {error['msg']}",
                           retryable=False) from None


def _rate_limited(response: HttpResponse, detail: str) -> bool:
    """A 403 that is a rate limit (GitHub answers its primary and secondary limits so): worth a retry, later."""
    if response.status != 403:
        return False
    return (response.headers.get("x-ratelimit-remaining") == "0" or "retry-after" in response.headers
            or "rate limit" in detail.lower())

"""`http.request`: call any HTTP API (through the outbound guard)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from integrations.apicall import RETRYABLE_STATUSES, send
from integrations.base import Action, ActionContext, ActionFailed, ActionInput, ActionOutput

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
TEXT_OUTPUT_LIMIT = 64 * 1024


class RequestInput(ActionInput):
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    url: str = Field(pattern=r"^https?://", description="an http or https URL")
    headers: dict[str, str] = {}
    query: dict[str, str] = {}
    json_: Any = Field(default=None, alias="json", description="a body sent as JSON")
    body: str | None = Field(default=None, description="a raw text body")
    fail_on_status: bool = Field(default=True, description="fail the step on a 4xx/5xx answer")

    @model_validator(mode="after")
    def _one_body(self) -> RequestInput:
        if self.json_ is not None and self.body is not None:
            raise ValueError("give either json or body, not both")
        return self


class RequestOutput(ActionOutput):
    status: int
    headers: dict[str, str]
    json_: Any = Field(default=None, alias="json", serialization_alias="json")
    text: str


class Request(Action[RequestInput, RequestOutput]):
    name: ClassVar[str] = "http.request"
    description: ClassVar[str] = ("Send an HTTP request; outputs status, headers, json (when the answer is JSON) "
                                  "and text.")
    Input = RequestInput
    Output = RequestOutput

    def is_idempotent(self, inputs: RequestInput) -> bool:
        return inputs.method in IDEMPOTENT_METHODS

    def is_idempotent_static(self, raw_inputs: dict[str, Any]) -> bool:
        method = raw_inputs.get("method", "GET")
        # A method that comes from an expression could be anything: not safe to assume.
        return isinstance(method, str) and "${{" not in method and method.upper() in IDEMPOTENT_METHODS

    async def run(self, inputs: RequestInput, ctx: ActionContext) -> RequestOutput:
        headers = dict(inputs.headers)
        if not any(name.lower() == "idempotency-key" for name in headers):
            headers["Idempotency-Key"] = ctx.idempotency_key
        # A TimeoutError is left to the step runner, which reports the step as timed out.
        response = await send(ctx, inputs.method, inputs.url, headers=headers, json_body=inputs.json_,
                              data=inputs.body, params=inputs.query or None)
        text = response.text
        output = RequestOutput(status=response.status, headers=response.headers, json=response.json_or_none(),
                               text=text[:TEXT_OUTPUT_LIMIT])
        if inputs.fail_on_status and response.status >= 400:
            raise ActionFailed(f"{inputs.method} {inputs.url} answered {response.status}: {text[:300]}",
                               retryable=response.status in RETRYABLE_STATUSES)
        return output

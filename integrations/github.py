"""GitHub: webhooks signed with `X-Hub-Signature-256`, and actions on the REST API (or GitHub Enterprise)."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from integrations.apicall import OutputT, call_api, json_object, output_from
from integrations.base import (
    Action,
    ActionContext,
    ActionInput,
    ActionOutput,
    BadPayload,
    CardSpec,
    IncomingWebhook,
    Integration,
    ParsedEvent,
    dig,
    mapping,
    parse_json_body,
    text_of,
    verify_hub_signature,
)
from integrations.github_summaries import summarize
from integrations.httpclient import HttpResponse

API = "https://api.github.com"


class GitHub(Integration):
    name: ClassVar[str] = "github"
    title: ClassVar[str] = "GitHub"
    default_base_url: ClassVar[str | None] = API

    def verify(self, *, secret: str, request: IncomingWebhook, now: float) -> bool:
        return verify_hub_signature(secret=secret, body=request.body, header=request.header("X-Hub-Signature-256"))

    def parse(self, request: IncomingWebhook) -> ParsedEvent:
        event = (request.header("X-GitHub-Event") or "").strip()
        if not event:
            raise BadPayload("the X-GitHub-Event header is missing")
        payload = parse_json_body(request)
        if not isinstance(payload, dict):
            raise BadPayload("a GitHub webhook body is a JSON object")
        action = payload.get("action")
        kind = f"{event}.{action}" if isinstance(action, str) and action else event
        summary, link = summarize(event, payload)
        headers = {name: request.header(name) or "" for name in
                   ("X-GitHub-Event", "X-GitHub-Delivery", "X-GitHub-Hook-ID", "User-Agent")
                   if request.header(name)}
        return ParsedEvent(kind=kind, payload=payload, delivery_id=request.header("X-GitHub-Delivery"),
                           summary=summary, link=link, headers=headers, event_name=event,
                           actionable=event != "ping")

    def default_card(self, event: ParsedEvent) -> CardSpec:
        payload = mapping(event.payload)
        fields: dict[str, str] = {}
        repo = text_of(dig(payload, "repository", "full_name"))
        if repo:
            fields["Repository"] = repo
        elif text_of(dig(payload, "organization", "login")):
            fields["Organization"] = text_of(dig(payload, "organization", "login"))
        sender = text_of(dig(payload, "sender", "login"))
        if sender:
            fields["By"] = sender
        ref = dig(payload, "pull_request", "base", "ref") or payload.get("ref")
        if isinstance(ref, str) and ref:
            fields["Branch"] = ref.removeprefix("refs/heads/")
        return CardSpec(title=event.summary, fields=fields, link=event.link)

    def setup_hint(self, *, url: str, secret: str) -> str:
        return (f"In GitHub: repository or organization *Settings → Webhooks → Add webhook*; Payload URL {url}, "
                f"content type `application/json`, and {secret}.")


# ------------------------------------------------------------------------------------------------- actions


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28"}


async def _call(ctx: ActionContext, method: str, path: str, token: str, body: dict[str, Any] | None
                ) -> HttpResponse:
    return await call_api(ctx, service="GitHub", method=method, url=ctx.base_url("github", API) + path,
                          path=path, headers=_headers(token), json_body=body)


def _outputs(model: type[OutputT], response: HttpResponse, path: str, **names: str) -> OutputT:
    """The outputs `model` declares, read from the answer's JSON (`names` maps an output to another key)."""
    data = json_object(response, service="GitHub", path=path)
    values = {field: data.get(names.get(field, field)) for field in model.model_fields}
    return output_from(model, values, service="GitHub", path=path)


def path_segments(value: str) -> str:
    """Refuse `.` and `..` as a name: put in an API path, they would step out of it."""
    if any(part in (".", "..") for part in value.split("/")):
        raise ValueError(f"{value!r} is not a name")
    return value


class RepoInput(ActionInput):
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="owner/name")
    token: str = Field(min_length=1, description="a token allowed to act on the repository")

    _repo_segments = field_validator("repo")(path_segments)


class CommentInput(RepoInput):
    number: int = Field(description="issue or pull request number")
    body: str


class CommentOutput(ActionOutput):
    id: int
    url: str


class Comment(Action[CommentInput, CommentOutput]):
    name: ClassVar[str] = "github.comment"
    description: ClassVar[str] = "Comment on an issue or pull request."
    Input = CommentInput
    Output = CommentOutput

    async def run(self, inputs: CommentInput, ctx: ActionContext) -> CommentOutput:
        path = f"/repos/{inputs.repo}/issues/{inputs.number}/comments"
        response = await _call(ctx, "POST", path, inputs.token, {"body": inputs.body})
        return _outputs(CommentOutput, response, path, url="html_url")


class CreateIssueInput(RepoInput):
    title: str
    body: str = ""
    labels: list[str] = []
    assignees: list[str] = []


class CreateIssueOutput(ActionOutput):
    number: int
    url: str


class CreateIssue(Action[CreateIssueInput, CreateIssueOutput]):
    name: ClassVar[str] = "github.create_issue"
    description: ClassVar[str] = "Open an issue."
    Input = CreateIssueInput
    Output = CreateIssueOutput

    async def run(self, inputs: CreateIssueInput, ctx: ActionContext) -> CreateIssueOutput:
        body: dict[str, Any] = {"title": inputs.title, "body": inputs.body}
        if inputs.labels:
            body["labels"] = inputs.labels
        if inputs.assignees:
            body["assignees"] = inputs.assignees
        path = f"/repos/{inputs.repo}/issues"
        response = await _call(ctx, "POST", path, inputs.token, body)
        return _outputs(CreateIssueOutput, response, path, url="html_url")


class CommitStatusInput(RepoInput):
    sha: str = Field(pattern=r"^[0-9a-fA-F]{7,64}$")
    state: Literal["error", "failure", "pending", "success"]
    context: str = "relaybot"
    description: str = ""
    target_url: str | None = None


class CommitStatusOutput(ActionOutput):
    id: int
    state: str


class CommitStatus(Action[CommitStatusInput, CommitStatusOutput]):
    name: ClassVar[str] = "github.commit_status"
    description: ClassVar[str] = "Set a commit status (a check mark on a commit or pull request)."
    Input = CommitStatusInput
    Output = CommitStatusOutput
    idempotent: ClassVar[bool] = True  # the newest status per context wins

    async def run(self, inputs: CommitStatusInput, ctx: ActionContext) -> CommitStatusOutput:
        body: dict[str, Any] = {"state": inputs.state, "context": inputs.context,
                                "description": inputs.description[:140]}
        if inputs.target_url:
            body["target_url"] = inputs.target_url
        path = f"/repos/{inputs.repo}/statuses/{inputs.sha}"
        response = await _call(ctx, "POST", path, inputs.token, body)
        return _outputs(CommitStatusOutput, response, path)


def _input_text(value: Any) -> str:
    """Workflow inputs as the Actions UI sends them: text, with booleans as `true`/`false`; lists and objects as
    JSON (what `fromJSON()` reads in the workflow), not as Python writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


class DispatchInput(RepoInput):
    workflow: str = Field(pattern=r"^[\w.-]+$", description="workflow file name (deploy.yml) or id")

    _workflow_segment = field_validator("workflow")(path_segments)
    ref: str = "main"
    inputs: dict[str, Any] = Field(default={}, description="the workflow's inputs: text as it is, `true`/`false`, "
                                   "lists and maps as JSON; a null one is left out (its default applies)")


class DispatchOutput(ActionOutput):
    dispatched: bool


class DispatchWorkflow(Action[DispatchInput, DispatchOutput]):
    name: ClassVar[str] = "github.dispatch_workflow"
    description: ClassVar[str] = "Start a GitHub Actions workflow (workflow_dispatch)."
    Input = DispatchInput
    Output = DispatchOutput

    async def run(self, inputs: DispatchInput, ctx: ActionContext) -> DispatchOutput:
        await _call(ctx, "POST", f"/repos/{inputs.repo}/actions/workflows/{inputs.workflow}/dispatches",
                    inputs.token, {"ref": inputs.ref, "inputs": {k: _input_text(v) for k, v in inputs.inputs.items()
                                                                 # null: left out, so the input's default applies
                                                                 if v is not None}})
        return DispatchOutput(dispatched=True)


GitHub.actions = (Comment, CreateIssue, CommitStatus, DispatchWorkflow)

"""GitHub: webhooks signed with `X-Hub-Signature-256`, and actions on the REST API (or GitHub Enterprise)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from integrations.base import (
    Action,
    ActionContext,
    ActionFailed,
    ActionInput,
    ActionOutput,
    BadPayload,
    CardSpec,
    IncomingWebhook,
    Integration,
    ParsedEvent,
    parse_json_body,
    verify_hub_signature,
)

API = "https://api.github.com"


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _short(sha: Any) -> str:
    return str(sha)[:7] if sha else ""


def summarize(event: str, payload: dict[str, Any]) -> tuple[str, str | None]:
    """A one-line summary naming the repository, and the most useful link."""
    repo = _get(payload, "repository", "full_name") or _get(payload, "organization", "login") or "GitHub"
    action = payload.get("action")
    sender = _get(payload, "sender", "login") or "someone"
    link = _get(payload, "repository", "html_url")

    if event == "push":
        ref = str(payload.get("ref", "")).removeprefix("refs/heads/").removeprefix("refs/tags/")
        count = len(payload.get("commits") or [])
        pusher = _get(payload, "pusher", "name") or sender
        noun = "commit" if count == 1 else "commits"
        return f"{repo}: {pusher} pushed {count} {noun} to {ref}", payload.get("compare") or link
    if event == "pull_request":
        pr = payload.get("pull_request") or {}
        number = pr.get("number") or payload.get("number")
        verb = "merged" if action == "closed" and pr.get("merged") else action
        who = sender if verb != "opened" else _get(pr, "user", "login") or sender
        return f"{repo} #{number} {verb} by {who}: {pr.get('title', '')}".rstrip(": "), pr.get("html_url") or link
    if event in ("issues", "issue_comment"):
        issue = payload.get("issue") or {}
        what = "comment on" if event == "issue_comment" else ""
        verb = f"{action} {what}".strip() if what else action
        return (f"{repo} #{issue.get('number')} {verb} by {sender}: {issue.get('title', '')}",
                _get(payload, "comment", "html_url") or issue.get("html_url") or link)
    if event == "release":
        release = payload.get("release") or {}
        name = release.get("name") or release.get("tag_name")
        return f"{repo}: release {name} {action} by {sender}", release.get("html_url") or link
    if event == "workflow_run":
        run = payload.get("workflow_run") or {}
        result = run.get("conclusion") or run.get("status") or action
        return (f"{repo}: workflow {run.get('name')} on {run.get('head_branch')} {result}",
                run.get("html_url") or link)
    if event == "workflow_job":
        job = payload.get("workflow_job") or {}
        result = job.get("conclusion") or job.get("status") or action
        return f"{repo}: job {job.get('name')} ({job.get('workflow_name') or 'workflow'}) {result}", \
            job.get("html_url") or link
    if event == "check_run":
        check = payload.get("check_run") or {}
        result = check.get("conclusion") or check.get("status") or action
        return f"{repo}: check {check.get('name')} {result} on {_short(check.get('head_sha'))}", \
            check.get("html_url") or link
    if event == "deployment":
        deployment = payload.get("deployment") or {}
        return (f"{repo}: deployment of {deployment.get('ref') or _short(deployment.get('sha'))} "
                f"to {deployment.get('environment')} {action or 'created'} by {sender}",
                deployment.get("url") and link)
    if event == "deployment_status":
        status = payload.get("deployment_status") or {}
        deployment = payload.get("deployment") or {}
        return (f"{repo}: deployment to {status.get('environment') or deployment.get('environment')} "
                f"{status.get('state')}", status.get("target_url") or status.get("log_url") or link)
    if event == "ping":
        return f"{repo}: webhook ping ({payload.get('zen', 'hello')})", link
    # Every other event: a sensible generic title.
    label = event.replace("_", " ")
    verb = f" {action}" if action else ""
    return f"{repo}: {label}{verb} by {sender}", link


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
        payload = event.payload if isinstance(event.payload, dict) else {}
        fields: dict[str, str] = {}
        repo = _get(payload, "repository", "full_name")
        if repo:
            fields["Repository"] = repo
        sender = _get(payload, "sender", "login")
        if sender:
            fields["By"] = sender
        ref = _get(payload, "pull_request", "base", "ref") or payload.get("ref")
        if isinstance(ref, str) and ref:
            fields["Branch"] = ref.removeprefix("refs/heads/")
        return CardSpec(title=event.summary, fields=fields, link=event.link)

    def setup_hint(self, *, url: str) -> str:
        return (f"In GitHub: repository or organization *Settings → Webhooks → Add webhook*; Payload URL {url}, "
                "content type `application/json`, and the secret above.")


# ------------------------------------------------------------------------------------------------- actions


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28"}


async def _call(ctx: ActionContext, method: str, path: str, token: str, body: dict[str, Any] | None
                ) -> Any:
    url = ctx.base_url("github", API) + path
    response = await ctx.http.request(method, url, headers=_headers(token), json_body=body,
                                      timeout=ctx.timeout)
    if response.status >= 400:
        detail = response.json_or_none()
        message = detail.get("message") if isinstance(detail, dict) else response.text[:200]
        raise ActionFailed(f"GitHub answered {response.status} to {method} {path}: {message}",
                           retryable=response.status >= 500 or response.status == 429)
    return response.json_or_none()


class RepoInput(ActionInput):
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="owner/name")
    token: str = Field(description="a token allowed to act on the repository")


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
        data = await _call(ctx, "POST", f"/repos/{inputs.repo}/issues/{inputs.number}/comments", inputs.token,
                           {"body": inputs.body})
        return CommentOutput(id=data["id"], url=data.get("html_url", ""))


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
        data = await _call(ctx, "POST", f"/repos/{inputs.repo}/issues", inputs.token, body)
        return CreateIssueOutput(number=data["number"], url=data.get("html_url", ""))


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
        data = await _call(ctx, "POST", f"/repos/{inputs.repo}/statuses/{inputs.sha}", inputs.token, body)
        return CommitStatusOutput(id=data["id"], state=data.get("state", inputs.state))


class DispatchInput(RepoInput):
    workflow: str = Field(description="workflow file name (deploy.yml) or id")
    ref: str = "main"
    inputs: dict[str, Any] = {}


class DispatchOutput(ActionOutput):
    dispatched: bool


class DispatchWorkflow(Action[DispatchInput, DispatchOutput]):
    name: ClassVar[str] = "github.dispatch_workflow"
    description: ClassVar[str] = "Start a GitHub Actions workflow (workflow_dispatch)."
    Input = DispatchInput
    Output = DispatchOutput

    async def run(self, inputs: DispatchInput, ctx: ActionContext) -> DispatchOutput:
        await _call(ctx, "POST", f"/repos/{inputs.repo}/actions/workflows/{inputs.workflow}/dispatches",
                    inputs.token, {"ref": inputs.ref, "inputs": {k: str(v) for k, v in inputs.inputs.items()}})
        return DispatchOutput(dispatched=True)


GitHub.actions = (Comment, CreateIssue, CommitStatus, DispatchWorkflow)

"""GitHub: webhooks signed with `X-Hub-Signature-256`, and actions on the REST API (or GitHub Enterprise)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

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
    parse_json_body,
    text_of,
    verify_hub_signature,
)
from integrations.httpclient import HttpResponse

API = "https://api.github.com"


def _get(data: Any, *path: str) -> Any:
    return dig(data, *path)


def _short(sha: Any) -> str:
    return str(sha)[:7] if sha else ""


def _ref(ref: Any) -> str:
    return str(ref or "").removeprefix("refs/heads/").removeprefix("refs/tags/")


def where(payload: dict[str, Any]) -> str:
    """The repository, or for organization-wide events the organization (or the installation's account)."""
    return text_of(_get(payload, "repository", "full_name") or _get(payload, "organization", "login")
                   or _get(payload, "installation", "account", "login")
                   or _get(payload, "enterprise", "slug")) or "GitHub"


def _push(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    ref = str(p.get("ref") or "")
    noun = "tag" if ref.startswith("refs/tags/") else "branch"
    pusher = text_of(_get(p, "pusher", "name")) or sender
    if p.get("deleted"):
        return f"{repo}: {pusher} deleted {noun} {_ref(ref)}", link
    if noun == "tag":
        return f"{repo}: {pusher} pushed tag {_ref(ref)}", p.get("compare") or link
    count = len(p.get("commits") or [])
    commits = "1 commit" if count == 1 else f"{count} commits"
    forced = " (forced)" if p.get("forced") else ""
    new = " (new branch)" if p.get("created") else ""
    return f"{repo}: {pusher} pushed {commits} to {_ref(ref)}{new}{forced}", p.get("compare") or link


def _pull_request(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    pr = p.get("pull_request") or {}
    action = p.get("action")
    verb = "merged" if action == "closed" and pr.get("merged") else str(action or "changed").replace("_", " ")
    who = _get(pr, "user", "login") if action == "opened" else sender
    return f"{repo} #{pr.get('number') or p.get('number')} {verb} by {who or sender}: {text_of(pr.get('title'))}", \
        pr.get("html_url") or link


def _issue(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    issue = p.get("issue") or {}
    return (f"{repo} #{issue.get('number')} {str(p.get('action') or 'changed').replace('_', ' ')} by {sender}: "
            f"{text_of(issue.get('title'))}", issue.get("html_url") or link)


def _issue_comment(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    issue = p.get("issue") or {}
    return (f"{repo} #{issue.get('number')}: comment {p.get('action') or 'changed'} by {sender} on "
            f"{text_of(issue.get('title'))}", _get(p, "comment", "html_url") or issue.get("html_url") or link)


def _review(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    pr = p.get("pull_request") or {}
    state = str(_get(p, "review", "state") or "").replace("_", " ").lower()
    what = f"review {p.get('action')}" + (f" ({state})" if state and p.get("action") == "submitted" else "")
    return (f"{repo} #{pr.get('number')}: {what} by {sender} on {text_of(pr.get('title'))}",
            _get(p, "review", "html_url") or pr.get("html_url") or link)


def _review_comment(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    pr = p.get("pull_request") or {}
    return (f"{repo} #{pr.get('number')}: review comment {p.get('action')} by {sender} on "
            f"{text_of(pr.get('title'))}", _get(p, "comment", "html_url") or pr.get("html_url") or link)


def _release(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    release = p.get("release") or {}
    name = text_of(release.get("name") or release.get("tag_name"))
    return f"{repo}: release {name} {p.get('action')} by {sender}", release.get("html_url") or link


def _workflow_run(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    run = p.get("workflow_run") or {}
    name = text_of(run.get("name") or _get(p, "workflow", "name") or run.get("display_title")) or "workflow"
    result = run.get("conclusion") or run.get("status") or p.get("action")
    return f"{repo}: workflow {name} on {run.get('head_branch')} {result}", run.get("html_url") or link


def _workflow_job(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    job = p.get("workflow_job") or {}
    result = job.get("conclusion") or job.get("status") or p.get("action")
    return (f"{repo}: job {text_of(job.get('name'))} ({text_of(job.get('workflow_name')) or 'workflow'}) {result}",
            job.get("html_url") or link)


def _check_run(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    check = p.get("check_run") or {}
    result = check.get("conclusion") or check.get("status") or p.get("action")
    return (f"{repo}: check {text_of(check.get('name'))} {result} on {_short(check.get('head_sha'))}",
            check.get("html_url") or link)


def _check_suite(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    suite = p.get("check_suite") or {}
    result = suite.get("conclusion") or suite.get("status") or p.get("action")
    app = text_of(_get(suite, "app", "name"))
    return (f"{repo}: check suite{f' {app}' if app else ''} {result} on "
            f"{suite.get('head_branch') or _short(suite.get('head_sha'))}", link)


def _deployment(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    deployment = p.get("deployment") or {}
    return (f"{repo}: deployment of {deployment.get('ref') or _short(deployment.get('sha'))} "
            f"to {deployment.get('environment')} {p.get('action') or 'created'} by {sender}", link)


def _deployment_status(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    status = p.get("deployment_status") or {}
    environment = status.get("environment") or _get(p, "deployment", "environment")
    return (f"{repo}: deployment to {environment} {status.get('state')}",
            status.get("target_url") or status.get("log_url") or link)


def _status(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    return (f"{repo}: status {text_of(p.get('context'))} {p.get('state')} on {_short(p.get('sha'))}",
            p.get("target_url") or link)


def _alert(repo: str, p: dict[str, Any], sender: str, link: str | None, *, label: str) -> tuple[str, str | None]:
    alert = p.get("alert") or {}
    what = text_of(_get(alert, "rule", "description") or _get(alert, "security_advisory", "summary")
                   or alert.get("secret_type_display_name") or alert.get("secret_type"))
    action = str(p.get("action") or "changed").replace("_", " ")
    return (f"{repo}: {label} #{alert.get('number')} {action}" + (f": {what}" if what else ""),
            alert.get("html_url") or link)


def _ping(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    return f"{repo}: webhook ping ({text_of(p.get('zen')) or 'hello'})", link


_SUMMARIES = {
    "push": _push, "pull_request": _pull_request, "issues": _issue, "issue_comment": _issue_comment,
    "pull_request_review": _review, "pull_request_review_comment": _review_comment, "release": _release,
    "workflow_run": _workflow_run, "workflow_job": _workflow_job, "check_run": _check_run,
    "check_suite": _check_suite, "deployment": _deployment, "deployment_status": _deployment_status,
    "status": _status, "ping": _ping,
}
_ALERTS = {"code_scanning_alert": "code scanning alert", "dependabot_alert": "Dependabot alert",
           "secret_scanning_alert": "secret scanning alert"}
# For every other event: the object the event is about, when its payload names it (`label.name` …).
_SUBJECTS = {"label": ("label", "name"), "milestone": ("milestone", "title"), "team": ("team", "name"),
             "member": ("member", "login"), "fork": ("forkee", "full_name"), "repository": ("repository", "name"),
             "workflow_dispatch": ("workflow",)}


def summarize(event: str, payload: dict[str, Any]) -> tuple[str, str | None]:
    """A one-line summary naming the repository (or organization), and the most useful link."""
    repo = where(payload)
    sender = text_of(_get(payload, "sender", "login")) or "someone"
    link = _get(payload, "repository", "html_url") or _get(payload, "organization", "html_url")
    if event in _SUMMARIES:
        return _SUMMARIES[event](repo, payload, sender, link)
    if event in ("create", "delete"):
        ref_type = text_of(payload.get("ref_type")) or "ref"
        verb = "created" if event == "create" else "deleted"
        return f"{repo}: {ref_type} {text_of(payload.get('ref'))} {verb} by {sender}", link
    if event in _ALERTS:
        return _alert(repo, payload, sender, link, label=_ALERTS[event])
    # Every other event: a sensible generic title.
    label = event.replace("_", " ") or "event"
    action = payload.get("action")
    verb = f" {str(action).replace('_', ' ')}" if action else ""
    subject = text_of(_get(payload, *_SUBJECTS[event])) if event in _SUBJECTS else ""
    named = f" {subject}" if subject and subject not in repo else ""
    return f"{repo}: {label}{named}{verb} by {sender}", link


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
                ) -> HttpResponse:
    return await call_api(ctx, service="GitHub", method=method, url=ctx.base_url("github", API) + path,
                          path=path, headers=_headers(token), json_body=body)


def _outputs(model: type[OutputT], response: HttpResponse, path: str, **names: str) -> OutputT:
    """The outputs `model` declares, read from the answer's JSON (`names` maps an output to another key)."""
    data = json_object(response, service="GitHub", path=path)
    values = {field: data.get(names.get(field, field)) for field in model.model_fields}
    return output_from(model, values, service="GitHub", path=path)


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
    """Workflow inputs as the Actions UI sends them: text, with booleans as `true`/`false`."""
    return str(value).lower() if isinstance(value, bool) else str(value)


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
                    inputs.token, {"ref": inputs.ref, "inputs": {k: _input_text(v) for k, v in inputs.inputs.items()}})
        return DispatchOutput(dispatched=True)


GitHub.actions = (Comment, CreateIssue, CommitStatus, DispatchWorkflow)

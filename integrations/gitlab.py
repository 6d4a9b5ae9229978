"""GitLab (gitlab.com or self-hosted): webhooks with `X-Gitlab-Token`, and `gitlab.comment` on the REST API v4."""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

from pydantic import Field, field_validator, model_validator

from integrations.apicall import call_api, json_object, output_from
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
    constant_time_equal,
    dig,
    mapping,
    parse_json_body,
    text_of,
)

API = "https://gitlab.com/api/v4"
ZERO_SHA = "0" * 40

# `object_attributes.action` (and a release's `action`) in the past tense, for summaries.
_PAST = {"open": "opened", "close": "closed", "reopen": "reopened", "update": "updated", "merge": "merged",
         "approved": "approved", "approval": "approved", "unapproved": "unapproved", "unapproval": "unapproved",
         "create": "created", "delete": "deleted"}


def project_path(payload: dict[str, Any]) -> str:
    """`group/project`, from whichever place this kind of event keeps it."""
    path = dig(payload, "project", "path_with_namespace")
    if path:
        return str(path)
    # Job events carry no `project` object, only the repository's home page and a display name.
    homepage = dig(payload, "repository", "homepage")
    if isinstance(homepage, str) and urlsplit(homepage).path.strip("/"):
        return urlsplit(homepage).path.strip("/")
    return text_of(payload.get("project_name") or dig(payload, "project", "name")
                   or dig(payload, "repository", "name")) or "GitLab"


def _user(payload: dict[str, Any]) -> str:
    return text_of(dig(payload, "user", "username") or payload.get("user_username")
                   or dig(payload, "user", "name") or payload.get("user_name")) or "someone"


def _action(payload: dict[str, Any]) -> str | None:
    action = dig(payload, "object_attributes", "action") or payload.get("action")
    return action if isinstance(action, str) and action else None


def _branch(ref: Any) -> str:
    return str(ref or "").removeprefix("refs/heads/").removeprefix("refs/tags/")


def _noteable(payload: dict[str, Any]) -> tuple[str, str]:
    """What a comment is on, as GitLab writes references (`!1`, `#17`, a commit), and its title."""
    kind = dig(payload, "object_attributes", "noteable_type")
    if kind == "MergeRequest":
        return f"!{dig(payload, 'merge_request', 'iid')}", text_of(dig(payload, "merge_request", "title"))
    if kind == "Issue":
        return f"#{dig(payload, 'issue', 'iid')}", text_of(dig(payload, "issue", "title"))
    if kind == "Commit":
        return f"commit {str(dig(payload, 'commit', 'id') or '')[:8]}", text_of(dig(payload, "commit", "message"))
    if kind == "Snippet":
        return f"${dig(payload, 'snippet', 'id')}", text_of(dig(payload, "snippet", "title"))
    return "", ""


def summarize(kind: str, payload: dict[str, Any]) -> tuple[str, str | None]:
    """A one-line summary naming the project, and the most useful link."""
    project = project_path(payload)
    user = _user(payload)
    action = _action(payload)
    verb = _PAST.get(action or "", action or "")
    attributes = mapping(payload.get("object_attributes"))
    web_url = dig(payload, "project", "web_url")
    link = attributes.get("url") or web_url

    if kind in ("push", "tag_push"):
        ref = _branch(payload.get("ref"))
        noun = "tag" if kind == "tag_push" else "branch"
        if payload.get("after") == ZERO_SHA:
            return f"{project}: {user} deleted {noun} {ref}", web_url
        if kind == "tag_push":
            return f"{project}: {user} pushed tag {ref}", web_url
        count = payload.get("total_commits_count")
        count = count if isinstance(count, int) else len(payload.get("commits") or [])
        commits = "1 commit" if count == 1 else f"{count} commits"
        new = " (new branch)" if payload.get("before") == ZERO_SHA else ""
        return f"{project}: {user} pushed {commits} to {ref}{new}", web_url
    if kind == "merge_request":
        return (f"{project} !{attributes.get('iid')} {verb or 'changed'} by {user}: "
                f"{text_of(attributes.get('title'))}", link)
    if kind in ("issue", "work_item"):
        return (f"{project} #{attributes.get('iid')} {verb or 'changed'} by {user}: "
                f"{text_of(attributes.get('title'))}", link)
    if kind == "note":
        reference, title = _noteable(payload)
        head = f"{project} {reference}".strip()
        return f"{head}: comment by {user}" + (f" on {title}" if title else ""), link
    if kind == "pipeline":
        pipeline_id = attributes.get("id")
        status = attributes.get("detailed_status") or attributes.get("status")
        return (f"{project}: pipeline #{pipeline_id} on {_branch(attributes.get('ref'))} {status}",
                f"{web_url}/-/pipelines/{pipeline_id}" if web_url and pipeline_id else link)
    if kind == "build":
        homepage = dig(payload, "repository", "homepage")
        job_id = payload.get("build_id")
        return (f"{project}: job {text_of(payload.get('build_name'))} ({text_of(payload.get('build_stage'))}) "
                f"{payload.get('build_status')} on {_branch(payload.get('ref'))}",
                f"{homepage}/-/jobs/{job_id}" if homepage and job_id else web_url)
    if kind == "deployment":
        return (f"{project}: deployment of {payload.get('ref') or payload.get('short_sha')} to "
                f"{payload.get('environment')} {payload.get('status')} by {user}",
                payload.get("deployable_url") or web_url)
    if kind == "release":
        return (f"{project}: release {text_of(payload.get('name') or payload.get('tag'))} {verb or 'changed'}",
                payload.get("url") or web_url)
    if kind == "wiki_page":
        return f"{project}: wiki page {text_of(attributes.get('title'))} {verb or 'changed'} by {user}", link
    # Every other event (feature flags, emoji, members, access tokens, system hooks …): a generic title.
    label = kind.replace("_", " ")
    return f"{project}: {label}{f' {verb}' if verb else ''} by {user}", link


class GitLab(Integration):
    name: ClassVar[str] = "gitlab"
    title: ClassVar[str] = "GitLab"
    default_base_url: ClassVar[str | None] = API

    def verify(self, *, secret: str, request: IncomingWebhook, now: float) -> bool:
        token = request.header("X-Gitlab-Token")
        if not secret or token is None:
            return False
        return constant_time_equal(token, secret)

    def parse(self, request: IncomingWebhook) -> ParsedEvent:
        payload = parse_json_body(request)
        if not isinstance(payload, dict):
            raise BadPayload("a GitLab webhook body is a JSON object")
        # System hooks name their event `event_name`; project and group hooks use `object_kind`.
        object_kind = payload.get("object_kind") or payload.get("event_name")
        if not isinstance(object_kind, str) or not object_kind:
            raise BadPayload("a GitLab webhook body has an object_kind")
        action = _action(payload)
        kind = f"{object_kind}.{action}" if action else object_kind
        summary, link = summarize(object_kind, payload)
        # GitLab (17.4 and later) keeps Idempotency-Key when a delivery is sent again ("Resend request"), and
        # gives the resend a new X-Gitlab-Event-UUID, so the key is what finds a redelivery. Without one, the
        # event UUID does; one GitLab request can fire several hooks that share it (a comment with a /close
        # quick action sends a note and a merge request event), so the kind keeps those apart.
        uuid = request.header("X-Gitlab-Event-UUID")
        delivery = request.header("Idempotency-Key") or (f"{uuid}:{kind}" if uuid else None)
        headers = {name: request.header(name) or "" for name in
                   ("X-Gitlab-Event", "X-Gitlab-Event-UUID", "X-Gitlab-Webhook-UUID", "X-Gitlab-Instance",
                    "Idempotency-Key", "User-Agent")
                   if request.header(name)}
        return ParsedEvent(kind=kind, payload=payload, delivery_id=delivery, summary=summary,
                           link=link if isinstance(link, str) else None, headers=headers, event_name=object_kind)

    def default_card(self, event: ParsedEvent) -> CardSpec:
        payload = event.payload if isinstance(event.payload, dict) else {}
        fields = {"Project": project_path(payload), "By": _user(payload)}
        attributes = mapping(payload.get("object_attributes"))
        branch = attributes.get("target_branch") or attributes.get("ref") or payload.get("ref")
        if branch:
            fields["Branch"] = _branch(branch)
        status = attributes.get("state") or attributes.get("status") or payload.get("build_status") \
            or payload.get("status")
        if isinstance(status, str) and status:
            fields["Status"] = status
        return CardSpec(title=event.summary, fields=fields, link=event.link)

    def setup_hint(self, *, url: str, secret: str) -> str:
        return (f"In GitLab: project or group *Settings → Webhooks → Add new webhook*; URL {url}, "
                f"*Secret token* {secret}, and tick the events to send.")


# ------------------------------------------------------------------------------------------------- actions


class CommentInput(ActionInput):
    project: str = Field(min_length=1, description="project id or path (group/project)")
    merge_request: int | None = Field(default=None, ge=1, description="merge request iid (!number)")
    issue: int | None = Field(default=None, ge=1, description="issue iid (#number)")
    body: str = Field(min_length=1, description="the comment (Markdown)")
    token: str = Field(min_length=1, description="an access token with the api scope")

    @field_validator("project")
    @classmethod
    def _no_dot_segments(cls, project: str) -> str:
        # Dots are not encoded in a URL path: `..` would step out of /projects/.
        if any(part in (".", "..") for part in project.split("/")):
            raise ValueError(f"{project!r} is not a project id or path")
        return project

    @model_validator(mode="after")
    def _one_target(self) -> CommentInput:
        if (self.merge_request is None) == (self.issue is None):
            raise ValueError("give either merge_request or issue")
        return self


class CommentOutput(ActionOutput):
    id: int
    noteable_type: str
    noteable_iid: int | None = None
    created_at: str | None = None


class Comment(Action[CommentInput, CommentOutput]):
    name: ClassVar[str] = "gitlab.comment"
    description: ClassVar[str] = "Comment on a merge request or an issue."
    Input = CommentInput
    Output = CommentOutput

    async def run(self, inputs: CommentInput, ctx: ActionContext) -> CommentOutput:
        # A project path goes into the URL encoded as one segment (`group%2Fproject`), as GitLab requires.
        project = quote(inputs.project, safe="")
        target = (f"merge_requests/{inputs.merge_request}" if inputs.merge_request is not None
                  else f"issues/{inputs.issue}")
        path = f"/projects/{project}/{target}/notes"
        response = await call_api(ctx, service="GitLab", method="POST", url=ctx.base_url("gitlab", API) + path,
                                  path=path, headers={"PRIVATE-TOKEN": inputs.token}, json_body={"body": inputs.body})
        data = json_object(response, service="GitLab", path=path)
        return output_from(CommentOutput, {key: data.get(key) for key in CommentOutput.model_fields},
                           service="GitLab", path=path)


GitLab.actions = (Comment,)

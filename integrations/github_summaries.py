"""One-line summaries of GitHub webhook events, each naming the repository (or the organization) it is about.

Events with their own wording are listed in `_SUMMARIES`; every other event gets a generic title from its name,
its action, and the object it is about when the payload names one.
"""

from __future__ import annotations

from typing import Any

from integrations.base import dig, text_of


def _short(sha: Any) -> str:
    return str(sha)[:7] if sha else ""


def _ref(ref: Any) -> str:
    return str(ref or "").removeprefix("refs/heads/").removeprefix("refs/tags/")


def where(payload: dict[str, Any]) -> str:
    """The repository, or for organization-wide events the organization (or the installation's account)."""
    return text_of(dig(payload, "repository", "full_name") or dig(payload, "organization", "login")
                   or dig(payload, "installation", "account", "login")
                   or dig(payload, "enterprise", "slug")) or "GitHub"


def _push(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    ref = str(p.get("ref") or "")
    noun = "tag" if ref.startswith("refs/tags/") else "branch"
    pusher = text_of(dig(p, "pusher", "name")) or sender
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
    who = dig(pr, "user", "login") if action == "opened" else sender
    return f"{repo} #{pr.get('number') or p.get('number')} {verb} by {who or sender}: {text_of(pr.get('title'))}", \
        pr.get("html_url") or link


def _issue(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    issue = p.get("issue") or {}
    return (f"{repo} #{issue.get('number')} {str(p.get('action') or 'changed').replace('_', ' ')} by {sender}: "
            f"{text_of(issue.get('title'))}", issue.get("html_url") or link)


def _issue_comment(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    issue = p.get("issue") or {}
    return (f"{repo} #{issue.get('number')}: comment {p.get('action') or 'changed'} by {sender} on "
            f"{text_of(issue.get('title'))}", dig(p, "comment", "html_url") or issue.get("html_url") or link)


def _review(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    pr = p.get("pull_request") or {}
    state = str(dig(p, "review", "state") or "").replace("_", " ").lower()
    what = f"review {p.get('action')}" + (f" ({state})" if state and p.get("action") == "submitted" else "")
    return (f"{repo} #{pr.get('number')}: {what} by {sender} on {text_of(pr.get('title'))}",
            dig(p, "review", "html_url") or pr.get("html_url") or link)


def _review_comment(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    pr = p.get("pull_request") or {}
    return (f"{repo} #{pr.get('number')}: review comment {p.get('action')} by {sender} on "
            f"{text_of(pr.get('title'))}", dig(p, "comment", "html_url") or pr.get("html_url") or link)


def _release(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    release = p.get("release") or {}
    name = text_of(release.get("name") or release.get("tag_name"))
    return f"{repo}: release {name} {p.get('action')} by {sender}", release.get("html_url") or link


def _workflow_run(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    run = p.get("workflow_run") or {}
    name = text_of(run.get("name") or dig(p, "workflow", "name") or run.get("display_title")) or "workflow"
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
    app = text_of(dig(suite, "app", "name"))
    return (f"{repo}: check suite{f' {app}' if app else ''} {result} on "
            f"{suite.get('head_branch') or _short(suite.get('head_sha'))}", link)


def _deployment(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    deployment = p.get("deployment") or {}
    return (f"{repo}: deployment of {deployment.get('ref') or _short(deployment.get('sha'))} "
            f"to {deployment.get('environment')} {p.get('action') or 'created'} by {sender}", link)


def _deployment_status(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    status = p.get("deployment_status") or {}
    environment = status.get("environment") or dig(p, "deployment", "environment")
    return (f"{repo}: deployment to {environment} {status.get('state')}",
            status.get("target_url") or status.get("log_url") or link)


def _status(repo: str, p: dict[str, Any], sender: str, link: str | None) -> tuple[str, str | None]:
    return (f"{repo}: status {text_of(p.get('context'))} {p.get('state')} on {_short(p.get('sha'))}",
            p.get("target_url") or link)


def _alert(repo: str, p: dict[str, Any], sender: str, link: str | None, *, label: str) -> tuple[str, str | None]:
    alert = p.get("alert") or {}
    what = text_of(dig(alert, "rule", "description") or dig(alert, "security_advisory", "summary")
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
    sender = text_of(dig(payload, "sender", "login")) or "someone"
    link = dig(payload, "repository", "html_url") or dig(payload, "organization", "html_url")
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
    subject = text_of(dig(payload, *_SUBJECTS[event])) if event in _SUBJECTS else ""
    named = f" {subject}" if subject and subject not in repo else ""
    return f"{repo}: {label}{named}{verb} by {sender}", link

"""Each tool's actions against a local fake of its API: the request is the one the API documents (method, path,
headers, body), the outputs are read from the answer, and failures say what went wrong."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from pydantic import ValidationError

from integrations.alertmanager import Silence
from integrations.base import ActionFailed
from integrations.github import Comment as GitHubComment
from integrations.github import CommitStatus, CreateIssue, DispatchWorkflow
from integrations.gitlab import Comment as GitLabComment
from integrations.pagerduty import Acknowledge, Note, Resolve
from tests.fakes.alertmanager import FakeAlertmanager
from tests.integrations.conftest import action_context

# ------------------------------------------------------------------------------------------------ GitHub

GITHUB_TOKEN = "ghp_test_token"


def github_headers_ok(headers: dict[str, str]) -> None:
    assert headers["Authorization"] == f"Bearer {GITHUB_TOKEN}"
    assert headers["Accept"] == "application/vnd.github+json"
    assert headers["X-GitHub-Api-Version"] == "2022-11-28"
    assert headers["Content-Type"] == "application/json"


async def run(action, inputs, ctx):
    return await action.run(action.Input.model_validate(inputs), ctx)


async def test_github_comment(http, github_api):
    ctx = action_context(http, github=github_api.url)
    output = await run(GitHubComment(), {"repo": "acme/api", "number": 42, "body": "Deployed.",
                                         "token": GITHUB_TOKEN}, ctx)
    [call] = github_api.calls
    assert (call.method, call.path, call.body) == ("POST", "/repos/acme/api/issues/42/comments", {"body": "Deployed."})
    github_headers_ok(call.headers)
    assert output.id == github_api.comments[0]["id"]
    assert output.url == "https://github.com/acme/api/issues/42#issuecomment-1"


async def test_github_create_issue(http, github_api):
    ctx = action_context(http, github=github_api.url)
    output = await run(CreateIssue(), {"repo": "acme/api", "title": "Deploy failed", "body": "See the run.",
                                       "labels": ["deploy"], "token": GITHUB_TOKEN}, ctx)
    [call] = github_api.calls
    assert (call.method, call.path) == ("POST", "/repos/acme/api/issues")
    assert call.body == {"title": "Deploy failed", "body": "See the run.", "labels": ["deploy"]}
    github_headers_ok(call.headers)
    assert (output.number, output.url) == (1, "https://github.com/acme/api/issues/1")


async def test_github_commit_status(http, github_api):
    ctx = action_context(http, github=github_api.url)
    sha = "c4295bd74fb0f4fda03689c3df3f2803b658fd85"
    output = await run(CommitStatus(), {"repo": "acme/api", "sha": sha, "state": "success", "context": "deploy",
                                        "description": "Deployed to production", "target_url": "https://ci/1",
                                        "token": GITHUB_TOKEN}, ctx)
    [call] = github_api.calls
    assert (call.method, call.path) == ("POST", f"/repos/acme/api/statuses/{sha}")
    assert call.body == {"state": "success", "context": "deploy", "description": "Deployed to production",
                         "target_url": "https://ci/1"}
    github_headers_ok(call.headers)
    assert output.state == "success" and output.id == github_api.statuses[0]["id"]


async def test_github_dispatch_workflow(http, github_api):
    ctx = action_context(http, github=github_api.url)
    output = await run(DispatchWorkflow(), {"repo": "acme/api", "workflow": "deploy.yml", "ref": "main",
                                            "inputs": {"env": "production", "dry_run": False, "replicas": 3,
                                                       "labels": [{"name": "bug", "default": True}], "body": None},
                                            "token": GITHUB_TOKEN}, ctx)
    [call] = github_api.calls
    assert (call.method, call.path) == ("POST", "/repos/acme/api/actions/workflows/deploy.yml/dispatches")
    # A list as JSON (it was Python's repr, which fromJSON() cannot read), and a null left out (it was "None").
    assert call.body == {"ref": "main", "inputs": {"env": "production", "dry_run": "false", "replicas": "3",
                                                   "labels": '[{"name":"bug","default":true}]'}}
    github_headers_ok(call.headers)
    assert output.dispatched is True and github_api.dispatches[0]["workflow"] == "deploy.yml"


async def test_github_errors_name_the_call_and_say_whether_to_retry(http, github_api):
    ctx = action_context(http, github=github_api.url)
    inputs = {"repo": "acme/api", "number": 1, "body": "x", "token": "wrong"}
    with pytest.raises(ActionFailed) as refused:
        await run(GitHubComment(), inputs, ctx)
    assert refused.value.message == "GitHub answered 401 to POST /repos/acme/api/issues/1/comments: Bad credentials"
    assert refused.value.retryable is False
    for bad in ({"repo": "../users"}, {"repo": "acme/.."}, {"repo": "acme/api/issues"}):
        with pytest.raises(ValidationError):
            GitHubComment.Input.model_validate({**inputs, **bad})
    with pytest.raises(ValidationError):
        DispatchWorkflow.Input.model_validate({"repo": "a/b", "workflow": "..", "token": "t"})
    github_api.fail_next.append(502)
    with pytest.raises(ActionFailed) as broken:
        await run(GitHubComment(), {**inputs, "token": GITHUB_TOKEN}, ctx)
    assert "GitHub answered 502" in broken.value.message and broken.value.retryable is True
    # GitHub says "rate limit" with a 403 (primary and secondary limits): to be retried, not a refusal.
    github_api.fail_next += [(403, "API rate limit exceeded for installation ID 1.", {"x-ratelimit-remaining": "0"}),
                             (403, "You have exceeded a secondary rate limit.", {"retry-after": "60"}),
                             (403, "Resource not accessible by integration", {})]
    outcomes = []
    for _ in range(3):
        with pytest.raises(ActionFailed) as limited:
            await run(GitHubComment(), {**inputs, "token": GITHUB_TOKEN}, ctx)
        outcomes.append(limited.value.retryable)
    assert outcomes == [True, True, False]


# ------------------------------------------------------------------------------------------------ GitLab


async def test_gitlab_comment_on_a_merge_request(http, gitlab_api):
    ctx = action_context(http, gitlab=gitlab_api.url)
    output = await run(GitLabComment(), {"project": "gitlab-org/gitlab-test", "merge_request": 1,
                                         "body": "Deployed to staging.", "token": gitlab_api.token}, ctx)
    [call] = gitlab_api.calls
    # docs.gitlab.com/api/notes: POST /projects/:id/merge_requests/:merge_request_iid/notes, the path URL-encoded.
    assert call.method == "POST"
    assert call.raw_path == "/api/v4/projects/gitlab-org%2Fgitlab-test/merge_requests/1/notes"
    assert call.headers["PRIVATE-TOKEN"] == gitlab_api.token and "Authorization" not in call.headers
    assert call.headers["Content-Type"] == "application/json"
    assert call.body == {"body": "Deployed to staging."}
    assert output.id == gitlab_api.notes[0]["id"]
    assert (output.noteable_type, output.noteable_iid) == ("MergeRequest", 1)


async def test_gitlab_comment_on_an_issue_by_project_id(http, gitlab_api):
    ctx = action_context(http, gitlab=gitlab_api.url)
    output = await run(GitLabComment(), {"project": "5", "issue": 17, "body": "Looking into it.",
                                         "token": gitlab_api.token}, ctx)
    [call] = gitlab_api.calls
    assert call.raw_path == "/api/v4/projects/5/issues/17/notes"
    assert (output.noteable_type, output.noteable_iid) == ("Issue", 17)


async def test_gitlab_comment_inputs_and_errors(http, gitlab_api):
    with pytest.raises(ValidationError, match="either merge_request or issue"):
        GitLabComment.Input.model_validate({"project": "a/b", "body": "x", "token": "t"})
    with pytest.raises(ValidationError, match="either merge_request or issue"):
        GitLabComment.Input.model_validate({"project": "a/b", "merge_request": 1, "issue": 2, "body": "x",
                                            "token": "t"})
    for project in ("..", "group/../../users", "./x"):
        with pytest.raises(ValidationError, match="not a project id or path"):
            GitLabComment.Input.model_validate({"project": project, "issue": 1, "body": "x", "token": "t"})
    ctx = action_context(http, gitlab=gitlab_api.url)
    with pytest.raises(ActionFailed) as refused:
        await run(GitLabComment(), {"project": "a/b", "issue": 1, "body": "x", "token": "nope"}, ctx)
    assert refused.value.message == "GitLab answered 401 to POST /projects/a%2Fb/issues/1/notes: 401 Unauthorized"
    assert refused.value.retryable is False


# ------------------------------------------------------------------------------------------------ PagerDuty

PD = {"incident": "PGR0VU2", "token": "pd-test-key", "from": "oncall@example.com"}


def pagerduty_headers_ok(headers: dict[str, str]) -> None:
    # developer.pagerduty.com REST API v2: a REST API key, the version in Accept, and From for account keys.
    assert headers["Authorization"] == "Token token=pd-test-key"
    assert headers["Accept"] == "application/vnd.pagerduty+json;version=2"
    assert headers["Content-Type"] == "application/json"
    assert headers["From"] == "oncall@example.com"


async def test_pagerduty_acknowledge(http, pagerduty_api):
    ctx = action_context(http, pagerduty=pagerduty_api.url)
    output = await run(Acknowledge(), PD, ctx)
    [call] = pagerduty_api.calls
    assert (call.method, call.path) == ("PUT", "/incidents/PGR0VU2")
    assert call.body == {"incident": {"type": "incident_reference", "status": "acknowledged"}}
    pagerduty_headers_ok(call.headers)
    assert output.model_dump() == {"id": "PGR0VU2", "number": 2, "status": "acknowledged",
                                   "title": "A little bump in the road",
                                   "url": "https://acme.pagerduty.com/incidents/PGR0VU2"}
    assert pagerduty_api.incidents["PGR0VU2"]["status"] == "acknowledged"


async def test_pagerduty_resolve_with_a_resolution(http, pagerduty_api):
    ctx = action_context(http, pagerduty=pagerduty_api.url)
    output = await run(Resolve(), {**PD, "resolution": "Rolled back"}, ctx)
    [call] = pagerduty_api.calls
    assert (call.method, call.path) == ("PUT", "/incidents/PGR0VU2")
    assert call.body == {"incident": {"type": "incident_reference", "status": "resolved", "resolution": "Rolled back"}}
    pagerduty_headers_ok(call.headers)
    assert output.status == "resolved"


async def test_pagerduty_note(http, pagerduty_api):
    ctx = action_context(http, pagerduty=pagerduty_api.url)
    output = await run(Note(), {**PD, "content": "Acknowledged from Slack by alice."}, ctx)
    [call] = pagerduty_api.calls
    assert (call.method, call.path) == ("POST", "/incidents/PGR0VU2/notes")
    assert call.body == {"note": {"content": "Acknowledged from Slack by alice."}}
    pagerduty_headers_ok(call.headers)
    assert output.model_dump() == {"id": "PNOTE01", "content": "Acknowledged from Slack by alice.",
                                   "created_at": "2026-01-02T03:04:05-00:00"}


async def test_pagerduty_errors_show_the_api_message(http, pagerduty_api):
    ctx = action_context(http, pagerduty=pagerduty_api.url)
    with pytest.raises(ActionFailed) as unknown_user:
        await run(Acknowledge(), {**PD, "from": "nobody@example.com"}, ctx)
    assert unknown_user.value.message == ("PagerDuty answered 400 to PUT /incidents/PGR0VU2: "
                                          "Invalid Input Provided; Requester User Not Found")
    assert unknown_user.value.retryable is False
    with pytest.raises(ActionFailed, match="PagerDuty answered 404 to PUT /incidents/PNOPE: Not Found"):
        await run(Acknowledge(), {**PD, "incident": "PNOPE"}, ctx)
    with pytest.raises(ValidationError):
        Acknowledge.Input.model_validate({**PD, "incident": "../users"})  # never another path


# ------------------------------------------------------------------------------------------------ Alertmanager

LABELS = {"alertname": "HighErrorRate", "job": "api", "severity": "page"}


async def test_alertmanager_silence(http, alertmanager_api):
    ctx = action_context(http)
    before = datetime.now().astimezone()
    output = await run(Silence(), {"url": alertmanager_api.url + "/", "labels": LABELS, "duration": "2h",
                                   "created_by": "alice", "comment": "Deploy in progress"}, ctx)
    [call] = alertmanager_api.calls
    # prometheus/alertmanager api/v2 openapi: POST /silences with a postableSilence.
    assert (call.method, call.path) == ("POST", "/api/v2/silences")
    assert call.headers["Content-Type"] == "application/json"
    body = call.body
    assert body["matchers"] == [
        {"name": "alertname", "value": "HighErrorRate", "isRegex": False, "isEqual": True},
        {"name": "job", "value": "api", "isRegex": False, "isEqual": True},
        {"name": "severity", "value": "page", "isRegex": False, "isEqual": True},
    ]
    starts = datetime.fromisoformat(body["startsAt"].replace("Z", "+00:00"))
    ends = datetime.fromisoformat(body["endsAt"].replace("Z", "+00:00"))
    assert body["startsAt"].endswith("Z") and abs(starts - before) < timedelta(seconds=5)
    assert ends - starts == timedelta(hours=2)
    assert (body["createdBy"], body["comment"]) == ("alice", "Deploy in progress")
    [stored] = alertmanager_api.silences
    assert output.silence_id == stored["id"]
    assert output.url == f"{alertmanager_api.url}/#/silences/{stored['id']}"
    assert (output.starts_at, output.ends_at) == (body["startsAt"], body["endsAt"])


async def test_alertmanager_silence_with_extra_matchers_and_proxy_auth(http):
    server = FakeAlertmanager(require_header=("Authorization", "Bearer proxy-token"))
    await server.start()
    try:
        ctx = action_context(http)
        inputs = {"url": server.url, "matchers": [{"name": "instance", "value": "api-.*", "isRegex": True}],
                  "duration": "1h30m"}
        with pytest.raises(ActionFailed, match="Alertmanager answered 401 to POST /api/v2/silences: Unauthorized"):
            await run(Silence(), inputs, ctx)
        output = await run(Silence(), {**inputs, "headers": {"Authorization": "Bearer proxy-token"}}, ctx)
        body = server.calls[-1].body
        assert body["matchers"] == [{"name": "instance", "value": "api-.*", "isRegex": True, "isEqual": True}]
        assert body["createdBy"] == "relaybot" and body["comment"]
        ends = datetime.fromisoformat(body["endsAt"].replace("Z", "+00:00"))
        starts = datetime.fromisoformat(body["startsAt"].replace("Z", "+00:00"))
        assert ends - starts == timedelta(minutes=90)
        assert output.silence_id == server.silences[0]["id"]
    finally:
        await server.stop()


def test_alertmanager_silence_inputs_refuse_what_would_silence_everything():
    with pytest.raises(ValidationError, match="give labels or matchers"):
        Silence.Input.model_validate({"url": "http://am:9093", "duration": "1h"})
    for duration in ("0s", "soon", "1h 30", "", "99999999999999d", 1e300):  # the last two overflowed timedelta
        with pytest.raises(ValidationError):
            Silence.Input.model_validate({"url": "http://am:9093", "labels": LABELS, "duration": duration})
    assert Silence.Input.model_validate({"url": "http://am:9093", "labels": LABELS, "duration": 90}
                                        ).duration == timedelta(seconds=90)


async def test_actions_answer_without_the_expected_body_fail_clearly(http, target):
    """A proxy or a wrong base URL answering 200 with HTML must not be taken for success."""
    target.default.body = "<html>login</html>"
    ctx = action_context(http, gitlab=target.url, pagerduty=target.url, github=target.url)
    with pytest.raises(ActionFailed, match="GitLab answered /projects/a%2Fb/issues/1/notes without a JSON object"):
        await run(GitLabComment(), {"project": "a/b", "issue": 1, "body": "x", "token": "t"}, ctx)
    with pytest.raises(ActionFailed, match="PagerDuty answered /incidents/P1 without a JSON object with 'incident'"):
        await run(Acknowledge(), {**PD, "incident": "P1"}, ctx)
    with pytest.raises(ActionFailed, match="Alertmanager answered /api/v2/silences without a JSON object"):
        await run(Silence(), {"url": target.url, "labels": LABELS, "duration": "1h"}, ctx)
    target.default.body = {"unexpected": True}
    with pytest.raises(ActionFailed, match="GitHub answered /repos/a/b/issues/1/comments without a usable id"):
        await run(GitHubComment(), {"repo": "a/b", "number": 1, "body": "x", "token": "t"}, ctx)

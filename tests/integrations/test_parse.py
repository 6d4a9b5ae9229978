"""What each integration makes of a request: kind, `events:` filter value, delivery id, summary, link, default card,
and a 400 for bodies it cannot read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

import integrations
from integrations.alertmanager import Alertmanager, notification_hash
from integrations.base import BadPayload, IncomingWebhook, TriggerConfig
from integrations.github import GitHub
from integrations.gitlab import GitLab
from integrations.pagerduty import PagerDuty
from integrations.registry import ACTIONS, INTEGRATIONS
from tests.conftest import CORPORA
from tests.integrations.conftest import GITLAB_EVENT_HEADERS, dumps


def corpus(path: str) -> dict[str, Any]:
    return json.loads((CORPORA / path).read_text())


def request(payload: Any, **headers: str) -> IncomingWebhook:
    body = payload if isinstance(payload, bytes) else dumps(payload)
    return IncomingWebhook(body=body, headers=CIMultiDict({"Content-Type": "application/json", **headers}))


def test_the_registry_knows_every_integration_and_action_of_the_spec():
    assert {"webhook", "github", "gitlab", "pagerduty", "alertmanager"} <= set(INTEGRATIONS)
    assert {"http.request", "slack.post", "github.comment", "github.create_issue", "github.commit_status",
            "github.dispatch_workflow", "gitlab.comment", "pagerduty.acknowledge", "pagerduty.resolve",
            "pagerduty.note", "alertmanager.silence"} <= set(ACTIONS)
    assert INTEGRATIONS["pagerduty"].secret_generated_by_tool is True
    assert not any(INTEGRATIONS[name].secret_generated_by_tool for name in ("github", "gitlab", "alertmanager"))


def test_integrations_never_import_bot():
    for path in Path(integrations.__path__[0]).glob("*.py"):
        text = path.read_text()
        assert "from bot" not in text and "import bot" not in text, path.name


# ------------------------------------------------------------------------------------------------ GitLab

GITLAB_EXPECTED = {
    "push.json": ("push", "push", "mike/diaspora: jsmith pushed 4 commits to master"),
    "tag_push.json": ("tag_push", "tag_push", "jsmith/example: jsmith pushed tag v1.0.0"),
    "merge_request.json": ("merge_request.open", "merge_request",
                           "gitlabhq/gitlab-test !1 opened by user1: MS-Viewport"),
    "issue.json": ("issue.open", "issue",
                   "gitlabhq/gitlab-test #23 opened by root: New API: create/update/delete file"),
    "note_merge_request.json": ("note.create", "note", "gitlab-org/gitlab-test !1: comment by root on "
                                                       "Tempora et eos debitis quae laborum et."),
    "note_issue.json": ("note.create", "note", "gitlab-org/gitlab-test #17: comment by user1 on test_issue"),
    "pipeline.json": ("pipeline", "pipeline", "gitlab-org/gitlab-test: pipeline #31 on master passed"),
    "job.json": ("build", "build",
                 "jsmithy2/release-tools-fake: job auto_deploy:start (coordinated:tag) success on main"),
    "deployment.json": ("deployment", "deployment",
                        "root/test-deployment-webhooks: deployment of 1.0.0 to staging success by user1"),
    "release.json": ("release.create", "release", "exm-namespace/example-project: release 1.0.0 created"),
}


@pytest.mark.parametrize("name", sorted(GITLAB_EXPECTED))
def test_gitlab_kind_filter_and_summary(name):
    payload = corpus(f"gitlab/{name}")
    parsed = GitLab().parse(request(payload, **{"X-Gitlab-Event": GITLAB_EVENT_HEADERS[payload["object_kind"]],
                                                "X-Gitlab-Event-UUID": "uuid-1", "X-Gitlab-Token": "secret"}))
    kind, event_name, summary = GITLAB_EXPECTED[name]
    assert (parsed.kind, parsed.event_name, parsed.summary) == (kind, event_name, summary)
    assert parsed.delivery_id == f"uuid-1:{kind}"
    assert parsed.link and parsed.link.startswith("http")
    assert "X-Gitlab-Token" not in parsed.headers and parsed.headers["X-Gitlab-Event-UUID"] == "uuid-1"
    card = GitLab().default_card(parsed)
    assert card.fields["Project"] in summary


def test_gitlab_links_point_at_the_object():
    mr = GitLab().parse(request(corpus("gitlab/merge_request.json")))
    assert mr.link == "http://example.com/diaspora/merge_requests/1"
    pipeline = GitLab().parse(request(corpus("gitlab/pipeline.json")))
    assert pipeline.link == "http://192.168.64.1:3005/gitlab-org/gitlab-test/-/pipelines/31"
    job = GitLab().parse(request(corpus("gitlab/job.json")))
    assert job.link == "https://gitlab.com/jsmithy2/release-tools-fake/-/jobs/3580121225"


def test_gitlab_push_variants_and_delivery_fallback():
    push = corpus("gitlab/push.json")
    deleted = {**push, "after": "0" * 40}
    assert GitLab().parse(request(deleted)).summary == "mike/diaspora: jsmith deleted branch master"
    created = {**push, "before": "0" * 40, "total_commits_count": 1}
    assert GitLab().parse(request(created)).summary == "mike/diaspora: jsmith pushed 1 commit to master (new branch)"
    assert GitLab().parse(request(push, **{"Idempotency-Key": "idem-1"})).delivery_id == "idem-1"
    assert GitLab().parse(request(push)).delivery_id is None


def test_gitlab_events_filter_on_object_kind():
    gitlab = GitLab()
    note = gitlab.parse(request(corpus("gitlab/note_issue.json")))
    assert gitlab.matches(TriggerConfig(events=["note"]), note)
    assert gitlab.matches(TriggerConfig(events=["note.create"]), note)
    assert not gitlab.matches(TriggerConfig(events=["merge_request", "push"]), note)
    assert gitlab.matches(TriggerConfig(), note)


def test_gitlab_system_hooks_and_unknown_kinds_get_a_generic_summary():
    system = {"event_name": "project_create", "path_with_namespace": "acme/new", "name": "new",
              "project": {"path_with_namespace": "acme/new"}}
    parsed = GitLab().parse(request(system))
    assert parsed.kind == "project_create" and parsed.summary == "acme/new: project create by someone"
    emoji = {"object_kind": "emoji", "user": {"username": "ada"}, "project": {"path_with_namespace": "acme/api"},
             "object_attributes": {"action": "award", "name": "thumbsup"}}
    parsed = GitLab().parse(request(emoji))
    assert parsed.kind == "emoji.award" and parsed.summary == "acme/api: emoji award by ada"


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"no": "kind"}', b'{"object_kind": 5}'])
def test_gitlab_bad_payloads_are_400(body):
    with pytest.raises(BadPayload):
        GitLab().parse(request(body))


# ------------------------------------------------------------------------------------------------ PagerDuty


def pagerduty_event(event_type: str, **data: Any) -> dict[str, Any]:
    payload = corpus("pagerduty/incident.priority_updated.json")
    payload["event"]["event_type"] = event_type
    payload["event"]["data"].update(data)
    return payload


def test_pagerduty_kind_filter_delivery_and_card():
    parsed = PagerDuty().parse(request(corpus("pagerduty/incident.priority_updated.json"),
                                       **{"X-Webhook-Id": "wh-9", "X-Webhook-Subscription": "PSUB"}))
    assert (parsed.kind, parsed.event_name, parsed.delivery_id) == ("incident.priority_updated",
                                                                    "incident.priority_updated", "wh-9")
    assert parsed.summary == ("API Service: incident #2 priority updated to P1 by Tenex Engineer: "
                              "A little bump in the road")
    assert parsed.link == "https://acme.pagerduty.com/incidents/PGR0VU2"
    assert parsed.actionable
    card = PagerDuty().default_card(parsed)
    assert card.fields == {"Service": "API Service", "Status": "triggered", "Urgency": "high", "Priority": "P1",
                           "Assigned to": "User 123"}
    # Without X-Webhook-Id the event's own id keeps redeliveries apart from new events.
    assert PagerDuty().parse(request(corpus("pagerduty/incident.priority_updated.json"))).delivery_id == \
        "01BWDWL3NYY7LUFPZCC28QUCMK"


def test_pagerduty_summaries_of_other_events():
    triggered = PagerDuty().parse(request(pagerduty_event("incident.triggered")))
    assert triggered.summary == "API Service: incident #2 triggered by Tenex Engineer: A little bump in the road"
    responder = PagerDuty().parse(request(pagerduty_event("incident.responder.added")))
    assert responder.summary.startswith("API Service: incident #2 responder added")
    annotated = corpus("pagerduty/incident.priority_updated.json")
    annotated["event"].update(event_type="incident.annotated", data={
        "type": "incident_note", "content": "Rolled back the deploy",
        "incident": {"id": "PGR0VU2", "summary": "[#2] A little bump in the road",
                     "html_url": "https://acme.pagerduty.com/incidents/PGR0VU2"}})
    parsed = PagerDuty().parse(request(annotated))
    assert parsed.summary == ("PagerDuty: note by Tenex Engineer on [#2] A little bump in the road: "
                              "Rolled back the deploy")
    assert parsed.link == "https://acme.pagerduty.com/incidents/PGR0VU2"
    service = corpus("pagerduty/incident.priority_updated.json")
    service["event"].update(event_type="service.updated", data={"id": "PF9KMXH", "type": "service",
                                                                 "summary": "API Service"})
    assert PagerDuty().parse(request(service)).summary == "API Service: service updated by Tenex Engineer"


def test_pagerduty_ping_is_answered_but_runs_only_when_subscribed():
    ping = {"event": {"id": "p1", "event_type": "pagey.ping", "resource_type": "pagey", "data": {"message": "hi"}}}
    parsed = PagerDuty().parse(request(ping))
    assert parsed.kind == "pagey.ping" and not parsed.actionable
    assert not PagerDuty().matches(TriggerConfig(), parsed)
    assert PagerDuty().matches(TriggerConfig(events=["pagey.ping"]), parsed)


@pytest.mark.parametrize("body", [b"{}", b'{"event": "x"}', b'{"event": {"event_type": ""}}', b"nope"])
def test_pagerduty_bad_payloads_are_400(body):
    with pytest.raises(BadPayload):
        PagerDuty().parse(request(body))


# ------------------------------------------------------------------------------------------------ Alertmanager


def test_alertmanager_kind_summary_dedupe_and_card():
    parsed = Alertmanager().parse(request(corpus("alertmanager/firing.json")))
    assert (parsed.kind, parsed.event_name) == ("alert.firing", "firing")
    assert parsed.summary == "[FIRING:2] HighErrorRate (job=api, severity=page): API 5xx ratio above 5%"
    assert parsed.link == "http://alertmanager.example.com:9093"
    assert parsed.dedupe_window == 300 and parsed.delivery_id and parsed.delivery_id.startswith("am-")
    assert Alertmanager().matches(TriggerConfig(events=["firing"]), parsed)
    assert Alertmanager().matches(TriggerConfig(events=["alert.firing"]), parsed)
    assert not Alertmanager().matches(TriggerConfig(events=["resolved"]), parsed)
    card = Alertmanager().default_card(parsed)
    assert card.fields == {"Alert": "HighErrorRate", "Status": "2 firing", "Severity": "page",
                           "Instances": "api-1:8080, api-2:8080",
                           "Runbook": "https://runbooks.example.com/HighErrorRate"}
    resolved = Alertmanager().parse(request(corpus("alertmanager/resolved.json")))
    assert resolved.kind == "alert.resolved" and resolved.delivery_id != parsed.delivery_id


def test_alertmanager_names_several_alerts():
    firing = corpus("alertmanager/firing.json")
    firing["commonLabels"] = {"severity": "page"}
    firing["groupLabels"] = {}
    firing["alerts"][1]["labels"]["alertname"] = "DiskFull"
    firing["commonAnnotations"] = {}
    assert Alertmanager().parse(request(firing)).summary == "[FIRING:2] HighErrorRate and 1 more (severity=page)"


@settings(max_examples=40, deadline=None)
@given(external=st.text(max_size=30), generator=st.text(max_size=30), truncated=st.integers(0, 5))
def test_alertmanager_hash_ignores_what_differs_between_ha_peers(external, generator, truncated):
    firing = corpus("alertmanager/firing.json")
    peer = json.loads(json.dumps(firing))
    peer["externalURL"] = external
    peer["alerts"][0]["generatorURL"] = generator
    peer["alerts"].reverse()
    assert notification_hash(peer) == notification_hash(firing)
    changed = json.loads(json.dumps(firing))
    changed["alerts"][0]["endsAt"] = "2026-11-20T09:00:00Z"
    assert notification_hash(changed) != notification_hash(firing)


@pytest.mark.parametrize("body", [b"{}", b'{"alerts": [], "status": "weird"}', b'{"status": "firing"}', b"[]"])
def test_alertmanager_bad_payloads_are_400(body):
    with pytest.raises(BadPayload):
        Alertmanager().parse(request(body))


# ------------------------------------------------------------------------------------------------ GitHub


def test_github_generic_events_name_the_repository_or_organization():
    unknown = {"action": "created", "repository": {"full_name": "acme/api"}, "sender": {"login": "ada"}}
    assert GitHub().parse(request(unknown, **{"X-GitHub-Event": "merge_group"})).summary == \
        "acme/api: merge group created by ada"
    installation = {"action": "created", "installation": {"account": {"login": "acme"}}, "sender": {"login": "ada"}}
    assert GitHub().parse(request(installation, **{"X-GitHub-Event": "installation"})).summary == \
        "acme: installation created by ada"


def test_github_push_summaries():
    push = corpus("github/push/with-new-branch.payload.json")
    assert GitHub().parse(request(push, **{"X-GitHub-Event": "push"})).summary == \
        "Codertocat/Hello-World: Codertocat pushed 1 commit to master (new branch)"
    deleted = corpus("github/push/payload.json")
    assert GitHub().parse(request(deleted, **{"X-GitHub-Event": "push"})).summary == \
        "Codertocat/Hello-World: Codertocat deleted tag simple-tag"


def test_github_without_event_header_is_400():
    with pytest.raises(BadPayload):
        GitHub().parse(request({"zen": "x"}))


def test_github_default_card_names_the_repository_or_organization():
    pr = GitHub().parse(request(corpus("github/pull_request/opened.payload.json"),
                                **{"X-GitHub-Event": "pull_request"}))
    assert GitHub().default_card(pr).fields == {"Repository": "Codertocat/Hello-World", "By": "Codertocat",
                                                "Branch": "master"}
    team = GitHub().parse(request(corpus("github/team/created.payload.json"), **{"X-GitHub-Event": "team"}))
    assert team.summary == "Octocoders: team github created by Codertocat"
    assert GitHub().default_card(team).fields == {"Organization": "Octocoders", "By": "Codertocat"}

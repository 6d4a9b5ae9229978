"""`relaybot test`: one workflow, one event, no Slack and no server; the audit trail and the exit status."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from bot.cli import main
from tests.conftest import ROOT, write_workflow
from tests.fakes.http_target import Reply

EXAMPLES = ROOT / "integrations" / "examples"
MERGED = EXAMPLES / "github" / "pull_request.closed-merged.json"
OPENED = EXAMPLES / "github" / "pull_request.opened.json"

RELEASE = """
name: release
title: Release merged pull requests
params:
  env: {default: staging, choices: [staging, production]}
on:
  github: {events: [pull_request]}
if: event.action == "closed" && event.pull_request.merged
approvers: {users: [U0RELEASE1]}
steps:
  - id: build
    uses: http.request
    with:
      method: POST
      url: https://ci.example.com/builds
      headers: {Authorization: "Bearer ${{ secrets.CI_TOKEN }}"}
      json: {sha: "${{ event.pull_request.merge_commit_sha }}"}
  - id: deploy
    title: Deploy build ${{ steps.build.outputs.json.id }} to ${{ params.env }}
    approval: required
    uses: http.request
    with:
      method: POST
      url: https://deploy.example.com/deploys
      json: {build: "${{ steps.build.outputs.json.id }}", env: "${{ params.env }}"}
  - id: announce
    approval: required
    uses: slack.post
    with:
      text: "Released to ${{ params.env }}"
      thread: true
"""


@pytest.fixture
def release(tmp_path: Path) -> Path:
    path = write_workflow(tmp_path / "workflows", "release", RELEASE)
    (tmp_path / "build.json").write_text('{"id": 4242, "status": "queued"}')
    (tmp_path / "deploy.json").write_text('{"deployment": "d-1"}')
    (tmp_path / "oops.json").write_text('{"error": "deploy service is down"}')
    return path


def dry_run(capsys: pytest.CaptureFixture[str], *args: str, mocks: bool = True, tmp: Path | None = None
            ) -> tuple[int, str, str]:
    extra: list[str] = []
    if mocks and tmp is not None:
        extra = ["--offline", "--mock", f"POST https://ci.example.com/builds={tmp / 'build.json'}",
                 "--mock", f"https://deploy.example.com/*={tmp / 'deploy.json'}"]
    code = main(["test", *args, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def section(output: str, title: str) -> list[str]:
    lines = output.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return [line.strip() for line in lines[start:end]]


def test_approve_all_runs_every_step_and_exits_0(capsys, release, tmp_path):
    code, out, _ = dry_run(capsys, str(release), "--event", str(MERGED), "--approve", "all", "--param",
                           "env=production", "--secret", "CI_TOKEN=ci-token-value", tmp=tmp_path)
    assert code == 0, out
    thread = section(out, "Thread")
    order = ["started by a github event `pull_request.closed`", "*build* succeeded",
             "*Deploy build 4242 to production* is waiting for approval by @approver-u0release1",
             "*Deploy build 4242 to production* approved by @approver-u0release1",
             "*Deploy build 4242 to production* succeeded", "*announce* approved by", "Released to production",
             "Run succeeded: 3 succeeded"]
    positions = [next(i for i, line in enumerate(thread) if needle in line) for needle in order]
    assert positions[:5] == sorted(positions[:5]) and positions[-1] == len(thread) - 1, thread
    card = section(out, "Card")
    assert card[0] == "Release merged pull requests"
    assert any("succeeded" in line and "run `R" in line for line in card)
    assert section(out, "Outbound HTTP") == ["POST https://ci.example.com/builds → 200 (mocked)",
                                             "POST https://deploy.example.com/deploys → 200 (mocked)"]
    assert out.rstrip().splitlines()[-1].endswith("succeeded")
    assert "ci-token-value" not in out


def test_approve_none_skips_waiting_steps_and_still_succeeds(capsys, release, tmp_path):
    code, out, _ = dry_run(capsys, str(release), "--event", str(MERGED), "--approve", "none", "--secret",
                           "CI_TOKEN=x-token-1", tmp=tmp_path)
    assert code == 0, out
    thread = section(out, "Thread")
    assert any("*Deploy build 4242 to staging* skipped by @approver-u0release1" in line for line in thread)
    assert any("*announce* skipped by" in line for line in thread)
    assert "Run succeeded: 1 succeeded, 2 skipped" in " ".join(thread)
    assert section(out, "Outbound HTTP") == ["POST https://ci.example.com/builds → 200 (mocked)"]


def test_approving_one_step_skips_the_others(capsys, release, tmp_path):
    code, out, _ = dry_run(capsys, str(release), "--event", str(MERGED), "--approve", "announce", "--secret",
                           "CI_TOKEN=x-token-1", tmp=tmp_path)
    assert code == 0, out
    thread = " ".join(section(out, "Thread"))
    assert "to staging* skipped by" in thread and "*announce* approved by" in thread
    assert "Released to staging" in thread


def test_a_failing_step_exits_1_and_says_why(capsys, release, tmp_path):
    code, out, _ = dry_run(capsys, str(release), "--event", str(MERGED), "--approve", "all", "--secret",
                           "CI_TOKEN=x-token-1", "--offline",
                           "--mock", f"https://ci.example.com/builds={tmp_path / 'build.json'}",
                           "--mock", f"POST https://deploy.example.com/deploys=503:{tmp_path / 'oops.json'}",
                           mocks=False)
    assert code == 1, out
    thread = " ".join(section(out, "Thread"))
    assert "failed" in thread and "503" in thread and "deploy service is down" in thread
    assert "Run failed" in thread and "*announce* skipped" in thread
    assert "POST https://deploy.example.com/deploys → 503 (mocked)" in section(out, "Outbound HTTP")
    assert out.rstrip().splitlines()[-1].endswith("failed")


def test_a_missing_secret_fails_the_step(capsys, release, tmp_path):
    code, out, _ = dry_run(capsys, str(release), "--event", str(MERGED), tmp=tmp_path)
    assert code == 1
    assert "CI_TOKEN is not set" in out


def test_offline_refuses_what_no_mock_answers(capsys, release, tmp_path):
    code, out, _ = dry_run(capsys, str(release), "--event", str(MERGED), "--secret", "CI_TOKEN=x-token-1",
                           "--offline", mocks=False)
    assert code == 1
    assert "POST https://ci.example.com/builds → failed: offline" in section(out, "Outbound HTTP")
    assert "--offline keeps the network out" in out


def test_an_event_that_matches_nothing_exits_1(capsys, release, tmp_path):
    code, out, _ = dry_run(capsys, str(release), "--event", str(OPENED), tmp=tmp_path)
    assert code == 1
    assert "started no run" in out and 'event.action == "closed"' in out


def test_a_workflow_by_name_and_a_command_run(capsys, tmp_path, monkeypatch):
    write_workflow(tmp_path / "flows", "restart", """
        name: restart
        on: command
        params:
          service: {default: api}
        steps:
          - id: say
            uses: slack.post
            with: {text: "restarting ${{ event.service }} (param ${{ params.service }})", thread: true}
        """)
    write_workflow(tmp_path / "flows", "broken", "name: broken\nsteps: nope\n")
    monkeypatch.setenv("RELAYBOT_WORKFLOWS_DIR", str(tmp_path / "flows"))
    event = tmp_path / "args.json"
    event.write_text(json.dumps({"service": "billing worker"}))
    code, out, _ = dry_run(capsys, "restart", "--event", str(event), mocks=False)
    assert code == 0, out
    thread = " ".join(section(out, "Thread"))
    assert "/relay run" in thread and "restarting billing worker (param billing worker)" in thread
    assert "`restart` ← /relay run" in out


def test_kind_chooses_the_trigger_the_event_comes_through(capsys, tmp_path):
    flow = write_workflow(tmp_path / "flows", "nightly", """
        name: nightly
        on:
          github: {events: [push]}
          schedule: {cron: "0 3 * * *"}
        steps:
          - id: say
            uses: slack.post
            with: {text: "via ${{ trigger.source }} (${{ trigger.kind }})", thread: true}
        """)
    event = tmp_path / "empty.json"
    event.write_text("{}")
    code, out, _ = dry_run(capsys, str(flow), "--event", str(event), "--kind", "schedule", mocks=False)
    assert code == 0, out
    assert "via schedule (schedule)" in " ".join(section(out, "Thread"))
    code, out, _ = dry_run(capsys, str(flow), "--event", str(OPENED.parent / "push.json"), "--kind", "push",
                           mocks=False)
    assert code == 0, out
    assert "via github (push)" in " ".join(section(out, "Thread"))


def test_a_run_without_steps_is_reported_as_the_run_it_was(capsys, tmp_path):
    """It starts and ends in one transaction; reading the runs before asking whether the engine was idle once
    reported it as no run (exit 1) about one time in three."""
    flow = write_workflow(tmp_path / "flows", "nosteps", "name: nosteps\non: webhook\n")
    event = EXAMPLES / "webhook" / "backup-failed.json"
    for _ in range(5):
        code, out, _ = dry_run(capsys, str(flow), "--event", str(event), "--offline", mocks=False)
        assert code == 0 and "started no run" not in out, out


def test_wrong_input_exits_2_before_anything_runs(capsys, release, tmp_path):
    code, _, err = dry_run(capsys, str(release), "--event", str(MERGED), "--approve", "nosuchstep", mocks=False)
    assert code == 2 and "no step 'nosuchstep'" in err and "build, deploy, announce" in err
    code, _, err = dry_run(capsys, str(release), "--event", str(MERGED), "--mock", "ci.example.com=x.json",
                           mocks=False)
    assert code == 2 and "must start with http" in err
    code, _, err = dry_run(capsys, str(release), "--event", str(tmp_path / "missing.json"), mocks=False)
    assert code == 2 and "missing.json" in err
    code, _, err = dry_run(capsys, str(release), "--event", str(MERGED), "--secret", "9LIVES=x", mocks=False)
    assert code == 2 and "9LIVES" in err
    broken = write_workflow(tmp_path, "broken", "name: broken\non: github\nsteps:\n  - id: a\n    uses: nope.nope\n")
    code, _, err = dry_run(capsys, str(broken), "--event", str(MERGED), mocks=False)
    assert code == 2 and f"{broken}:5" in err and "unknown action" in err
    # What only the bot can refuse is wrong input too: a parameter the workflow does not have, a body the
    # door does not take.
    code, out, _ = dry_run(capsys, str(release), "--event", str(MERGED), "--param", "nosuch=1", tmp=tmp_path)
    assert code == 2 and "/relay enable was refused" in out and "no parameter `nosuch`" in out
    hook = write_workflow(tmp_path, "hook", "name: hook\non: webhook\n")
    not_json = tmp_path / "notes.txt"
    not_json.write_text("this is { not JSON")
    code, out, _ = dry_run(capsys, str(hook), "--event", str(not_json), mocks=False)
    assert code == 2 and "the webhook door answered HTTP 400" in out


async def test_real_outbound_http_and_the_secret_reach_the_target(release, tmp_path, target):
    """As CI would run it: the installed command, real HTTP to a local service, the secret decrypted for it."""
    target.queue("/builds", Reply(body={"id": 77}))
    text = release.read_text().replace("https://ci.example.com", target.url).replace(
        "https://deploy.example.com", target.url)
    release.write_text(text)
    env = {**os.environ, "RELAYBOT_HTTP_ALLOW": "127.0.0.1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "test", str(release), "--event", str(MERGED), "--approve", "deploy",
        "--secret", "CI_TOKEN=real-ci-token", cwd=str(tmp_path), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    out = stdout.decode()
    assert process.returncode == 0, out + stderr.decode()
    [build] = target.requests_to("/builds")
    assert build.headers["Authorization"] == "Bearer real-ci-token"
    assert build.headers["Idempotency-Key"].endswith(":build")
    [deploy] = target.requests_to("/deploys")
    assert deploy.json() == {"build": 77, "env": "staging"}
    assert f"POST {target.url}/deploys → 200" in out and "(mocked)" not in out
    assert "real-ci-token" not in out


def test_a_tool_that_makes_its_own_secret_gets_it_pasted_into_the_form(capsys, tmp_path):
    """PagerDuty generates the signing secret: the dry run pastes the emulated PagerDuty's into set-secret."""
    flow = write_workflow(tmp_path, "incident", """
        name: incident
        on:
          pagerduty: {events: [incident.triggered]}
        steps:
          - id: say
            uses: slack.post
            with: {text: "incident ${{ event.event.data.number }} is ${{ event.event.data.status }}", thread: true}
        """)
    event = EXAMPLES / "pagerduty" / "incident.triggered.json"
    code, out, err = dry_run(capsys, str(flow), "--event", str(event), "--offline", mocks=False)
    assert code == 0, out + err
    thread = " ".join(section(out, "Thread"))
    assert "started by a pagerduty event `incident.triggered`" in thread
    assert "incident 4217 is triggered" in thread

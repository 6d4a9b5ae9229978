"""The command line as a user meets it: configuration errors are one line that names the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def relaybot(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("SLACK_", "RELAYBOT_", "PORT"))}
    return subprocess.run([sys.executable, "-m", "bot", *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "SLACK_SIGNING_SECRET is required"),
    ({"SLACK_SIGNING_SECRET": "s"}, "SLACK_BOT_TOKEN is required"),
    ({"SLACK_SIGNING_SECRET": "s", "SLACK_BOT_TOKEN": "xoxp-user-token"}, "SLACK_BOT_TOKEN must be a bot token"),
    ({"SLACK_SIGNING_SECRET": "s", "SLACK_BOT_TOKEN": "xoxb-1", "PORT": "eighty"}, "PORT:"),
    ({"SLACK_SIGNING_SECRET": "s", "SLACK_BOT_TOKEN": "xoxb-1", "RELAYBOT_MAX_BODY": "lots"},
     "RELAYBOT_MAX_BODY: not a size"),
    ({"SLACK_SIGNING_SECRET": "s", "SLACK_BOT_TOKEN": "xoxb-1", "SLACK_API_URL": "slack.com/api"},
     "SLACK_API_URL: must be an http(s) URL"),
    ({"SLACK_SIGNING_SECRET": "s", "SLACK_BOT_TOKEN": "xoxb-1", "SLACK_CLIENT_ID": "1.2"},
     "SLACK_CLIENT_SECRET is required"),
    ({"SLACK_BOT_TOKEN": "xoxb-1"}, "SLACK_SIGNING_SECRET is required"),
    ({"SLACK_SIGNING_SECRET": "s", "SLACK_BOT_TOKEN": "xoxb-1", "RELAYBOT_MASTER_KEYS": "not-base64!"},
     "RELAYBOT_MASTER_KEYS"),
])
def test_serve_stops_with_one_line_naming_the_variable(env, expected, tmp_path):
    result = relaybot("serve", RELAYBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/r.db",
                      RELAYBOT_WORKFLOWS_DIR=str(tmp_path), **env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("relaybot: configuration error: ") and expected in lines[0]


def test_socket_mode_needs_the_app_token_not_the_signing_secret(tmp_path):
    result = relaybot("serve", "--socket-mode", SLACK_BOT_TOKEN="xoxb-1",
                      RELAYBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/r.db")
    assert result.returncode == 2 and "SLACK_APP_TOKEN is required" in result.stderr


def test_broken_workflows_stop_serve_with_every_problem(tmp_path):
    (tmp_path / "bad.yml").write_text("name: bad\non: webhook\nsteps:\n  - {id: a, uses: nope.x}\n")
    result = relaybot("serve", SLACK_SIGNING_SECRET="s", SLACK_BOT_TOKEN="xoxb-1",
                      RELAYBOT_WORKFLOWS_DIR=str(tmp_path), RELAYBOT_MASTER_KEY_FILE=str(tmp_path / "k"),
                      RELAYBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/r.db")
    assert result.returncode == 2
    assert f"{tmp_path / 'bad.yml'}:4: unknown action 'nope.x'" in result.stderr

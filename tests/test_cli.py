"""The command line as a user meets it: configuration errors are one line that names the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import MASTER_KEY


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
    ({"SLACK_SIGNING_SECRET": "s", "SLACK_BOT_TOKEN": "xoxb-1", "RELAYBOT_LOG_LEVEL": "LOUD"},
     "RELAYBOT_LOG_LEVEL: not a log level (one of DEBUG, INFO, WARNING, ERROR, CRITICAL)"),
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


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://relaybot:hunter2@127.0.0.1:1/relaybot",  # nothing listens on port 1
     "cannot open the database postgresql+asyncpg://relaybot:***@127.0.0.1:1/relaybot (RELAYBOT_DATABASE_URL): "
     "ConnectionRefusedError"),
    ("sqlite:///{tmp}/no/such/directory/r.db",
     "cannot open the database sqlite+aiosqlite:///{tmp}/no/such/directory/r.db (RELAYBOT_DATABASE_URL): "
     "OperationalError: unable to open database file"),
    ("mysql://relaybot@127.0.0.1/relaybot", "RELAYBOT_DATABASE_URL: relaybot runs on SQLite or PostgreSQL"),
])
def test_a_database_that_cannot_be_used_stops_serve_with_one_line(url, expected, tmp_path):
    result = relaybot("serve", SLACK_SIGNING_SECRET="s", SLACK_BOT_TOKEN="xoxb-1", PORT="0",
                      RELAYBOT_WORKFLOWS_DIR=str(tmp_path), RELAYBOT_MASTER_KEYS=MASTER_KEY,
                      RELAYBOT_DATABASE_URL=url.format(tmp=tmp_path))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # no traceback, no "serving on", no password
    assert lines[0].startswith("relaybot: configuration error: ") and expected.format(tmp=tmp_path) in lines[0]
    assert "hunter2" not in result.stderr


def test_a_port_in_use_stops_serve_with_one_line_and_no_traceback(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = relaybot("serve", SLACK_SIGNING_SECRET="s", SLACK_BOT_TOKEN="xoxb-1", PORT=str(port),
                          RELAYBOT_HOST="127.0.0.1", RELAYBOT_WORKFLOWS_DIR=str(tmp_path),
                          RELAYBOT_MASTER_KEYS=MASTER_KEY, RELAYBOT_DATABASE_URL=f"sqlite:///{tmp_path}/r.db")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "serving on" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"relaybot: configuration error: cannot listen on 127.0.0.1:{port}: Address already in use (PORT or "
        "--port chooses another port, RELAYBOT_HOST another address)")


def test_the_database_url_may_be_written_the_way_other_tools_write_it():
    from bot.settings import load_settings

    def url(value: str) -> str:
        return load_settings(database_url=value).database_url

    assert url("postgres://u:p@db/relaybot") == "postgresql+asyncpg://u:p@db/relaybot"
    assert url("postgresql://u:p@db/relaybot") == "postgresql+asyncpg://u:p@db/relaybot"
    assert url("postgresql+asyncpg://u:p@db/relaybot") == "postgresql+asyncpg://u:p@db/relaybot"
    assert url("sqlite:///relaybot.db") == "sqlite+aiosqlite:///relaybot.db"
    assert url("sqlite+aiosqlite:////var/lib/relaybot/r.db") == "sqlite+aiosqlite:////var/lib/relaybot/r.db"


def test_events_retry_says_what_it_needs(tmp_path):
    database = {"RELAYBOT_DATABASE_URL": f"sqlite:///{tmp_path}/r.db"}
    result = relaybot("events", "retry", **database)
    assert result.returncode == 2
    assert "name the events (EVENT_ID …) or --all; `relaybot events list` shows them" in result.stderr
    result = relaybot("events", "retry", "7", "--all", **database)
    assert result.returncode == 2 and "or --all; not both" in result.stderr


def test_a_bad_port_option_or_an_unreadable_key_file_stops_serve_with_one_line(tmp_path):
    """`--port 70000` skipped the port check (the bot started, then died in bind with a traceback), and a master
    key file that is a directory (or was given as an empty RELAYBOT_MASTER_KEY_FILE=) raised a traceback."""
    base = {"SLACK_SIGNING_SECRET": "s", "SLACK_BOT_TOKEN": "xoxb-1", "RELAYBOT_WORKFLOWS_DIR": str(tmp_path),
            "RELAYBOT_DATABASE_URL": f"sqlite:///{tmp_path}/r.db"}
    port = relaybot("serve", "--port", "70000", **base, RELAYBOT_MASTER_KEYS=MASTER_KEY)
    assert port.returncode == 2 and "Traceback" not in port.stderr, port.stderr
    assert port.stderr.strip().splitlines()[-1] == \
        "relaybot: configuration error: --port: 70000 is not a port (0-65535)"
    (tmp_path / "keys").mkdir()
    directory = relaybot("serve", "--port", "0", **base, RELAYBOT_MASTER_KEY_FILE=str(tmp_path / "keys"))
    assert directory.returncode == 2 and "Traceback" not in directory.stderr, directory.stderr
    assert f"RELAYBOT_MASTER_KEY_FILE: cannot read {tmp_path / 'keys'}: Is a directory" in directory.stderr
    empty = relaybot("serve", "--port", "70000", **base, RELAYBOT_MASTER_KEY_FILE="")
    assert "RELAYBOT_MASTER_KEY_FILE" not in empty.stderr and "--port: 70000" in empty.stderr, empty.stderr

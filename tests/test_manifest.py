"""manifest.yml is a valid Slack app manifest and declares what the code uses."""

from __future__ import annotations

import json

import jsonschema
import yaml

from tests.conftest import CORPORA, ROOT


def manifest() -> dict:
    return yaml.safe_load((ROOT / "manifest.yml").read_text())


def test_manifest_is_valid_against_slacks_schema():
    schema = json.loads((CORPORA / "slack/manifest.schema.1.0.0.json").read_text())
    jsonschema.validate(manifest(), schema, cls=jsonschema.Draft7Validator)


def test_manifest_points_every_request_at_the_bot():
    data = manifest()
    assert [command["command"] for command in data["features"]["slash_commands"]] == ["/relay"]
    urls = {data["settings"]["interactivity"]["request_url"], data["settings"]["event_subscriptions"]["request_url"],
            data["features"]["slash_commands"][0]["url"]}
    assert {url.rsplit("/", 2)[-2:][0] + "/" + url.rsplit("/", 1)[-1] for url in urls} == {"slack/events"}
    assert data["oauth_config"]["redirect_urls"][0].endswith("/slack/oauth_redirect")


# The Slack Web API methods relaybot calls, and the bot scope each needs (https://api.slack.com/methods).
METHOD_SCOPES = {
    "chat.postMessage": "chat:write", "chat.update": "chat:write", "chat.postEphemeral": "chat:write",
    "users.info": "users:read", "usergroups.list": "usergroups:read", "usergroups.users.list": "usergroups:read",
    "conversations.info": "channels:read", "conversations.history": "channels:history",
    "conversations.replies": "channels:history", "users.conversations": "channels:read",
    "views.open": None, "views.publish": None, "views.update": None,
    "auth.test": None, "oauth.v2.access": None,
}


def called_methods() -> set[str]:
    import re

    found: set[str] = set()
    for path in (ROOT / "bot").rglob("*.py"):
        if "emulator" in path.parts:
            continue
        found |= set(re.findall(r'"((?:chat|users|usergroups|conversations|views)\.[A-Za-z.]+)"', path.read_text()))
    return found


def test_manifest_declares_exactly_the_scopes_the_code_needs():
    methods = called_methods()
    unknown = methods - set(METHOD_SCOPES)
    assert not unknown, f"add these methods and their scopes to METHOD_SCOPES: {unknown}"
    needed = {METHOD_SCOPES[method] for method in methods if METHOD_SCOPES[method]}
    needed |= {"commands"}  # the slash command
    if {"conversations.info", "users.conversations"} & methods:
        needed.add("groups:read")  # the same, on private channels
    if {"conversations.history", "conversations.replies"} & methods:
        needed.add("groups:history")  # the same, in private channels
    declared = set(manifest()["oauth_config"]["scopes"]["bot"])
    assert declared == needed


def test_oauth_install_asks_for_the_manifest_scopes():
    from bot.slack.listeners import OAUTH_SCOPES

    assert set(OAUTH_SCOPES) == set(manifest()["oauth_config"]["scopes"]["bot"])


def test_manifest_subscribes_to_the_events_the_code_handles():
    import re

    listeners = (ROOT / "bot" / "slack" / "listeners.py").read_text()
    handled = set(re.findall(r'@app\.event\("([a-z_]+)"\)', listeners))
    assert set(manifest()["settings"]["event_subscriptions"]["bot_events"]) == handled

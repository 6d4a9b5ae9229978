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

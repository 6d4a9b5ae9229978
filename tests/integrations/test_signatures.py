"""Webhook verification of every integration: the published vectors, and properties that must hold for any
body and secret (a correct signature verifies; one changed byte, no secret or no header is rejected)."""

from __future__ import annotations

import base64
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from integrations.alertmanager import Alertmanager
from integrations.base import IncomingWebhook
from integrations.github import GitHub
from integrations.gitlab import GitLab
from integrations.pagerduty import PagerDuty
from tests.conftest import CORPORA, github_headers
from tests.integrations.conftest import alertmanager_headers, pagerduty_headers, pagerduty_signature

VECTORS = json.loads((CORPORA / "signature-vectors.json").read_text())
NOW = 1_700_000_000.0

secrets = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64)
bodies = st.binary(min_size=1, max_size=512)


def incoming(body: bytes, headers: dict[str, str]) -> IncomingWebhook:
    return IncomingWebhook(body=body, headers=CIMultiDict(headers))


def flip(data: bytes, index: int) -> bytes:
    index %= len(data)
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


def flip_text(text: str, index: int) -> str:
    """One character of a signature changed into another valid hex (or base64) character."""
    index %= len(text)
    replacement = "0" if text[index] != "0" else "1"
    return text[:index] + replacement + text[index + 1:]


# ------------------------------------------------------------------------------------------ published vectors


def test_github_published_vector_verifies():
    vector = VECTORS["github"]
    request = incoming(vector["body"].encode(), {vector["header"]: vector["signature"]})
    assert GitHub().verify(secret=vector["secret"], request=request, now=NOW)
    assert not GitHub().verify(secret=vector["secret"] + "x", request=request, now=NOW)


def test_pagerduty_published_vector_verifies_and_its_mismatch_does_not():
    vector = VECTORS["pagerduty"]
    body = vector["body"].encode()
    assert PagerDuty().verify(secret=vector["secret"], request=incoming(body, {vector["header"]: vector["signature"]}),
                              now=NOW)
    mismatch = incoming(body, {vector["header"]: vector["mismatch_signature"]})
    assert not PagerDuty().verify(secret=vector["secret"], request=mismatch, now=NOW)


def test_pagerduty_accepts_any_of_several_signatures_during_rotation():
    vector = VECTORS["pagerduty"]
    body = vector["body"].encode()
    for header in (f"{vector['mismatch_signature']},{vector['signature']}",
                   f"{vector['signature']}, {vector['mismatch_signature']}",
                   f"v1=deadbeef,{vector['mismatch_signature']},{vector['signature']}"):
        assert PagerDuty().verify(secret=vector["secret"], request=incoming(body, {vector["header"]: header}),
                                  now=NOW), header
    assert not PagerDuty().verify(secret=vector["secret"], now=NOW, request=incoming(
        body, {vector["header"]: f"{vector['mismatch_signature']},v1=00"}))


def test_our_signers_agree_with_the_published_vectors():
    github, pagerduty = VECTORS["github"], VECTORS["pagerduty"]
    signed = github_headers(github["secret"], github["body"].encode(), event="ping", delivery="d")
    assert signed["X-Hub-Signature-256"] == github["signature"]
    assert pagerduty_signature(pagerduty["secret"], pagerduty["body"].encode()) == pagerduty["signature"]


# ------------------------------------------------------------------------------------------ properties


@settings(max_examples=60, deadline=None)
@given(secret=secrets, body=bodies, index=st.integers(min_value=0))
def test_github_signature_properties(secret, body, index):
    headers = github_headers(secret, body, event="push", delivery="d")
    assert GitHub().verify(secret=secret, request=incoming(body, headers), now=NOW)
    assert not GitHub().verify(secret=secret, request=incoming(flip(body, index), headers), now=NOW)
    signature = headers["X-Hub-Signature-256"]
    prefix = len("sha256=")
    tampered = signature[:prefix] + flip_text(signature[prefix:], index)
    assert not GitHub().verify(secret=secret, request=incoming(body, {**headers, "X-Hub-Signature-256": tampered}),
                               now=NOW)
    assert not GitHub().verify(secret="", request=incoming(body, headers), now=NOW)
    assert not GitHub().verify(secret=secret, request=incoming(body, {"X-GitHub-Event": "push"}), now=NOW)


@settings(max_examples=60, deadline=None)
@given(secret=secrets, body=bodies, index=st.integers(min_value=0), other=secrets)
def test_pagerduty_signature_properties(secret, body, index, other):
    headers = pagerduty_headers(secret, body)
    assert PagerDuty().verify(secret=secret, request=incoming(body, headers), now=NOW)
    # A rotation: the old secret's signature first, ours second.
    rotated = pagerduty_headers(secret, body, extra_signatures=(pagerduty_signature(other, body),))
    assert PagerDuty().verify(secret=secret, request=incoming(body, rotated), now=NOW)
    assert not PagerDuty().verify(secret=secret, request=incoming(flip(body, index), headers), now=NOW)
    signature = headers["X-PagerDuty-Signature"]
    tampered = "v1=" + flip_text(signature[3:], index)
    assert not PagerDuty().verify(secret=secret, now=NOW,
                                  request=incoming(body, {**headers, "X-PagerDuty-Signature": tampered}))
    assert not PagerDuty().verify(secret="", request=incoming(body, headers), now=NOW)
    headers.pop("X-PagerDuty-Signature")
    assert not PagerDuty().verify(secret=secret, request=incoming(body, headers), now=NOW)


@settings(max_examples=60, deadline=None)
@given(secret=secrets, index=st.integers(min_value=0))
def test_gitlab_token_properties(secret, index):
    body = b'{"object_kind": "push"}'
    assert GitLab().verify(secret=secret, request=incoming(body, {"X-Gitlab-Token": secret}), now=NOW)
    wrong = flip_text(secret, index)
    if wrong != secret:
        assert not GitLab().verify(secret=secret, request=incoming(body, {"X-Gitlab-Token": wrong}), now=NOW)
    assert not GitLab().verify(secret=secret, request=incoming(body, {"X-Gitlab-Token": secret + "x"}), now=NOW)
    assert not GitLab().verify(secret="", request=incoming(body, {"X-Gitlab-Token": ""}), now=NOW)
    assert not GitLab().verify(secret=secret, request=incoming(body, {}), now=NOW)


@settings(max_examples=60, deadline=None)
@given(secret=secrets, index=st.integers(min_value=0))
def test_alertmanager_bearer_and_basic_properties(secret, index):
    body = b'{"status": "firing", "alerts": []}'
    alertmanager = Alertmanager()
    for basic in (False, True):
        assert alertmanager.verify(secret=secret, request=incoming(body, alertmanager_headers(secret, basic=basic)),
                                   now=NOW)
        wrong = flip_text(secret, index)
        if wrong != secret:
            assert not alertmanager.verify(secret=secret, now=NOW,
                                           request=incoming(body, alertmanager_headers(wrong, basic=basic)))
        assert not alertmanager.verify(secret="", request=incoming(body, alertmanager_headers("", basic=basic)),
                                       now=NOW)
    other_user = "Basic " + base64.b64encode(f"admin:{secret}".encode()).decode()
    assert not alertmanager.verify(secret=secret, request=incoming(body, {"Authorization": other_user}), now=NOW)
    assert not alertmanager.verify(secret=secret, request=incoming(body, {}), now=NOW)


def test_alertmanager_rejects_malformed_basic_auth():
    body = b"{}"
    for header in ("Basic", "Basic !!!not-base64", "Basic " + base64.b64encode(b"no-colon").decode(),
                   "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Token abc"):
        assert not Alertmanager().verify(secret="s3cret", request=incoming(body, {"Authorization": header}), now=NOW)


def test_generic_webhook_takes_any_one_valid_scheme_of_those_it_carries():
    """A relay forwarding GitHub's own signature (made with GitHub's secret) and adding relaybot's bearer token
    was refused: the signature header present was the only scheme tried."""
    from integrations.webhook import Webhook

    body, secret = b'{"summary": "relayed"}', "whsec-generic-1"
    forwarded = {"X-Hub-Signature-256": "sha256=" + "0" * 64, "webhook-signature": "v1,AAAA", "webhook-id": "m1",
                 "webhook-timestamp": "1700000000"}
    assert Webhook().verify(secret=secret, request=incoming(body, {**forwarded, "Authorization": f"Bearer {secret}"}),
                            now=1700000000)
    assert not Webhook().verify(secret=secret, request=incoming(body, {**forwarded, "Authorization": "Bearer nope"}),
                                now=1700000000)
    assert not Webhook().verify(secret=secret, request=incoming(body, forwarded), now=1700000000)
    assert not Webhook().verify(secret=secret, request=incoming(body, {}), now=1700000000)

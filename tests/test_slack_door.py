"""`POST /slack/events`: only Slack's signed requests get through, and nothing a sender makes up gives a 500."""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import urlencode

from bot.emulator.webapi import sign
from tests.conftest import ADMIN, CHANNEL, TEAM

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def command_body(text: str = "help") -> bytes:
    return urlencode({"team_id": TEAM, "channel_id": CHANNEL, "user_id": ADMIN, "command": "/relay",
                      "text": text, "response_url": "http://127.0.0.1:9/unused", "trigger_id": "t1"}).encode()


async def test_requests_slack_did_not_sign_or_cannot_have_sent_are_refused(make_bot, slack, caplog):
    bot = await make_bot()
    body, now = command_body(), str(int(time.time()))

    def signed(data: bytes) -> dict[str, str]:
        return sign(slack.signing_secret, data)

    cases: list[tuple[str, bytes, dict[str, str], int]] = [
        ("unsigned", body, FORM, 401),
        ("an hour old", body, {**FORM, **sign(slack.signing_secret, body, int(time.time()) - 3600)}, 401),
        ("another secret", body, {**FORM, **sign("not-the-secret", body)}, 401),
        ("a timestamp that is no number", body, {**FORM, "X-Slack-Request-Timestamp": "abc",
                                                 "X-Slack-Signature": "v0=" + "0" * 64}, 401),
        ("a 400-digit timestamp", body, {**FORM, "X-Slack-Request-Timestamp": "1" + "0" * 400,
                                         "X-Slack-Signature": "v0=" + "0" * 64}, 401),
        ("a fractional timestamp", body, {**FORM, "X-Slack-Request-Timestamp": "1.5",
                                          "X-Slack-Signature": "v0=" + "0" * 64}, 401),
        ("a signature that is not ASCII", body, {**FORM, "X-Slack-Request-Timestamp": now,
                                                 "X-Slack-Signature": "v0=\u00e9"}, 401),
        ("a body that is not UTF-8", b"text=\xff\xfe", {**FORM, **signed(b"text=\xff\xfe")}, 400),
        ("an unknown charset", body, {"Content-Type": "application/x-www-form-urlencoded; charset=klingon",
                                      **signed(body)}, 400),
        ("JSON that does not parse", b"{not json", {"Content-Type": "application/json", **signed(b"{not json")},
         400),
        ("JSON that is a list", b"[1, 2]", {"Content-Type": "application/json", **signed(b"[1, 2]")}, 400),
        ("a payload that does not parse", b"payload=%7Bnope", {**FORM, **signed(b"payload=%7Bnope")}, 400),
        ("a payload that is a list", b"payload=%5B%5D", {**FORM, **signed(b"payload=%5B%5D")}, 400),
        ("unsigned url_verification", json.dumps({"type": "url_verification", "challenge": "c"}).encode(),
         {"Content-Type": "application/json"}, 401),
    ]
    with caplog.at_level(logging.ERROR):
        for name, data, headers, expected in cases:
            async with bot.http().post(f"{bot.url}/slack/events", data=data, headers=headers) as response:
                assert response.status == expected, name
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
    async with bot.http().post(f"{bot.url}/slack/events", data=body, headers={**FORM, **signed(body)}) as response:
        assert response.status == 200  # and Slack's own request still gets through

"""`POST /hooks/<connection>`: verification schemes, refusals, limits, and what is stored."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from bot.engine.pacing import DoorFirst
from bot.hooks import content_deliveries
from bot.store.models import Event
from integrations.base import IncomingWebhook
from integrations.webhook import Webhook, standard_webhooks_signature
from tests.conftest import BOTH_DATABASES, CORPORA, block_texts, connection_from, github_headers, write_workflow

CATCH_ALL = """
name: catch
on: {webhook: {}, github: {}}
steps: []
"""


async def connected(make_bot, workflows, integration="webhook", **env):
    write_workflow(workflows, "catch", CATCH_ALL)
    bot = await make_bot(**env)
    url, secret = connection_from(await bot.command("enable catch"), integration)
    return bot, url, secret


async def stored_events(bot) -> int:
    async with bot.services.db.read() as session:
        return await session.scalar(select(func.count()).select_from(Event))


async def test_three_verification_schemes_are_accepted(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows)
    body = b'{"summary": "hello"}'
    stamp = str(int(time.time()))
    signature = standard_webhooks_signature(secret=secret, msg_id="msg_1", timestamp=stamp, body=body)
    assert (await bot.post(url, body, {"webhook-id": "msg_1", "webhook-timestamp": stamp,
                                       "webhook-signature": f"v1,bogus {signature}"}))[0] == 202
    hub = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert (await bot.post(url, body, {"X-Hub-Signature-256": hub, "X-Request-Id": "r2"}))[0] == 202
    assert (await bot.post(url, body, {"Authorization": f"Bearer {secret}", "X-Request-Id": "r3"}))[0] == 202
    assert await stored_events(bot) == 3


async def test_bad_or_missing_signature_is_401_and_stores_nothing(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows)
    body = b'{"summary": "hello"}'
    stamp = str(int(time.time()))
    old = str(int(time.time()) - 600)
    cases = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {secret}"},
        {"X-Hub-Signature-256": "sha256=" + "0" * 64},
        {"X-Hub-Signature-256": "sha256=" + hmac.new(b"other", body, hashlib.sha256).hexdigest()},
        {"webhook-id": "m", "webhook-timestamp": stamp, "webhook-signature": "v1,AAAA"},
        {"webhook-id": "m", "webhook-timestamp": old,
         "webhook-signature": standard_webhooks_signature(secret=secret, msg_id="m", timestamp=old, body=body)},
        # not a time: a 400-digit number once overflowed the comparison (500); `int()` also reads these
        {"webhook-id": "m", "webhook-timestamp": "1" + "0" * 400, "webhook-signature": "v1,AAAA"},
        {"webhook-id": "m", "webhook-timestamp": f"+{stamp}",
         "webhook-signature": standard_webhooks_signature(secret=secret, msg_id="m", timestamp=f"+{stamp}",
                                                          body=body)},
        {"webhook-id": "m", "webhook-timestamp": f"{stamp[:5]}_{stamp[5:]}",
         "webhook-signature": standard_webhooks_signature(secret=secret, msg_id="m",
                                                          timestamp=f"{stamp[:5]}_{stamp[5:]}", body=body)},
    ]
    for headers in cases:
        status, answer = await bot.post(url, body, headers)
        assert status == 401, headers
        assert answer == {"ok": False, "error": "bad or missing signature"}
    assert await stored_events(bot) == 0


@BOTH_DATABASES
async def test_limits_and_malformed_bodies(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows, max_body=1024)
    auth = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    status, _ = await bot.post(url, b'{"x": "' + b"a" * 2000 + b'"}', auth)
    assert status == 413
    status, answer = await bot.post(url, b'{"x": ', auth)
    assert status == 400 and "not valid JSON" in answer["error"]
    status, _ = await bot.post(url.rsplit("/", 1)[0] + "/c_unknown", b"{}", auth)
    assert status == 404
    for odd in ("c%00x", "c_%C3%A9", "c_" + "a" * 200):  # PostgreSQL refused to compare the NUL (500)
        status, _ = await bot.post(url.rsplit("/", 1)[0] + "/" + odd, b"{}", auth)
        assert status == 404, odd
    assert await stored_events(bot) == 0


async def test_form_bodies_are_accepted(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows)
    status, _ = await bot.post(url, b"text=deploy&env=prod", {"Authorization": f"Bearer {secret}",
                                                             "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 202
    async with bot.services.db.read() as session:
        event = (await session.execute(select(Event))).scalar_one()
    assert event.payload == {"text": "deploy", "env": "prod"}


async def test_github_signature_and_ping(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows, integration="github")
    body = (CORPORA / "github/ping/payload.json").read_bytes()
    status, _ = await bot.post(url, body, github_headers(secret, body, event="ping", delivery="p1"))
    assert status == 200  # SPEC: a ping is answered 200
    tampered = body.replace(b"Codertocat", b"Codertocaf", 1)
    status, _ = await bot.post(url, tampered, github_headers(secret, body, event="ping", delivery="p2"))
    assert status == 401
    await bot.settle()
    assert bot.cards() == []  # a ping starts nothing unless a workflow names it


async def test_the_published_github_vector_verifies():
    vectors = json.loads((CORPORA / "signature-vectors.json").read_text())["github"]
    from integrations.github import GitHub

    request = IncomingWebhook(body=vectors["body"].encode(), headers={vectors["header"]: vectors["signature"]})
    assert GitHub().verify(secret=vectors["secret"], request=request, now=time.time())
    assert not GitHub().verify(secret="", request=request, now=time.time())


@settings(max_examples=200, deadline=None)
@given(secret=st.text(min_size=1, max_size=40), body=st.binary(max_size=200), flip=st.integers(min_value=0))
def test_standard_webhooks_signature_round_trip_and_any_change_fails(secret, body, flip):
    stamp = str(int(time.time()))
    signature = standard_webhooks_signature(secret=secret, msg_id="id", timestamp=stamp, body=body)
    headers = {"webhook-id": "id", "webhook-timestamp": stamp, "webhook-signature": signature}
    assert Webhook().verify(secret=secret, request=IncomingWebhook(body=body, headers=headers), now=time.time())
    if body:
        index = flip % len(body)
        changed = body[:index] + bytes([body[index] ^ 1]) + body[index + 1:]
        assert not Webhook().verify(secret=secret, request=IncomingWebhook(body=changed, headers=headers),
                                    now=time.time())
    assert not Webhook().verify(secret="", request=IncomingWebhook(body=body, headers=headers), now=time.time())


def test_whsec_secrets_use_their_decoded_key():
    key = b"0123456789abcdef0123456789abcdef"
    secret = "whsec_" + base64.b64encode(key).decode()
    expected = base64.b64encode(hmac.new(key, b"i.1.{}", hashlib.sha256).digest()).decode()
    assert standard_webhooks_signature(secret=secret, msg_id="i", timestamp="1", body=b"{}") == "v1," + expected


async def test_a_run_without_steps_posts_its_card_and_one_reply_saying_it_started_and_ended(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows)
    status, _ = await bot.post(url, b'{"summary": "deploy done"}',
                               {"Authorization": f"Bearer {secret}", "X-Request-Id": "one-reply"})
    assert status == 202
    card = await bot.wait_card()
    await bot.settle()
    assert bot.cards() == [card]
    assert "succeeded" in block_texts(card)
    [reply] = bot.thread_texts(card)
    started, finished = reply.split("\n")
    assert started.startswith(":arrow_forward: Run `R") and "delivery `one-reply`" in started
    assert finished.startswith(":checkered_flag: Run succeeded: no steps;")
    assert not bot.slack.calls_of("chat.update")  # the card showed the end when it was first posted


async def test_door_first_rests_the_engine_only_while_requests_pile_up():
    door = DoorFirst(busy_at=3, rest_factor=2.0, longest_rest=0.05)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await door.rest_after(1.0)  # nobody waiting: no rest
    assert loop.time() - began < 0.02
    for _ in range(3):
        door.entered()
    assert door.busy
    began = loop.time()
    await door.rest_after(0.01)  # twice the batch's 10 ms
    assert 0.02 - 0.002 <= loop.time() - began < 0.05
    began = loop.time()
    await door.rest_after(10.0)  # never longer than longest_rest
    assert 0.05 - 0.002 <= loop.time() - began < 0.5
    door.left()
    assert not door.busy


async def test_the_door_counts_requests_in_flight_back_to_zero_whatever_the_answer(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows, max_body=1024)
    door_first = bot.services.engine.door
    answers = await asyncio.gather(
        bot.post(url, b'{"a": 1}', {"Authorization": f"Bearer {secret}"}),
        bot.post(url, b'{"a": 1}', {"Authorization": "Bearer wrong"}),
        bot.post(url, b"x" * 2048, {"Authorization": f"Bearer {secret}"}),
        bot.post(url.rsplit("/", 1)[0] + "/nope", b"{}", {}),
    )
    assert [status for status, _ in answers] == [202, 401, 413, 404]
    assert door_first.waiting == 0


async def test_a_body_that_stalls_is_408_and_never_counts_as_waiting_at_the_door(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows, body_timeout=0.5)
    door_first = bot.services.engine.door
    host, port = url.split("/")[2].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    path = "/" + url.split("/", 3)[3]
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {secret}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"half\": ".encode())
    await writer.drain()
    await asyncio.sleep(0.2)
    assert door_first.waiting == 0  # still sending: the engine is not made to rest for it
    answer = await asyncio.wait_for(reader.read(1000), timeout=5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
    assert door_first.waiting == 0 and await stored_events(bot) == 0
    # A body that arrives in time, in pieces, is taken as usual.
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"summary": "slow but in time"}'
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {secret}\r\nConnection: close\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(body[10:])
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 202") and await stored_events(bot) == 1


async def test_while_the_door_is_busy_the_engine_rests_but_still_starts_every_run(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows)
    bot.services.engine.door.busy_at = 0  # as if a burst never ended
    for n in range(5):
        status, _ = await bot.post(url, json.dumps({"n": n}).encode(),
                                   {"Authorization": f"Bearer {secret}", "X-Request-Id": f"busy-{n}"})
        assert status == 202
    await bot.slack.wait_for(lambda: len(bot.cards()) == 5, timeout=10)


async def test_the_inbox_depth_and_the_backlog_limit(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows, max_backlog=3)
    engine, door_first = bot.services.engine, bot.services.engine.door
    await engine.stop()  # events pile up in the inbox
    for n in range(4):
        status, _ = await bot.post(url, json.dumps({"n": n}).encode(),
                                   {"Authorization": f"Bearer {secret}", "X-Request-Id": f"backlog-{n}"})
        assert status == 202  # nobody has counted the backlog yet
    async with bot.http().get(f"{bot.url}/metrics") as response:
        assert "relaybot_inbox_depth 4.0" in await response.text()
    await engine._count_backlog(full_batch=True)
    assert door_first.backlog == 3 and door_first.full  # counted up to the limit
    async with bot.http().post(url, data=b'{"n": 5}', headers={"Authorization": f"Bearer {secret}"}) as response:
        assert response.status == 503 and response.headers["Retry-After"] == "30"
        assert "too many events are waiting" in (await response.json())["error"]
    await engine._count_backlog(full_batch=True)  # counted at most once a second
    assert door_first.backlog == 3
    await engine.start()
    await bot.slack.wait_for(lambda: len(bot.cards()) == 4, timeout=10)
    await bot.slack.wait_for(lambda: not door_first.full, timeout=5)  # the next batch took everything
    status, _ = await bot.post(url, b'{"n": 6}', {"Authorization": f"Bearer {secret}", "X-Request-Id": "after"})
    assert status == 202
    async with bot.http().get(f"{bot.url}/metrics") as response:
        metrics = await response.text()
    assert 'relaybot_events_rejected_total{reason="backlog",source="unknown"} 1.0' in metrics


def test_a_content_hash_is_stored_with_its_slice_of_time_and_looked_up_in_that_slice_and_the_one_before():
    assert content_deliveries("am-1", 300.0, 600.0) == ("am-1@2", "am-1@1", "am-1@3")
    assert content_deliveries("am-1", 300.0, 899.9) == ("am-1@2", "am-1@1", "am-1@3")  # the same slice: the same id
    assert content_deliveries("am-1", 300.0, 900.0) == ("am-1@3", "am-1@2", "am-1@4")  # the next: the last is looked at


async def test_bodies_that_cannot_be_read_are_400_not_500(make_bot, workflows):
    bot, url, secret = await connected(make_bot, workflows)
    auth = {"Authorization": f"Bearer {secret}"}
    cases = {
        "not gzip": (b"notgzip", {"Content-Encoding": "gzip"}, "not valid gzip data"),
        "not deflate": (b"xx", {"Content-Encoding": "deflate"}, "not valid deflate data"),
        "not UTF-8": (b'{"a":"\xff"}', {"Content-Type": "application/json"}, "not valid utf-8 text"),
        "unknown charset": (b'{"a":1}', {"Content-Type": "application/json; charset=klingon"}, "charset"),
        "nested too deeply": (b"[" * 1100 + b"]" * 1100, {}, "nested too deeply"),
        "a number too long": (b'{"a":' + b"7" * 5000 + b"}", {}, "not valid JSON"),
    }
    for name, (body, headers, expected) in cases.items():
        status, answer = await bot.post(url, body, {**auth, **headers, "X-Request-Id": name})
        assert (status, expected in answer.get("error", "")) == (400, True), (name, status, answer)
    # Before the connection is even looked up: an unknown connection with a body that does not decompress.
    assert (await bot.post(url.rsplit("/", 1)[0] + "/c_nope", b"notgzip", {"Content-Encoding": "gzip"}))[0] == 400
    latin1 = '{"summary": "café"}'.encode("latin-1")
    assert (await bot.post(url, latin1, {**auth, "Content-Type": "application/json; charset=ISO-8859-1",
                                         "X-Request-Id": "latin-1"}))[0] == 202
    # A byte order mark before the JSON (PowerShell's Out-File writes one) is ignored, as RFC 8259 allows.
    assert (await bot.post(url, b'\xef\xbb\xbf{"summary": "bom"}', {**auth, "X-Request-Id": "bom"}))[0] == 202
    assert await stored_events(bot) == 2


@BOTH_DATABASES
async def test_odd_text_in_one_event_neither_fails_the_events_stored_with_it_nor_stops_the_engine(make_bot,
                                                                                                  workflows):
    """Stored together (one transaction for the webhooks that arrive at once), turned into runs together: text a
    database refuses (NUL, a lone surrogate), over-long ids and a body that is a bare number must each become
    their own run, and leave the others alone."""
    bot, url, secret = await connected(make_bot, workflows)
    auth = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    odd = [
        (b'{"summary": "lone \\ud800 surrogate"}', {}),
        (b'{"summary": "a NUL \\u0000 here", "nested": {"k\\u0000": ["\\udfff"]}}', {}),
        (b"42", {}),
        (b'{"summary": "long id"}', {"X-Request-Id": "g" * 300}),
        (b'{"summary": "another long id"}', {"X-Request-Id": "g" * 200 + "DIFFERENT"}),
        (b'{"summary": "odd header"}', {"X-Request-Id": "id-\u00ff-\u2603"}),
    ]
    good = [(json.dumps({"summary": f"good {i}"}).encode(), {}) for i in range(6)]
    answers = await asyncio.gather(*(
        bot.post(url, body, {**auth, "X-Request-Id": f"r{i}", **headers}) for i, (body, headers) in enumerate(
            [item for pair in zip(odd, good, strict=True) for item in pair])))
    assert [status for status, _ in answers] == [202] * 12, answers
    assert not any(answer["duplicate"] for _, answer in answers)  # the two long ids stay two deliveries
    await bot.settle()
    assert len(bot.cards()) == 12
    assert await stored_events(bot) == 12


def test_a_signature_header_that_was_not_utf8_is_refused_not_an_error():
    # aiohttp hands over a header's non-UTF-8 bytes as surrogates ("\udcff" for 0xff).
    for headers in ({"Authorization": "Bearer \udcff"}, {"X-Hub-Signature-256": "sha256=\udcff"},
                    {"webhook-id": "m\udcff", "webhook-timestamp": str(int(time.time())),
                     "webhook-signature": "v1,\udcff"}):
        request = IncomingWebhook(body=b"{}", headers=headers)
        assert Webhook().verify(secret="s3cret", request=request, now=time.time()) is False


async def test_one_item_that_cannot_be_written_fails_alone_not_the_items_written_with_it():
    import asyncio

    from bot.store.batching import GroupCommit

    written: list[list[int]] = []

    async def write(items: list[int]) -> list[int]:
        await asyncio.sleep(0)
        if 13 in items:
            raise ValueError("13 cannot be stored")
        written.append(items)
        return [item * 2 for item in items]

    group: GroupCommit[int, int] = GroupCommit(write, name="test")
    results = await asyncio.gather(*(group.submit(item) for item in (1, 13, 2, 3)), return_exceptions=True)
    assert results[0] == 2 and results[2:] == [4, 6]
    assert isinstance(results[1], ValueError)
    assert sorted(item for batch in written for item in batch) == [1, 2, 3]


async def test_healthz_says_when_the_database_cannot_be_reached(make_bot, workflows, monkeypatch):
    bot = await make_bot()
    async with bot.http().get(f"{bot.url}/healthz") as response:
        assert response.status == 200
        assert (await response.json())["database"] == "ok"

    async def unreachable() -> None:
        raise ConnectionRefusedError(111, "Connect call failed")

    monkeypatch.setattr(bot.services.db, "ping", unreachable)
    async with bot.http().get(f"{bot.url}/healthz") as response:
        assert response.status == 503
        assert await response.json() == {"ok": False, "database": "unreachable: ConnectionRefusedError"}


async def test_signed_payloads_of_an_odd_shape_are_400_not_500(make_bot, workflows):
    """A signed request whose payload is not shaped as the tool's events (a test sent by hand) is refused with
    what is wrong; a link that is not text is no link."""
    bot, url, secret = await connected(make_bot, workflows, integration="github")
    opened = json.loads((CORPORA / "github/pull_request/opened.payload.json").read_text())
    for number, (event, payload) in enumerate([("pull_request", {**opened, "pull_request": "oops"}),
                                               ("push", {"ref": "refs/heads/main", "commits": 3})]):
        body = json.dumps(payload).encode()
        status, answer = await bot.post(url, body, github_headers(secret, body, event=event, delivery=f"odd{number}"))
        assert status == 400, answer
        assert "is not shaped as a github event" in answer["error"]
    odd_link = {**opened, "pull_request": {**opened["pull_request"], "html_url": 5}}
    body = json.dumps(odd_link).encode()
    status, _ = await bot.post(url, body, github_headers(secret, body, event="pull_request", delivery="link"))
    assert status == 202
    async with bot.services.db.read() as session:
        event = (await session.execute(select(Event))).scalar_one()
    assert event.link is None


async def test_a_flood_of_bad_signatures_does_not_make_the_door_read_the_secret_each_time(make_bot, workflows,
                                                                                          monkeypatch):
    """A failed signature makes the door read the stored secret again (another process may have rotated it),
    but only a few times a second: otherwise anyone could make every request cost a read and a decryption."""
    bot, url, secret = await connected(make_bot, workflows)
    body = b'{"summary": "x"}'
    assert (await bot.post(url, body, {"Authorization": f"Bearer {secret}", "X-Request-Id": "ok"}))[0] == 202
    keyring = bot.services.keyring
    opened = 0
    real_open = keyring.open

    async def counting_open(*args, **kwargs):
        nonlocal opened
        opened += 1
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(keyring, "open", counting_open)
    for number in range(40):
        status, _ = await bot.post(url, body, {"Authorization": "Bearer wrong", "X-Request-Id": f"bad-{number}"})
        assert status == 401
    assert 1 <= opened <= 10, opened
    assert (await bot.post(url, body, {"Authorization": f"Bearer {secret}", "X-Request-Id": "ok-2"}))[0] == 202


@BOTH_DATABASES
async def test_copies_of_a_notification_straddling_a_slice_end_start_one_run(make_bot, workflows, monkeypatch):
    """Alertmanager sends no delivery id: a notification is stored under its content hash and the 5-minute
    slice it came in. Two copies arriving together on either side of a slice's end (an HA pair) once each
    passed the door's lookup before the other was stored, and started two runs."""
    import bot.hooks as hooks
    from bot.store.models import Run

    write_workflow(workflows, "am", "name: am\non: {alertmanager: {}}\nsteps: []\n")
    first = await make_bot()
    url, secret = connection_from(await first.command("enable am"), "alertmanager")
    second = await make_bot()  # another process on the same database
    boundary = (int(time.time()) // 300 + 1) * 300.0
    arrivals = iter([boundary - 0.01, boundary + 0.01] * 2)
    real = hooks.content_deliveries
    monkeypatch.setattr(hooks, "content_deliveries", lambda digest, window, now: real(digest, window, next(arrivals)))
    notification = json.loads((CORPORA / "alertmanager/firing.json").read_text())
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    path = url.removeprefix(first.url)
    for group, (one, other) in (("same-process", (first, first)), ("two-processes", (first, second))):
        body = json.dumps({**notification, "groupKey": group}).encode()
        answers = await asyncio.gather(one.post(one.url + path, body, headers),
                                       other.post(other.url + path, body, headers))
        assert sorted(answer["duplicate"] for _, answer in answers) == [False, True], (group, answers)
        assert answers[0][1]["event"] == answers[1][1]["event"], group
    await first.settle()
    async with first.services.db.read() as session:
        assert await session.scalar(select(func.count()).select_from(Event)) == 2
        assert await session.scalar(select(func.count()).select_from(Run)) == 2

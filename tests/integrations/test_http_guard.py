"""The outbound HTTP guard: the SSRF table of issue 5, redirects checked hop by hop, the allow list, timeouts and
capped bodies — at the client, in `http.request`, and through the running app."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from integrations.base import ActionFailed
from integrations.http import Request
from integrations.httpclient import BlockedAddress, HttpClient, ResponseTooLarge, is_blocked_ip
from tests.conftest import TEAM, block_texts, free_socket, write_workflow
from tests.fakes.http_target import HttpTarget, Reply
from tests.integrations.conftest import action_context


@pytest.fixture
async def guarded() -> AsyncIterator[HttpClient]:
    """The guard with nothing allowed, as in production without RELAYBOT_HTTP_ALLOW."""
    client = HttpClient(allow=[], timeout=5.0)
    yield client
    await client.close()


@pytest.fixture
async def second_target() -> AsyncIterator[HttpTarget]:
    server = HttpTarget()
    await server.start()
    yield server
    await server.stop()


def port_of(server: HttpTarget) -> int:
    return int(server.url.rsplit(":", 1)[1])


SSRF_TABLE = [
    "http://127.0.0.1:{port}/",
    "http://[::1]:{port}/",
    "http://10.0.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://2130706433:{port}/",  # 127.0.0.1 as one decimal number
    "http://0177.0.0.1:{port}/",  # … in octal
    "http://127.1:{port}/",  # … shortened
    "http://localhost:{port}/",  # a name resolving to loopback
    "http://192.168.1.1/",
    "http://172.16.0.1/",
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    "http://0.0.0.0:{port}/",
]


@pytest.mark.parametrize("template", SSRF_TABLE)
async def test_the_ssrf_table_is_refused_before_any_connection(guarded, target, template):
    url = template.format(port=port_of(target))
    started = time.monotonic()
    with pytest.raises(BlockedAddress) as refused:
        await guarded.request("GET", url)
    assert time.monotonic() - started < 2, "refused at once, not after a connection timeout"
    assert "private, loopback or metadata address" in str(refused.value)
    assert target.received == []  # nothing reached the local server behind the loopback forms


@pytest.mark.parametrize("template", SSRF_TABLE)
async def test_http_request_reports_a_clear_refusal(guarded, target, template):
    ctx = action_context(guarded)
    url = template.format(port=port_of(target))
    with pytest.raises(ActionFailed) as failed:
        await Request().run(Request.Input.model_validate({"url": url}), ctx)
    assert failed.value.message.startswith("refused: ")
    assert "RELAYBOT_HTTP_ALLOW" in failed.value.message or "non-standard form" in failed.value.message
    assert failed.value.retryable is False


async def test_a_redirect_to_the_metadata_address_is_refused(http, target):
    # 127.0.0.1 is allowed (a local test server); where it redirects to is checked again.
    target.queue("/go", Reply(status=302, body="", headers={"Location": "http://169.254.169.254/latest/meta-data/"}))
    with pytest.raises(BlockedAddress, match=r"169\.254\.169\.254 is a private, loopback or metadata address"):
        await http.request("GET", f"{target.url}/go")
    ctx = action_context(http)
    target.queue("/go", Reply(status=307, body="", headers={"Location": "http://[::ffff:a9fe:a9fe]/"}))
    with pytest.raises(ActionFailed, match=r"^refused: "):
        await Request().run(Request.Input.model_validate({"url": f"{target.url}/go", "method": "POST"}), ctx)


async def test_a_redirect_to_a_name_resolving_to_loopback_is_refused(target, second_target):
    client = HttpClient(allow=["127.0.0.1"], timeout=5.0)
    try:
        target.queue("/go", Reply(status=301, body="", headers={"Location": f"http://localhost:{port_of(second_target)}/x"}))
        with pytest.raises(BlockedAddress, match="localhost resolves to a private"):
            await client.request("GET", f"{target.url}/go")
        assert second_target.received == []
    finally:
        await client.close()


async def test_allowed_hosts_are_reached_and_redirects_followed(target, second_target):
    client = HttpClient(allow=["127.0.0.1", "LOCALHOST."], timeout=5.0)
    try:
        target.queue("/start", Reply(status=303, body="",
                                     headers={"Location": f"http://localhost:{port_of(second_target)}/landed"}))
        response = await client.request("POST", f"{target.url}/start", json_body={"a": 1},
                                        headers={"Authorization": "Bearer secret", "X-Trace": "1"})
        assert response.status == 200 and response.url.endswith("/landed")
        [landed] = second_target.received
        # 303 turns a POST into a GET without a body; credentials are not carried to another origin.
        assert landed.method == "GET" and landed.body == b""
        assert "Authorization" not in landed.headers and landed.headers["X-Trace"] == "1"
        [first] = target.received
        assert first.headers["Authorization"] == "Bearer secret" and first.json() == {"a": 1}
    finally:
        await client.close()


async def test_same_origin_redirects_keep_credentials(http, target):
    target.queue("/old", Reply(status=308, body="", headers={"Location": "/new"}))
    response = await http.request("PUT", f"{target.url}/old", data="payload", headers={"Authorization": "Token x"})
    assert response.status == 200
    _, new = target.received
    assert (new.path, new.method, new.body, new.headers["Authorization"]) == ("/new", "PUT", b"payload", "Token x")


async def test_a_cookie_one_server_sets_is_never_sent_again(target):
    """One client serves every workspace's steps: a session cookie that one step's server set must not ride
    along on the next request to that host, which may be another workspace's. (By name: a cookie jar keeps
    no cookies of bare IP addresses.)"""
    client = HttpClient(allow=["localhost"], timeout=5.0)
    url = target.url.replace("127.0.0.1", "localhost")
    target.queue("/login", Reply(headers={"Set-Cookie": "session=workspace-a; Path=/"}))
    try:
        await client.request("POST", f"{url}/login")
        await client.request("GET", f"{url}/data")
        await client.request("GET", f"{url}/data", headers={"Cookie": "chosen=by-the-workflow"})
    finally:
        await client.close()
    _, plain, explicit = target.received
    assert "Cookie" not in plain.headers
    assert explicit.headers["Cookie"] == "chosen=by-the-workflow"


async def test_too_many_redirects_are_refused(http, target):
    target.queue("/loop", *[Reply(status=302, body="", headers={"Location": "/loop"}) for _ in range(10)])
    with pytest.raises(BlockedAddress, match="more than 5 redirects"):
        await http.request("GET", f"{target.url}/loop")
    assert len(target.received) == 6


async def test_every_request_has_a_timeout(target):
    client = HttpClient(allow=["127.0.0.1"], timeout=0.3)
    try:
        target.queue("/slow", Reply(delay=1.5))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.request("GET", f"{target.url}/slow")
        assert time.monotonic() - started < 1.2
    finally:
        await client.close()


async def test_response_bodies_are_capped(target):
    client = HttpClient(allow=["127.0.0.1"], max_response=1000)
    try:
        target.queue("/big", Reply(body="x" * 5000))
        with pytest.raises(ResponseTooLarge):
            await client.request("GET", f"{target.url}/big")
        target.queue("/small", Reply(body="x" * 900))
        assert len((await client.request("GET", f"{target.url}/small")).body) == 900
        with pytest.raises(ActionFailed, match="larger than 1000 bytes") as failed:
            target.queue("/big", Reply(body="x" * 5000))
            await Request().run(Request.Input.model_validate({"url": f"{target.url}/big"}), action_context(client))
        assert failed.value.retryable is False
    finally:
        await client.close()


async def test_streamed_bodies_without_a_length_are_capped_too():
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"y" * 1000)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    client = HttpClient(allow=["127.0.0.1"], max_response=10_000)
    try:
        with pytest.raises(ResponseTooLarge):
            await client.request("GET", f"http://127.0.0.1:{runner.addresses[0][1]}/")
    finally:
        await client.close()
        await runner.cleanup()


async def test_only_http_and_https(guarded):
    for url in ("file:///etc/passwd", "ftp://example.com/", "gopher://example.com/"):
        with pytest.raises(BlockedAddress, match="only http and https"):
            await guarded.request("GET", url)


@given(st.ip_addresses(v=4))
def test_an_ipv4_address_dressed_as_ipv6_is_judged_as_itself(address):
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))
    assert is_blocked_ip(str(mapped)) == is_blocked_ip(str(address))
    assert is_blocked_ip(str(nat64)) == is_blocked_ip(str(address))


@given(st.sampled_from(["10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10", "172.16.0.0/12",
                        "192.168.0.0/16", "0.0.0.0/8"]), st.integers(min_value=0))
def test_every_address_of_a_private_range_is_blocked(network, offset):
    net = ipaddress.ip_network(network)
    assert is_blocked_ip(str(net[offset % net.num_addresses]))


def test_public_addresses_pass():
    for address in ("93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "140.82.112.3"):
        assert not is_blocked_ip(address)


async def test_a_step_calling_the_metadata_address_fails_with_the_refusal_in_the_thread(make_bot, workflows):
    write_workflow(workflows, "steal", """
        name: steal
        on: [webhook]
        steps:
          - id: fetch
            uses: http.request
            with:
              url: http://169.254.169.254/latest/meta-data/iam/security-credentials/
        """)
    bot = await make_bot()
    reply = await bot.command("enable steal")
    url = reply.split("URL: `")[1].split("`")[0]
    secret = reply.split("Secret: `")[1].split("`")[0]
    status, _ = await bot.post(url, b'{"title": "go"}', {"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {secret}"})
    assert status == 202
    card = await bot.wait_card()
    thread = await bot.wait_thread(card, "Run failed")
    assert any("refused: 169.254.169.254 is a private, loopback or metadata address" in line for line in thread), \
        thread
    await bot.settle()
    final = bot.slack.message(TEAM, card.channel, card.ts)
    assert final is not None and "failed" in block_texts(final)


async def test_a_connection_failure_is_a_retryable_step_failure(http):
    sock = free_socket()  # bound, never listening: connections are refused
    port = sock.getsockname()[1]
    try:
        with pytest.raises(ActionFailed) as failed:
            await Request().run(Request.Input.model_validate({"url": f"http://127.0.0.1:{port}/x?token=abc"}),
                                action_context(http))
    finally:
        sock.close()
    assert failed.value.message.startswith(f"GET http://127.0.0.1:{port}/x failed: ")
    assert "token=abc" not in failed.value.message  # a query string may carry credentials
    assert failed.value.retryable is True

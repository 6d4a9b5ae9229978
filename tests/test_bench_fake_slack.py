"""The benchmark's fake Slack answers and counts the same through its C front as through its Python one.

The issue-7 numbers are read off this fake's `/stats`; its C front (`bench/fake_slack_front.c`) keeps no counters of
its own and posts them to the Python process before anything is relayed. The same requests go to a fake with each
front, and every answer and the final `/stats` must agree.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(os.environ.get("N8N_HARNESS", "/work/shared/bench/n8n"))
TOKEN = "xoxb-bench-relaybot-0001"
CHANNEL = "C0BENCH01"
TIMES = ("first_wall", "last_wall", "first_mono", "last_mono", "span_s", "now_wall", "reset_wall")

pytestmark = [
    pytest.mark.skipif(not (HARNESS / "fake_slack.py").exists(), reason=f"no n8n bench harness at {HARNESS}"),
    pytest.mark.skipif(shutil.which(os.environ.get("CC", "gcc")) is None, reason="no C compiler for the C front"),
]


async def _start(front: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "fake_slack_relay.py"), "--front", front, "--harness", str(HARNESS),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    return process, json.loads(line)["url"]


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, str]]:
    started = {front: await _start(front) for front in ("python", "c")}
    try:
        yield {front: url for front, (_, url) in started.items()}
    finally:
        for process, _ in started.values():
            process.terminate()
            await process.wait()


def _comparable(answer: Any) -> Any:
    """An answer without its fresh `ts` (each fake makes its own)."""
    if isinstance(answer, dict) and answer.get("ok") and isinstance(answer.get("ts"), str) and answer["ts"] != "1.5":
        return {**answer, "ts": "<new>"}
    return answer


async def _exchange(url: str) -> list[Any]:
    said: list[Any] = []
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json;charset=utf-8"}
    requests: list[tuple[str, Any, dict[str, str]]] = [
        ("chat.postMessage", {"channel": CHANNEL, "text": f"probe t={time.time():.6f}"}, {}),
        ("chat.postMessage", {"channel": CHANNEL, "text": "reply", "thread_ts": "1.2"}, {}),
        ("chat.postMessage", {"channel": CHANNEL, "text": "a card after all", "thread_ts": ""}, {}),
        ("chat.update", {"channel": CHANNEL, "ts": "1.5", "text": "refreshed"}, {}),
        ("chat.update", {"channel": CHANNEL, "text": "no ts"}, {}),
        ("chat.postMessage", {"channel": "C0OTHER", "text": "x"}, {}),
        ("chat.postMessage", {"channel": CHANNEL, "text": "x"}, {"Authorization": "Bearer wrong"}),
        ("chat.postMessage", '{"channel": "C0BENCH01", "blocks": [{"a": "b\\"}"}], "n": -1.5e3, "t": true}', {}),
        ("chat.postMessage", '{"chan\\u006eel": "C0BENCH01", "text": "an escaped key"}', {}),
        ("chat.postMessage", {"channel": CHANNEL, "text": "x"}, {"Content-Type": "text/plain"}),
        ("auth.test", {}, {}),
    ]
    async with aiohttp.ClientSession() as http:
        for method, body, extra in requests:
            data = body if isinstance(body, str) else json.dumps(body)
            async with http.post(f"{url}/api/{method}", data=data, headers={**headers, **extra}) as response:
                said.append((method, response.status, _comparable(await response.json(content_type=None))))

        async def card(index: int) -> None:  # many at once, over several connections
            body = {"channel": CHANNEL, "text": f"PR #{index} probe t={time.time():.6f}"}
            async with http.post(f"{url}/api/chat.postMessage", json=body, headers=headers) as response:
                assert (await response.json())["ok"]

        await asyncio.gather(*(card(index) for index in range(300)))
        async with http.get(f"{url}/stats") as response:
            stats = await response.json()
    probe = stats.pop("probe")
    assert probe["n"] == 301 and probe["max_ms"] < 60_000, probe
    said.append(("stats", {key: value for key, value in stats.items() if key not in TIMES}))
    return said


async def test_the_c_front_answers_and_counts_as_the_python_one(fakes):
    python, c = await _exchange(fakes["python"]), await _exchange(fakes["c"])
    assert c == python
    assert c[-1][1]["count"] == 304 and c[-1][1]["replies"] == 1 and c[-1][1]["updates"] == 2


async def test_the_c_front_keeps_pipelined_requests_in_order_and_closes_when_asked(fakes):
    host, port = fakes["c"].removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"channel": CHANNEL, "text": "reply", "thread_ts": "1.2"}).encode()
    head = (f"POST /api/chat.postMessage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    update = json.dumps({"channel": CHANNEL, "ts": "9.9"}).encode()
    writer.write(head.encode() + b"\r\n" + body  # two requests in one write, the second asking to close
                 + head.replace("chat.postMessage", "chat.update").replace(str(len(body)), str(len(update))).encode()
                 + b"Connection: close\r\n\r\n" + update)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # to the end: the front closes after the second
    writer.close()
    first, second = answer.split(b"HTTP/1.1 200 OK")[1:]
    assert b'"ts": "' in first and b"Connection: close" not in first
    assert second.endswith(b'{"ok": true, "channel": "C0BENCH01", "ts": "9.9"}') and b"Connection: close" in second

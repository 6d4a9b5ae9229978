"""`relaybot serve --workers N`: N processes on one port, their supervisor, and SQLite's cross-process write lock."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

import bot.store.db as db_module
from bot.store.db import Database
from tests.conftest import CHANNEL, TEAM, connection_from
from tests.procs import ServeProcess, command, post_json
from tests.test_cli import relaybot
from tests.test_scale_out import run_id_of, write_work_workflow

# --- the write lock between processes (two `Database`s on one file exclude each other as two processes do) ---


@pytest.fixture
async def two_databases(tmp_path, monkeypatch):
    """Two handles on one SQLite file, with SQLite's busy handler off: a writer that reached `BEGIN IMMEDIATE`
    while the other held SQLite's lock would fail at once with "database is locked". So these tests pass only
    if every wait happens on the flock."""
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 0)
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    first, second = Database(url), Database(url)
    async with first.write() as session:
        await session.execute(text("CREATE TABLE events (what TEXT)"))
    yield first, second
    await first.dispose()
    await second.dispose()


async def insert(session, what: str) -> None:
    await session.execute(text("INSERT INTO events (what) VALUES (:what)"), {"what": what})


async def recorded(db: Database) -> list[str]:
    async with db.read() as session:
        return list((await session.execute(text("SELECT what FROM events ORDER BY rowid"))).scalars())


@pytest.mark.parametrize("waiter", ["write", "transaction"])
async def test_a_writer_waits_for_the_other_process_and_goes_as_soon_as_it_commits(two_databases, waiter):
    first, second = two_databases
    order: list[str] = []

    async def second_writes() -> None:
        if waiter == "write":
            async with second.write() as session:
                order.append("second began")
                await insert(session, "second")
        else:
            async def body(session) -> None:
                order.append("second began")
                await insert(session, "second")

            await second.transaction(body)

    async with first.write() as session:
        await insert(session, "first")
        waiting = asyncio.create_task(second_writes())
        await asyncio.sleep(0.3)  # time enough for the second to begin, were it not made to wait
        assert not waiting.done() and order == []
        order.append("first commits")
    await asyncio.wait_for(waiting, timeout=10)
    assert order == ["first commits", "second began"]
    assert await recorded(first) == ["first", "second"]


async def test_the_lock_file_itself_makes_writers_wait(two_databases, tmp_path):
    """Held by anybody — here this test, with SQLite not locked at all — the flock holds back both paths."""
    first, _ = two_databases
    handle = os.open(tmp_path / "shared.db.writelock", os.O_RDWR)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)

        async def write() -> None:
            async with first.write() as session:
                await insert(session, "write")

        async def transaction() -> None:
            await first.transaction(lambda session: insert(session, "transaction"))

        for attempt in (write, transaction):
            waiting = asyncio.create_task(attempt())
            await asyncio.sleep(0.3)
            assert not waiting.done(), f"{attempt.__name__} did not wait for the flock"
            fcntl.flock(handle, fcntl.LOCK_UN)
            await asyncio.wait_for(waiting, timeout=10)
            fcntl.flock(handle, fcntl.LOCK_EX)
    finally:
        os.close(handle)
    assert await recorded(first) == ["write", "transaction"]


async def test_a_cancelled_waiter_leaves_neither_lock_held(two_databases, tmp_path):
    first, second = two_databases

    async def second_writes(what: str) -> None:
        async with second.write() as session:
            await insert(session, what)

    async with first.write() as session:
        await insert(session, "first")
        cancelled = asyncio.create_task(second_writes("never"))
        await asyncio.sleep(0.3)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    # The cancelled waiter's thread got the flock once the first committed; when it is done with it, the second's
    # process-level lock is free again (it was kept until then) — and so must the flock be, for anybody.
    await asyncio.wait_for(second._write_lock.acquire(), timeout=10)
    second._write_lock.release()
    handle = os.open(tmp_path / "shared.db.writelock", os.O_RDWR)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the cancelled waiter kept it
        fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)
    async with asyncio.timeout(10):
        async with first.write() as session:
            await insert(session, "first again")
    await asyncio.wait_for(second_writes("second"), timeout=10)
    assert await recorded(first) == ["first", "first again", "second"]


def test_no_lock_file_for_an_in_memory_database(tmp_path):
    assert db_module._lock_file_path("sqlite+aiosqlite:///:memory:") is None
    assert db_module._lock_file_path("sqlite+aiosqlite://") is None
    assert db_module._lock_file_path(f"sqlite+aiosqlite:///{tmp_path}/r.db") == f"{tmp_path}/r.db.writelock"


# --- the command line ---


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--workers", "0"], {}, "--workers 0: the number of worker processes must be at least 1"),
    (["--workers", "-3"], {}, "--workers -3: the number of worker processes must be at least 1"),
    ([], {"RELAYBOT_WORKERS": "0"}, "RELAYBOT_WORKERS: Input should be greater than or equal to 1"),
    (["--workers", "2", "--socket-mode"], {"SLACK_APP_TOKEN": "xapp-1"},
     "--workers 2 cannot be used with --socket-mode: Socket Mode receives Slack's requests over the bot's own "
     "WebSocket, there is no port to share"),
    (["--socket-mode"], {"SLACK_APP_TOKEN": "xapp-1", "RELAYBOT_WORKERS": "3"},
     "RELAYBOT_WORKERS=3 cannot be used with --socket-mode"),
    (["--workers", "2", "--port", "0"], {}, "--workers needs a fixed port (PORT or --port), not 0"),
])
def test_serve_refuses_impossible_worker_options(args, env, expected, tmp_path):
    result = relaybot("serve", *args, SLACK_SIGNING_SECRET="s", SLACK_BOT_TOKEN="xoxb-1",
                      RELAYBOT_WORKFLOWS_DIR=str(tmp_path), RELAYBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/r.db",
                      **env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("relaybot: configuration error: "), result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "r.db").exists(), "nothing may start before the options are checked"


# --- the supervisor and its workers, as real processes ---


def started_workers(log: Path) -> list[tuple[int, int]]:
    """(worker index, pid) of every worker start the supervisor logged, in order."""
    return [(int(index), int(pid)) for index, pid in
            re.findall(r"worker (\d+) started, pid (\d+)", log.read_text(errors="replace"))]


def listening_pids(port: int, candidates: set[int]) -> set[int]:
    """Which of `candidates` hold a socket listening on `port` (from /proc: what the kernel sees)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    found = set()
    for pid in candidates:
        try:
            if any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir()):
                found.add(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def gone(pid: int) -> bool:
    """Exited and reaped, or (an orphan in a container whose init reaps nobody) a zombie with no thread left."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "State:\tZ" in status and all(task.name == str(pid) for task in Path(f"/proc/{pid}/task").iterdir())


def refused(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


async def eventually(check, *, timeout: float = 30.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out: {what}")
        await asyncio.sleep(0.1)


async def both_listening(supervisor: ServeProcess) -> dict[int, int]:
    """Once each of the two workers' latest pids listens on the supervisor's port: index → pid."""
    def latest() -> dict[int, int]:
        return dict(started_workers(supervisor.log))

    def ready() -> bool:
        pids = latest()
        return len(pids) == 2 and listening_pids(supervisor.port, set(pids.values())) == set(pids.values())

    await eventually(ready, what=f"two workers listening on {supervisor.port}:\n{supervisor.log.read_text()}")
    return latest()


async def test_two_workers_share_one_port_and_the_supervisor_replaces_a_killed_one(
        slack, workflows, target, tmp_path):
    write_work_workflow(workflows, target)
    log = tmp_path / "serve.log"
    supervisor = ServeProcess(slack=slack, workflows=workflows, log=log, args=["--workers", "2"],
                              database_url=f"sqlite+aiosqlite:///{tmp_path / 'relaybot.db'}")
    await supervisor.start()
    try:
        workers = await both_listening(supervisor)
        assert supervisor.process is not None and supervisor.process.pid not in workers.values()
        assert listening_pids(supervisor.port, {supervisor.process.pid}) == set(), "the supervisor serves nothing"

        url, secret = connection_from(await command(slack, "enable work"), "webhook")
        assert url.startswith(supervisor.url)

        async def deliver(numbers: range) -> None:
            async def one(n: int) -> int:  # each on a connection of its own, which the kernel gives either worker
                body = json.dumps({"n": n, "summary": f"item {n}"}).encode()
                return await post_json(url, body, {"Authorization": f"Bearer {secret}",
                                                   "Content-Type": "application/json", "X-Request-Id": f"d-{n}"})

            assert await asyncio.gather(*(one(n) for n in numbers)) == [202] * len(numbers)

        def cards() -> Counter[str]:
            return Counter(run_id_of(m) for m in slack.channel_messages(TEAM, CHANNEL))

        await deliver(range(20))
        await slack.wait_for(lambda: len(cards()) >= 20, timeout=30)

        # One worker killed: the other keeps the port; the supervisor starts a new one in its place.
        index, killed = sorted(workers.items())[0]
        os.kill(killed, signal.SIGKILL)
        # Logged once the supervisor has reaped it: all its threads gone, its listening socket closed. (Its main
        # thread shows as a zombie earlier, while the others may still be tearing down with the socket open.)
        await eventually(lambda: f"worker {index} (pid {killed}) was killed by SIGKILL" in log.read_text(),
                         what="the supervisor noticing the killed worker")
        await deliver(range(20, 40))
        replaced = await both_listening(supervisor)
        assert replaced[index] != killed and replaced[1 - index] == workers[1 - index]
        await deliver(range(40, 60))

        await slack.wait_for(lambda: len([r for r in target.received if r.path.startswith("/work/")]) >= 60,
                             timeout=60)
        await slack.wait_for(lambda: len(cards()) >= 60, timeout=30)
        await asyncio.sleep(1.0)  # a card posted twice would show by now
        assert len(cards()) == 60 and set(cards().values()) == {1}, cards().most_common(3)

        # `GET /metrics` adds up every worker's values, the killed one's included, whichever worker answers.
        for _ in range(8):
            samples = await scrape(supervisor.url)
            assert sum(value for name, value in samples if name.startswith("relaybot_events_received_total")) == 60
            assert [value for name, value in samples if name == "relaybot_inbox_depth"] == [0.0]
        said = "keep their metrics in "
        metrics_dir = next(Path(line.split(said, 1)[1].strip()) for line in log.read_text().splitlines()
                           if said in line)
        assert metrics_dir.is_dir()

        # SIGTERM to the supervisor: every worker stops, and so does it, cleanly.
        supervisor.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.process.wait, 30) == 0, log.read_text()
        assert all(gone(pid) for pid in replaced.values())
        assert "all 2 workers stopped" in log.read_text()
        assert not metrics_dir.exists(), "the supervisor removes the workers' metrics directory"
    finally:
        supervisor.stop()


async def scrape(url: str) -> list[tuple[str, float]]:
    """`GET /metrics` on a connection of its own (which the kernel gives either worker): its samples."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text_body = await response.text()
    samples = []
    for line in text_body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples.append((name, float(value)))
    return samples


async def test_workers_stop_by_themselves_when_their_supervisor_is_killed(slack, workflows, tmp_path):
    supervisor = ServeProcess(slack=slack, workflows=workflows, log=tmp_path / "serve.log", args=["--workers", "2"],
                              database_url=f"sqlite+aiosqlite:///{tmp_path / 'relaybot.db'}")
    await supervisor.start()
    workers = await both_listening(supervisor)
    supervisor.kill()
    try:
        await eventually(lambda: all(gone(pid) for pid in workers.values()) and refused(supervisor.port),
                         timeout=20, what="workers left running without their supervisor")
    finally:
        for pid in workers.values():
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert "the supervisor" in (tmp_path / "serve.log").read_text()


async def test_the_supervisor_gives_up_on_workers_that_keep_dying(slack, workflows, tmp_path):
    """Workers that cannot start (the port is held by another program) die at once; after 5 quick deaths in a
    row the supervisor stops and says why."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    process = ServeProcess(slack=slack, workflows=workflows, log=tmp_path / "serve.log",
                           database_url=f"sqlite+aiosqlite:///{tmp_path / 'relaybot.db'}")
    env = process.environment(port)
    try:
        result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "bot", "serve", "--workers", "2"],
                                         env=env, capture_output=True, text=True, timeout=120, check=False)
    finally:
        holder.close()
    assert result.returncode == 1, result.stderr
    assert re.search(r"stopped all workers: worker \d died within 10 s of starting 5 times in a row "
                     r"\(last: exited with status \d+\)", result.stderr), result.stderr[-3000:]


def test_a_workers_log_lines_say_which_worker_wrote_them():
    from bot.cli.common import name_the_worker

    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    formatters = {other: other.formatter for other in root.handlers}
    try:
        name_the_worker(3)
        record = logging.LogRecord("bot.engine.worker", logging.WARNING, __file__, 1, "lease lost", None, None)
        assert re.search(r" WARNING worker 3 bot\.engine\.worker: lease lost$", handler.format(record))
    finally:
        root.removeHandler(handler)
        for other, formatter in formatters.items():
            other.setFormatter(formatter)

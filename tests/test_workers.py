"""SQLite's write lock between processes (for `relaybot serve --workers N`)."""

from __future__ import annotations

import asyncio
import fcntl
import os

import pytest
from sqlalchemy import text

import bot.store.db as db_module
from bot.store.db import Database

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

"""Engines and sessions.

SQLite: WAL, `synchronous=NORMAL`, a busy timeout, and every write transaction opened with `BEGIN IMMEDIATE`
on a single pooled writer connection. A deferred transaction that reads and then writes ignores the busy
timeout and fails with "database is locked" under concurrent writers; taking the write lock up front, and
queueing this process's writers on one connection, means that cannot happen. Reads use their own pool.

PostgreSQL: one pool; callers that claim work use `FOR UPDATE SKIP LOCKED` (see `Database.skip_locked`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

BUSY_TIMEOUT_MS = 30_000
BULK_KEY = "relaybot.insert_later"


def insert_later(session: AsyncSession, model: type[Any], row: dict[str, Any]) -> bool:
    """Queue a row to be inserted with others of its table in one statement at the end of the transaction.

    The ORM inserts rows whose primary key it must learn one statement at a time; rows nobody reads back in
    the same transaction (audit records, outbox messages) need not pay for that. False when the session is
    not one of `Database.write()`'s, and the caller should add the row itself.
    """
    pending = session.info.get(BULK_KEY)
    if pending is None:
        return False
    pending.setdefault(model, []).append(row)
    return True


async def flush_later(session: AsyncSession) -> None:
    pending: dict[type[Any], list[dict[str, Any]]] = session.info.get(BULK_KEY) or {}
    for model, rows in pending.items():
        if rows:
            await session.execute(insert(model), rows)
    pending.clear()


def _sqlite_engine(url: str, *, writer: bool, echo: bool) -> AsyncEngine:
    engine = create_async_engine(
        url,
        echo=echo,
        poolclass=AsyncAdaptedQueuePool,
        pool_size=1 if writer else 4,
        max_overflow=0,
        pool_timeout=BUSY_TIMEOUT_MS / 1000,
        connect_args={"timeout": BUSY_TIMEOUT_MS / 1000},
        # Every transaction ends in an explicit COMMIT or ROLLBACK; a second ROLLBACK on check-in would only cost
        # another trip to aiosqlite's thread.
        pool_reset_on_return=None,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event, not the driver, open transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Writers take the write lock up front. Readers run each SELECT in its own implicit transaction: a WAL
        # reader never blocks anyone, and a read-only "transaction" would only add BEGIN/COMMIT round trips.
        if writer:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Database:
    """The project's one handle on the database; built by the app factory and passed down."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            self._writer = _sqlite_engine(url, writer=True, echo=echo)
            self._reader = _sqlite_engine(url, writer=False, echo=echo)
        else:
            self._writer = create_async_engine(url, echo=echo, pool_size=10, max_overflow=10,
                                               pool_pre_ping=True)
            self._reader = self._writer
        self._write_sessions = async_sessionmaker(self._writer, expire_on_commit=False)
        self._read_sessions = async_sessionmaker(self._reader, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def engine(self) -> AsyncEngine:
        """The engine for writes (and migrations)."""
        return self._writer

    @property
    def read_engine(self) -> AsyncEngine:
        return self._reader

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        async with self._write_sessions() as session, session.begin():
            session.info[BULK_KEY] = {}
            yield session
            await flush_later(session)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self._read_sessions() as session, session.begin():
            yield session

    def skip_locked(self) -> dict[str, Any]:
        """`with_for_update` arguments for claiming rows; SQLite's write lock already makes claims exclusive."""
        return {} if self.is_sqlite else {"skip_locked": True}

    async def ping(self) -> None:
        from sqlalchemy import text

        async with self.read() as session:
            await session.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self._writer.dispose()
        if self._reader is not self._writer:
            await self._reader.dispose()

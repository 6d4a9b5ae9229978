"""Engines and sessions.

SQLite: WAL, `synchronous=NORMAL`, a busy timeout, and every write transaction opened with `BEGIN IMMEDIATE`.
A deferred transaction that reads and then writes ignores the busy timeout and fails with "database is locked"
under concurrent writers; taking the write lock up front, and queueing this process's writers behind one
`WriteLock`, means that cannot happen. Reads use their own connections.

SQLite, the busy paths (`Database.transaction`, `Database.reading`): the whole transaction runs in one hand-off
to a writer (or reader) thread with the synchronous driver. Through aiosqlite every statement is a trip to its
thread and back through the event loop, and a loaded loop made each trip wait for milliseconds while the
transaction held the one write lock: the database stood idle, locked, most of the time. The other writes
(`Database.write`, through aiosqlite) take the same `WriteLock`.

SQLite, several processes on one file (`relaybot serve --workers N`): after the `WriteLock` and before `BEGIN
IMMEDIATE`, every write transaction takes an exclusive `flock` on `<database>.writelock` (`FileWriteLock`),
released after COMMIT or ROLLBACK. Without it, a process waiting for SQLite's own lock waits in SQLite's busy
handler, which sleeps (1, 2, 5, 10 … ms) instead of waking when the lock is free: with two processes writing,
the webhook accept p99 went to 750 ms while the processes sat idle. The kernel wakes a flock waiter at once, and
a killed process's flock goes away with it. The busy timeout stays as the last resort for writers that do not
take the flock (the `sqlite3` shell, migrations, the OAuth stores that use `Database.engine` directly).

PostgreSQL: one pool; callers that claim work use `FOR UPDATE SKIP LOCKED` (see `Database.skip_locked`).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import heapq
import itertools
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

from sqlalchemy import Engine, MetaData, Table, create_engine, event, insert, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

from bot.errors import ConfigError
from integrations import jsontext

T = TypeVar("T")
Body = Callable[[AsyncSession], Coroutine[Any, Any, T]]

BUSY_TIMEOUT_MS = 30_000


def _json_column(stored: str | bytes | int | float) -> Any:
    """A JSON column's value. SQLite gives such columns numeric affinity: JSON text that is a bare number (a
    webhook whose whole body is `42`) comes back as that number, not as text."""
    return stored if isinstance(stored, int | float) else jsontext.loads(stored)


# How JSON columns are written and read (see integrations.jsontext: the standard library's values, faster).
JSON_CODEC: dict[str, Any] = {"json_serializer": jsontext.dumps, "json_deserializer": _json_column}
BULK_KEY = "relaybot.insert_later"
FINISH_KEY = "relaybot.before_commit"


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` says the database could not be reached or used just now (a dropped connection, a lock
    that timed out, a server restarting): worth trying again as it was, not a sign of what was asked."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, OperationalError | InterfaceError | PoolTimeout | OSError | TimeoutError)


def insert_later(session: AsyncSession | Session, model: type[Any], row: dict[str, Any]) -> bool:
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


def take_later(session: AsyncSession | Session, model: type[Any]) -> list[dict[str, Any]]:
    """The rows of `model` queued by `insert_later` and not written yet, taken out of the queue: the caller
    inserts them itself (to learn their ids, say)."""
    pending = session.info.get(BULK_KEY)
    return pending.pop(model, []) if pending is not None else []


def row_of(instance: Any) -> dict[str, Any]:
    """A new mapped object's column values, for `insert_later` (the object itself stays out of the session).

    What was set on the object, else the column's scalar default, else NULL; an autoincrement key left unset
    is left to the database.
    """
    table = instance.__table__
    given = inspect(instance).dict
    row: dict[str, Any] = {}
    for column in table.columns:
        if column.key in given:
            row[column.key] = given[column.key]
        elif column.default is not None and column.default.is_scalar:
            row[column.key] = column.default.arg
        elif not (column.primary_key and column.autoincrement):
            row[column.key] = None
    return row


def before_commit(session: AsyncSession | Session, key: str,
                  finish: Callable[[AsyncSession], Awaitable[None]]) -> bool:
    """Have `finish(session)` run once at the end of this transaction, after the rows queued by `insert_later`
    are written and before COMMIT (the audit chain is written there, so that on PostgreSQL its head row is
    locked only for the transaction's last statements). False when the session is not one of `Database`'s."""
    finishers = session.info.get(FINISH_KEY)
    if finishers is None:
        return False
    finishers.setdefault(key, finish)
    return True


def _open_for_later(session: AsyncSession | Session) -> None:
    session.info[BULK_KEY] = {}
    session.info[FINISH_KEY] = {}


@functools.cache
def _table_order(metadata: MetaData) -> dict[Table, int]:
    # Sorting the tables by their foreign keys took longer than the inserts of a small transaction.
    return {table: index for index, table in enumerate(metadata.sorted_tables)}


@functools.cache
def _insert_into(table: Table, *, many_values: bool) -> Any:
    # Built once: building a statement cost more than a small executemany.
    if many_values:
        # With RETURNING, SQLAlchemy sends the rows as multi-row VALUES, a few hundred per statement.
        return insert(table).returning(*table.primary_key.columns)
    return insert(table)


async def insert_rows(session: AsyncSession, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert many rows into `table` (its primary keys are not wanted back).

    PostgreSQL: as multi-row INSERTs. asyncpg's executemany runs the statement once per row, and PostgreSQL's
    cost per execution was most of a small row's (runs: 57 µs per row alone, 41 µs in multi-row statements).
    SQLite: one executemany, which runs in-process without a round trip per row anyway.
    """
    postgres = session.bind is not None and session.bind.dialect.name == "postgresql"
    await session.execute(_insert_into(table, many_values=postgres), rows)


def _parents_first(model: type[Any]) -> int:
    order = _table_order(model.__table__.metadata)
    return order.get(model.__table__, len(order))


async def flush_later(session: AsyncSession) -> None:
    """Write the rows queued by `insert_later`, then run what `before_commit` asked for (which may queue more)."""
    while True:
        pending: dict[type[Any], list[dict[str, Any]]] = session.info.get(BULK_KEY) or {}
        # Parents before children (runs before their steps), whatever order the rows were queued in.
        for model in sorted(pending, key=_parents_first) if len(pending) > 1 else list(pending):
            if pending[model]:
                # The table, not the mapped class: without the ORM's bulk path per row.
                await insert_rows(session, model.__table__, pending[model])
        pending.clear()
        finishers: dict[str, Callable[[AsyncSession], Awaitable[None]]] = session.info.get(FINISH_KEY) or {}
        if not finishers:
            return
        waiting = list(finishers.values())
        finishers.clear()
        for finish in waiting:
            await finish(session)


class SyncSessionAsAsync:
    """AsyncSession's methods over a synchronous Session, as coroutines that never suspend.

    It lets a transaction written as ordinary async code (`await session.execute(...)`) run start to finish on
    the SQLite writer thread: see `_run_to_completion`.
    """

    def __init__(self, session: Session) -> None:
        self.sync_session = session

    @property
    def info(self) -> dict[Any, Any]:
        return self.sync_session.info

    @property
    def bind(self) -> Any:
        return self.sync_session.bind

    def add(self, instance: object) -> None:
        self.sync_session.add(instance)

    def add_all(self, instances: Any) -> None:
        self.sync_session.add_all(instances)

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self.sync_session.execute(*args, **kwargs)

    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        return self.sync_session.scalar(*args, **kwargs)

    async def scalars(self, *args: Any, **kwargs: Any) -> Any:
        return self.sync_session.scalars(*args, **kwargs)

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        return self.sync_session.get(*args, **kwargs)

    async def flush(self, *args: Any, **kwargs: Any) -> None:
        self.sync_session.flush(*args, **kwargs)

    async def delete(self, instance: object) -> None:
        self.sync_session.delete(instance)


class SuspendedTransaction(RuntimeError):
    """A transaction body meant for the writer thread awaited something other than the database."""


def _run_to_completion(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine whose awaits all complete at once (see `SyncSessionAsAsync`) to its end, here."""
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return cast(T, finished.value)
    except RuntimeError as exc:
        if "no running event loop" not in str(exc):
            raise
        raise SuspendedTransaction("a transaction on the writer thread needed the event loop") from exc
    coroutine.close()
    raise SuspendedTransaction("a transaction on the writer thread awaited something other than the database")


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
        **JSON_CODEC,
    )
    _configure_sqlite(engine.sync_engine, writer=writer)
    return engine


def _sqlite_thread_engine(url: str, *, writer: bool, echo: bool) -> Engine:
    """The synchronous twin of the async writer or reader, for `Database.transaction` and `Database.reading`
    (each used from its one thread)."""
    sync_url = make_url(url).set(drivername="sqlite")
    engine = create_engine(sync_url, echo=echo, poolclass=QueuePool, pool_size=1, max_overflow=0,
                           connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
                           pool_reset_on_return=None, **JSON_CODEC)
    _configure_sqlite(engine, writer=writer)
    return engine


def _configure_sqlite(engine: Engine, *, writer: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event, not the driver, open transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Writers take the write lock up front. Readers run each SELECT in its own implicit transaction: a WAL
        # reader never blocks anyone, and a read-only "transaction" would only add BEGIN/COMMIT round trips.
        if writer:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


class WriteLock:
    """One SQLite writer at a time in this process, first come first served, except that writes somebody is
    waiting on (a webhook's `202`) go before the background ones."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    async def acquire(self, *, urgent: bool = False) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (0 if urgent else 1, next(self._arrivals), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed over just as the waiter was cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, turn = heapq.heappop(self._waiters)
            if not turn.done():
                turn.set_result(None)  # the lock goes straight to this waiter: it stays held
                return
        self._held = False


class FileWriteLock:
    """An exclusive `flock` on a file beside the database: one writer at a time across processes.

    Each holder also holds its process's `WriteLock`, so one descriptor per `Database` suffices, and the lock may
    be taken on one thread and released on another (a flock belongs to the open file description). Two
    `Database`s on one file, even in one process, have two descriptors and exclude each other.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._descriptor: int | None = None
        self._opening = threading.Lock()

    def _opened(self) -> int:
        with self._opening:  # the first acquire may come from the writer thread or the lock thread
            if self._descriptor is None:
                self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            return self._descriptor

    def acquire(self) -> None:
        """Blocks until the lock is free: call it on a thread, never on the event loop."""
        fcntl.flock(self._opened(), fcntl.LOCK_EX)

    def release(self) -> None:
        """Never blocks."""
        if self._descriptor is not None:  # None once closed: closing released it
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._opening:
            if self._descriptor is not None:
                os.close(self._descriptor)
                self._descriptor = None


def _lock_file_path(url: str) -> str | None:
    """`<database file>.writelock`, or None for an in-memory database (one connection: nobody to exclude)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return database + ".writelock"


class Database:
    """The project's one handle on the database; built by the app factory and passed down."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self._thread_writer: Engine | None = None
        self._write_lock = WriteLock()
        self._file_lock: FileWriteLock | None = None
        if self.dialect == "sqlite":
            lock_path = _lock_file_path(url)
            self._file_lock = FileWriteLock(lock_path) if lock_path else None
            # `write()` waits for the flock here; `transaction()` waits on the writer thread itself.
            self._lock_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relaybot-sqlite-flock")
            self._writer = _sqlite_engine(url, writer=True, echo=echo)
            self._reader = _sqlite_engine(url, writer=False, echo=echo)
            self._thread_writer = _sqlite_thread_engine(url, writer=True, echo=echo)
            self._thread_sessions = sessionmaker(self._thread_writer, expire_on_commit=False)
            self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relaybot-sqlite-writer")
            self._thread_reader = _sqlite_thread_engine(url, writer=False, echo=echo)
            self._thread_read_sessions = sessionmaker(self._thread_reader, expire_on_commit=False)
            self._reader_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relaybot-sqlite-reader")
        else:
            # LIFO: the connection used last is used next. Prepared statements and PostgreSQL's plans for them
            # live per connection (each plans a statement five times before it keeps a generic plan), so a
            # round robin over every pooled connection warmed all of them up: half the planning in a benchmark
            # run went there (pg_stat_statements: 90 → 45 plannings of the intake's inserts, 19 → 11 connections).
            self._writer = create_async_engine(url, echo=echo, pool_size=10, max_overflow=10, pool_use_lifo=True,
                                               pool_pre_ping=True, **JSON_CODEC)
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
        if self.is_sqlite:
            await self._write_lock.acquire()
            await self._lock_file_from_loop()
        try:
            async with self._write_sessions() as session, session.begin():
                _open_for_later(session)
                yield session
                await flush_later(session)
        finally:
            if self.is_sqlite:
                if self._file_lock is not None:
                    self._file_lock.release()
                self._write_lock.release()

    async def _lock_file_from_loop(self) -> None:
        """Take the flock (the `WriteLock` is already held) on the lock thread. If the caller is cancelled while
        it waits, the thread still gets the flock eventually: then both locks are released, in that order. The
        `WriteLock` stays held until then, so no other writer of this process can take the flock on the same
        descriptor meanwhile (where the late release would take it from under them)."""
        file_lock = self._file_lock
        if file_lock is None:
            return
        try:
            locking = asyncio.get_running_loop().run_in_executor(self._lock_thread, file_lock.acquire)
        except BaseException:
            self._write_lock.release()
            raise
        try:
            await asyncio.shield(locking)
        except asyncio.CancelledError:
            def release_both(done: asyncio.Future[None]) -> None:
                if not done.cancelled() and done.exception() is None:
                    file_lock.release()
                self._write_lock.release()

            locking.add_done_callback(release_both)
            raise
        except BaseException:
            self._write_lock.release()
            raise

    async def transaction(self, body: Callable[[AsyncSession], Awaitable[T]], *, urgent: bool = False) -> T:
        """`body(session)` as one write transaction, for the busy paths.

        On SQLite the whole body runs in one hand-off to the writer thread, so it must await nothing but the
        session (it gets a `SyncSessionAsAsync`; anything else raises `SuspendedTransaction` and rolls back).
        On PostgreSQL it is an ordinary `write()` block. `urgent`: somebody waits for it (SQLite: goes first).
        """
        if not self.is_sqlite:
            async with self.write() as session:
                return await body(session)
        await self._write_lock.acquire(urgent=urgent)
        try:
            running = asyncio.get_running_loop().run_in_executor(self._writer_thread, self._run_on_writer_thread,
                                                                 body)
        except BaseException:
            self._write_lock.release()
            raise
        # Released when the thread is done, even if the caller is cancelled meanwhile.
        running.add_done_callback(lambda _: self._write_lock.release())
        return await asyncio.shield(running)

    async def reading(self, body: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """`body(session)` as reads only, for the busy paths: on SQLite in one hand-off to a reader thread (the
        same rules as `transaction`), on PostgreSQL an ordinary `read()` block."""
        if not self.is_sqlite:
            async with self.read() as session:
                return await body(session)
        return await asyncio.get_running_loop().run_in_executor(self._reader_thread, self._run_on_reader_thread,
                                                                body)

    def _run_on_reader_thread(self, body: Callable[[AsyncSession], Awaitable[T]]) -> T:
        # No transaction to end: readers run each SELECT on its own (see `_configure_sqlite`), and closing the
        # session leaves what was loaded readable.
        with self._thread_read_sessions() as session:
            adapter = cast(AsyncSession, SyncSessionAsAsync(session))
            return _run_to_completion(cast(Coroutine[Any, Any, T], body(adapter)))

    def _run_on_writer_thread(self, body: Callable[[AsyncSession], Awaitable[T]]) -> T:
        # Waiting for the flock blocks only this thread, which has nothing else to do meanwhile.
        if self._file_lock is not None:
            self._file_lock.acquire()
        try:
            with self._thread_sessions() as session, session.begin():
                _open_for_later(session)
                adapter = cast(AsyncSession, SyncSessionAsAsync(session))
                result = _run_to_completion(cast(Coroutine[Any, Any, T], body(adapter)))
                _run_to_completion(flush_later(adapter))
                return result
        finally:
            if self._file_lock is not None:
                self._file_lock.release()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self._read_sessions() as session, session.begin():
            yield session

    def skip_locked(self) -> dict[str, Any]:
        """`with_for_update` arguments for claiming rows; SQLite's write lock already makes claims exclusive."""
        return {} if self.is_sqlite else {"skip_locked": True}

    async def check_reachable(self) -> None:
        """Start-up: one connection, or a `ConfigError` that names the database (its password hidden)."""
        try:
            async with self.engine.connect():
                pass
        except Exception as exc:  # whatever the driver raises, at connect time it means the same to the user
            where = make_url(self.url).render_as_string(hide_password=True)
            # SQLAlchemy wraps the driver's error in its own, with a link to its docs: the driver's says it all.
            cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
            cause = cause.__cause__ if isinstance(cause.__cause__, Exception) else cause
            raise ConfigError(f"cannot open the database {where} (RELAYBOT_DATABASE_URL): "
                              f"{type(cause).__name__}: {cause}") from None

    async def ping(self) -> None:
        from sqlalchemy import text

        async with self.read() as session:
            await session.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        if self._thread_writer is not None:
            loop = asyncio.get_running_loop()
            # Each engine closed on its own thread, after whatever that thread still has queued.
            await loop.run_in_executor(self._writer_thread, self._thread_writer.dispose)
            await loop.run_in_executor(self._reader_thread, self._thread_reader.dispose)
            self._writer_thread.shutdown(wait=False)
            self._reader_thread.shutdown(wait=False)
            self._lock_thread.shutdown(wait=False)
        if self._file_lock is not None:
            self._file_lock.close()
        await self._writer.dispose()
        if self._reader is not self._writer:
            await self._reader.dispose()

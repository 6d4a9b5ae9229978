"""A guard for PostgreSQL's planner around the queue scans (`… WHERE <pending> ORDER BY id LIMIT n`).

A new database has no statistics yet, and older ones lag behind a burst: either way PostgreSQL may think a few
dozen rows are pending when thousands are. It then preferred a bitmap scan of every pending row and a sort of
them all, for every batch: the intake sorted 16-27 MB on disk per batch of 100 events (payloads included) in a
live run, and the outbox's lane scan took 3 ms per page at 10,000 pending messages instead of 0.1. Walking the
pending index in order and stopping after n rows is right for any number of pending rows, so inside the guard
bitmap scans and sorts are turned off; afterwards the transaction plans as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

_IN_ORDER = text("SELECT current_setting('enable_bitmapscan'), current_setting('enable_sort'), "
                 "set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true)")
_RESTORE = text("SELECT set_config('enable_bitmapscan', :bitmapscan, true), set_config('enable_sort', :sort, true)")


@contextlib.asynccontextmanager
async def in_index_order(session: AsyncSession, *, postgres: bool) -> AsyncIterator[None]:
    """The statements inside walk their index in order (PostgreSQL; settings local to the transaction). On an
    error the transaction is rolled back anyway, so nothing is restored then."""
    if not postgres:
        yield
        return
    previous = (await session.execute(_IN_ORDER)).one()
    yield
    await session.execute(_RESTORE, {"bitmapscan": str(previous[0]), "sort": str(previous[1])})

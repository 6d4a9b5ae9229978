"""Group commit: callers that want a write at about the same time share one transaction.

A caller submits its item and waits; the first caller starts a flush that takes every item queued so far, writes
them with one call of `write` (one transaction), and hands each caller its own result. Items queued while a
flush runs go in the next one. With one caller at a time this costs nothing; under load it turns N transactions
into a few. If the shared transaction fails, each item is written again on its own, so that only the item that
cannot be written fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, cast

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """`write(items)` returns one result per item, in order."""

    def __init__(self, write: Callable[[list[T]], Awaitable[list[R]]], *, name: str, max_batch: int = 500) -> None:
        self._write = write
        self._name = name
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all())
        return await asyncio.shield(future)

    async def _flush_all(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:self._max_batch], self._queue[self._max_batch:]
            try:
                results = await self._write([item for item, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    log.exception("%s: writing an item failed", self._name)
                    _settle(batch[0][1], exception=exc)
                    continue
                # One bad item must not fail the others (they may come from other senders, other workspaces):
                # the batch's transaction was rolled back, so each is written again on its own.
                log.warning("%s: writing %d items together failed (%s: %s); writing them one at a time",
                            self._name, len(batch), type(exc).__name__, exc)
                for item, future in batch:
                    try:
                        result = (await self._write([item]))[0]
                    except Exception as alone:
                        log.exception("%s: writing an item failed", self._name)
                        _settle(future, exception=alone)
                    else:
                        _settle(future, result=result)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                _settle(future, result=result)

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            await asyncio.gather(self._flusher, return_exceptions=True)


def _settle(future: asyncio.Future[R], *, result: R | None = None, exception: BaseException | None = None) -> None:
    """Hand the caller its result (a caller that stopped waiting has a cancelled future: nothing to do)."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(cast(R, result))

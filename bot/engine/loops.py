"""What the engine, the outbox and the trigger loop share: rounds of work taken from the database, started at
once when this process wakes the loop (new work committed) and otherwise every `interval`, with the tasks each
round starts left to finish when the loop stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Hashable
from typing import Any

log = logging.getLogger(__name__)


class Wakeup:
    """A level-triggered nudge between tasks of one process."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.count = 0  # how many times news came: lets a task tell whether new work was committed meanwhile

    def set(self, *, news: bool = True) -> None:
        """`news`: new work was committed (counted); False: the loop only has room to look again."""
        self.count += news
        self._event.set()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()
        self._event.clear()


class WorkLoop:
    """Subclasses implement `tick()`: one round, truthy when there may be more to do at once."""

    name = "loop"

    def __init__(self, *, interval: float) -> None:
        self.interval = interval
        self.wakeup = Wakeup()
        self._active: dict[Hashable, asyncio.Task[Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        self.wakeup.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._stopping

    async def tick(self) -> Any:
        raise NotImplementedError

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name=f"relaybot-{self.name}")

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                busy = await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s round failed; trying again", self.name)
                busy = False
            if not busy:
                await self.wakeup.wait(self.interval)

    async def stop(self, grace: float = 5.0) -> None:
        """Let the current round finish (a transaction is never cut in half), then the tasks it started; what
        does not finish within `grace` is cancelled and resumes elsewhere when its lease expires."""
        self._stopping = True
        if self._task is not None:
            self.wakeup.set()
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._active:
            _done, pending = await asyncio.wait(list(self._active.values()), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.after_stop()

    async def after_stop(self) -> None:
        """Anything to hand back once nothing of this loop runs any more."""

"""Webhooks first: while many senders wait at the door, new runs are started at a slower pace.

Accepting a webhook costs a small part of what its run costs (the run's records, its card, its thread), and both
share the one core a process has. In a burst, starting runs as fast as they arrive would slow every answer; a
sender may give up on a slow answer (GitHub waits 10 s) and not all of them retry, while a card that comes a few
seconds later does no harm. So while requests pile up at the door, the engine rests after each batch of new runs
for a multiple of the time that batch took: the door gets most of the process, the engine keeps a guaranteed
share of it, and works off what was accepted as soon as the burst ends. Nothing is dropped: every accepted event
is already stored.

What the door may not do is accept without end: when the events waiting to become runs reach
`RELAYBOT_MAX_BACKLOG` (the engine counts them, at most once a second while it has a backlog), new webhooks are
answered `503` with `Retry-After` until the engine has caught up below it, so a flood never fills the disk.
"""

from __future__ import annotations

import asyncio

BUSY_AT = 32  # requests waiting at the door at once that count as a burst (a steady 200/s keeps a few)
REST_FACTOR = 5.0  # rest this many times as long as the last batch took: the engine keeps a sixth
LONGEST_REST = 0.5  # seconds


class DoorFirst:
    def __init__(self, *, busy_at: int = BUSY_AT, rest_factor: float = REST_FACTOR,
                 longest_rest: float = LONGEST_REST, max_backlog: int = 0) -> None:
        self.busy_at = busy_at
        self.rest_factor = rest_factor
        self.longest_rest = longest_rest
        self.max_backlog = max_backlog  # 0: no limit
        self.waiting = 0  # requests in the webhook door right now
        self.backlog = 0  # stored events not yet taken by the engine, as last counted (up to `max_backlog`)

    @property
    def full(self) -> bool:
        """Too many events wait to become runs: the door refuses new ones for now."""
        return bool(self.max_backlog) and self.backlog >= self.max_backlog

    def entered(self) -> None:
        self.waiting += 1

    def left(self) -> None:
        self.waiting -= 1

    @property
    def busy(self) -> bool:
        return self.waiting >= self.busy_at

    async def rest_after(self, took: float) -> None:
        """Called by the engine after a batch of new runs that took `took` seconds."""
        if self.busy:
            await asyncio.sleep(min(self.longest_rest, took * self.rest_factor))

"""A clock that moves only when a test moves it, handed to the bot's poll and schedule triggers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bot.app import build_services
from tests import conftest


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.moment = start

    def now(self) -> datetime:
        return self.moment

    def advance(self, **delta: Any) -> datetime:
        self.moment += timedelta(**delta)
        return self.moment

    def set(self, moment: datetime) -> None:
        self.moment = moment


def install(monkeypatch: pytest.MonkeyPatch, start: datetime) -> FakeClock:
    """Every bot that `make_bot` starts in this test reads this clock."""
    clock = FakeClock(start.astimezone(UTC))

    def build_with_clock(*args: Any, **kwargs: Any) -> Any:
        return build_services(*args, clock=clock.now, **kwargs)

    monkeypatch.setattr(conftest, "build_services", build_with_clock)
    return clock

"""A clock a test sets by hand, for code that takes `clock` (the current UTC time).

Timing decisions (quiet periods) are then asserted at exact instants instead of
by sleeping and hoping the machine kept up.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from storage.models import utcnow


class FakeClock:
    """Stands still until the test moves it; starts at the real time."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or utcnow()

    def __call__(self) -> datetime:
        return self.now

    def set(self, at: datetime, plus_s: float = 0.0) -> None:
        self.now = at + timedelta(seconds=plus_s)

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

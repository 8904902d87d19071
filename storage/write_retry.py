"""Retrying a job-store write that records an outcome (a failure, an export attempt).

Why: such a write is the only trace of what happened. When it failed once
(SQLite "database is locked" under a long writer, a full disk being cleared),
the worker left the job `running` until the next restart, and the exporter
lost the attempt. A short, bounded retry rides out those moments; a store that
stays broken still raises, to be logged by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import structlog
from sqlalchemy.exc import SQLAlchemyError

T = TypeVar("T")
log = structlog.get_logger(__name__)

RETRY_DELAYS_S = (0.1, 0.3, 1.0, 3.0, 10.0)  # about 15 s in all: a busy store, not a broken one


def retry_write(write: Callable[[], T], what: str, delays_s: tuple[float, ...] = RETRY_DELAYS_S) -> T:
    """`write()`, tried again after each of `delays_s` while it raises a database error."""
    for delay in delays_s:
        try:
            return write()
        except SQLAlchemyError as exc:
            log.warning("store.write_retry", what=what, error=str(exc), retry_in_s=delay)
            time.sleep(delay)
    return write()

"""Logging and slowing down a loop that may fail on every turn (disk full, index busy)."""

from __future__ import annotations

import time
from collections.abc import Callable

from node.log import get_logger

log = get_logger(__name__)

# A loop that keeps failing the same way (disk full) logs once, then once per this period with
# the number of failures in between; it also slows down, up to ERROR_BACKOFF_MAX_S.
ERROR_LOG_PERIOD_S = 60.0
ERROR_BACKOFF_MAX_S = 5.0


class RepeatedError:
    """Logging for a loop that may fail on every turn: the first error of a run is logged,
    the same error again only once per ERROR_LOG_PERIOD_S (with how many there were), and the
    loop's wait doubles up to ERROR_BACKOFF_MAX_S while it keeps failing."""

    def __init__(self, event: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.event = event
        self._clock = clock
        self._failures = 0
        self._suppressed = 0
        self._last_type: str | None = None
        self._logged_at = 0.0

    def record(self, exc: BaseException) -> None:
        now = self._clock()
        kind = type(exc).__name__
        self._failures += 1
        if kind == self._last_type and now - self._logged_at < ERROR_LOG_PERIOD_S:
            self._suppressed += 1
            return
        log.error(self.event, error_type=kind, count=self._suppressed + 1)
        self._last_type, self._logged_at, self._suppressed = kind, now, 0

    def clear(self) -> None:
        if self._failures and self._last_type is not None:
            log.info(f"{self.event}_cleared", count=self._failures)
        self._failures, self._suppressed, self._last_type = 0, 0, None

    def wait_s(self, interval_s: float) -> float:
        if not self._failures:
            return interval_s
        return float(min(ERROR_BACKOFF_MAX_S, interval_s * 2.0 ** min(self._failures, 16)))

"""When a study counts as complete: a quiet period, or every series at its expected count.

Pure: no clock, no I/O. The scheduler passes the times and counts it read from the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# After the expected counts are reached, wait this long (capped by the quiet period) so the
# last few instances of a burst in flight are not split into a second, re-opening job.
EXPECTED_COUNT_SETTLE_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesCount:
    """How many instances of one series arrived, and how many its header says to expect."""

    series_uid: str
    received: int
    expected: int | None  # from ImagesInAcquisition (x NumberOfTemporalPositions); None: unknown


class ReadyKind(StrEnum):
    """Why a study is (or is not yet) ready."""

    WAITING = "waiting"
    QUIET_PERIOD = "quiet-period"
    EXPECTED_COUNTS = "expected-counts"
    MAX_WAIT = "max-wait"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadyDecision:
    """Whether a study is ready now, why, and how long until it would be at the latest."""

    ready: bool
    kind: ReadyKind
    wait_s: float  # 0 when ready; else seconds until the quiet period ends


def all_series_complete(series: tuple[SeriesCount, ...]) -> bool:
    """True when there is at least one series and each has a hint it has reached."""
    return bool(series) and all(s.expected is not None and s.received >= s.expected for s in series)


def decide_ready(
    *,
    last_instance_at: float,
    now: float,
    quiet_period_s: float,
    series: tuple[SeriesCount, ...],
    use_expected_counts: bool = True,
    first_instance_at: float | None = None,
    max_wait_s: float | None = None,
) -> ReadyDecision:
    """Decide if a receiving study is ready: quiet long enough, complete by its hints, or
    waited for `max_wait_s` since `first_instance_at` (a study that never stops trickling)."""
    if quiet_period_s <= 0:
        raise ValueError("quiet_period_s must be positive")
    if max_wait_s is not None and max_wait_s <= 0:
        raise ValueError("max_wait_s must be positive")
    idle = max(0.0, now - last_instance_at)
    if idle >= quiet_period_s:
        return ReadyDecision(ready=True, kind=ReadyKind.QUIET_PERIOD, wait_s=0.0)
    if (
        max_wait_s is not None
        and first_instance_at is not None
        and now - first_instance_at >= max_wait_s
    ):
        return ReadyDecision(ready=True, kind=ReadyKind.MAX_WAIT, wait_s=0.0)
    settle = min(EXPECTED_COUNT_SETTLE_S, quiet_period_s)
    if use_expected_counts and all_series_complete(series) and idle >= settle:
        return ReadyDecision(ready=True, kind=ReadyKind.EXPECTED_COUNTS, wait_s=0.0)
    return ReadyDecision(ready=False, kind=ReadyKind.WAITING, wait_s=quiet_period_s - idle)


# A study that has been idle this long (0.15 of its quiet period, 0.25-5 s) is processed up to
# REPORT speculatively by an idle worker (node.pipeline.speculate): the quiet period would
# otherwise be dead time on the SR's path. Early enough that the stages before REPORT (about
# 2.3 s of CPU for 231 instances, Run 13) are mostly done when a 2 s period ends; late enough
# that a sender's pause between two instances of one series rarely sets it off (a speculation
# that a later instance makes useless runs on an idle worker only, and the job recomputes).
SPECULATE_FRACTION = 0.15
SPECULATE_MIN_S = 0.25
SPECULATE_MAX_S = 5.0


def speculate_after_s(quiet_period_s: float) -> float:
    """How long a receiving study must have been idle before its stages up to REPORT run
    speculatively (always before its quiet period ends)."""
    if quiet_period_s <= 0:
        raise ValueError("quiet_period_s must be positive")
    wanted = min(SPECULATE_MAX_S, max(SPECULATE_MIN_S, quiet_period_s * SPECULATE_FRACTION))
    return min(wanted, quiet_period_s / 2)

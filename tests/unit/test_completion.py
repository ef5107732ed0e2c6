"""Completion timing: quiet period, expected-count hints and their settle time."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.ingest.completion import ReadyKind, SeriesCount, all_series_complete, decide_ready


def _s(received: int, expected: int | None, uid: str = "1.2") -> SeriesCount:
    return SeriesCount(series_uid=uid, received=received, expected=expected)


def test_not_ready_inside_quiet_period() -> None:
    d = decide_ready(last_instance_at=100.0, now=110.0, quiet_period_s=20.0, series=(_s(3, None),))
    assert not d.ready
    assert d.kind is ReadyKind.WAITING
    assert d.wait_s == pytest.approx(10.0)


def test_ready_exactly_at_quiet_period() -> None:
    d = decide_ready(last_instance_at=100.0, now=120.0, quiet_period_s=20.0, series=(_s(3, None),))
    assert d.ready and d.kind is ReadyKind.QUIET_PERIOD and d.wait_s == 0.0


def test_half_second_quiet_period_for_tests() -> None:
    assert not decide_ready(last_instance_at=0.0, now=0.49, quiet_period_s=0.5, series=()).ready
    assert decide_ready(last_instance_at=0.0, now=0.5, quiet_period_s=0.5, series=()).ready


def test_expected_counts_make_ready_sooner_after_settle() -> None:
    series = (_s(24, 24, "1.1"), _s(30, 10, "1.2"))
    early = decide_ready(last_instance_at=100.0, now=100.5, quiet_period_s=20.0, series=series)
    assert not early.ready  # inside the 1 s settle
    d = decide_ready(last_instance_at=100.0, now=101.0, quiet_period_s=20.0, series=series)
    assert d.ready and d.kind is ReadyKind.EXPECTED_COUNTS


def test_settle_is_capped_by_quiet_period() -> None:
    d = decide_ready(last_instance_at=0.0, now=0.6, quiet_period_s=0.5, series=(_s(2, 2),))
    assert d.ready and d.kind is ReadyKind.QUIET_PERIOD
    d = decide_ready(last_instance_at=0.0, now=0.4, quiet_period_s=0.5, series=(_s(2, 2),))
    assert not d.ready


def test_one_incomplete_series_blocks_early_ready() -> None:
    series = (_s(24, 24, "1.1"), _s(5, 10, "1.2"))
    d = decide_ready(last_instance_at=100.0, now=105.0, quiet_period_s=20.0, series=series)
    assert not d.ready


def test_series_without_hint_blocks_early_ready() -> None:
    series = (_s(24, 24, "1.1"), _s(1, None, "1.2"))
    assert not decide_ready(last_instance_at=0.0, now=5.0, quiet_period_s=20.0, series=series).ready


def test_hints_ignored_when_disabled() -> None:
    d = decide_ready(
        last_instance_at=0.0,
        now=5.0,
        quiet_period_s=20.0,
        series=(_s(24, 24),),
        use_expected_counts=False,
    )
    assert not d.ready


def test_all_series_complete() -> None:
    assert not all_series_complete(())
    assert all_series_complete((_s(3, 3), _s(4, 3)))
    assert not all_series_complete((_s(2, 3),))


def test_clock_going_backwards_is_not_ready() -> None:
    d = decide_ready(last_instance_at=100.0, now=90.0, quiet_period_s=5.0, series=())
    assert not d.ready and d.wait_s == pytest.approx(5.0)


def test_quiet_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="quiet_period_s"):
        decide_ready(last_instance_at=0.0, now=1.0, quiet_period_s=0.0, series=())


def test_completion_is_pure() -> None:
    import node.ingest.completion as mod

    src = Path(str(mod.__file__)).read_text(encoding="utf-8")
    for forbidden in ("import time", "import os", "sqlite3", "pynetdicom", "open("):
        assert forbidden not in src

"""Metrics: AUC, bootstrap CI, confusion-derived rates, ECE, temperature fitting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from node.lab.train import metrics


def test_auc_perfect_inverted_and_ties() -> None:
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert metrics.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    # one of four pairs misordered
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.6, 0.5, 0.9]) == pytest.approx(0.75)
    assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))


def test_auc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    p = np.round(rng.random(60), 1)  # many ties
    pos, neg = p[y == 1], p[y == 0]
    expected = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert metrics.roc_auc(y, p) == pytest.approx(expected)


def test_bootstrap_ci_brackets_auc() -> None:
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 50)
    p = np.clip(y * 0.3 + rng.random(100) * 0.7, 0, 1)
    auc = metrics.roc_auc(y, p)
    lo, hi = metrics.bootstrap_auc_ci(y, p, n_boot=500, seed=3)
    assert lo < auc < hi
    assert 0.0 < hi - lo < 0.3


def test_binary_report_rates() -> None:
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.3, 0.6, 0.1, 0.2, 0.4]
    r = metrics.binary_report(y, p, n_boot=200)
    assert r["confusion"] == {"tp": 2, "fp": 1, "tn": 3, "fn": 1}
    assert r["sensitivity"] == pytest.approx(2 / 3)
    assert r["specificity"] == pytest.approx(3 / 4)
    assert r["ppv"] == pytest.approx(2 / 3)
    assert r["npv"] == pytest.approx(3 / 4)
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["n_patients"] == 7
    assert len(r["auc_ci"]) == 2


def test_ece_zero_when_calibrated_and_large_when_not() -> None:
    # 10 predictions of 0.25 with 25% positives (rounded to 8 of 32) -> perfectly calibrated bin
    y = np.array([1] * 8 + [0] * 24)
    p = np.full(32, 0.25)
    assert metrics.expected_calibration_error(y, p) == pytest.approx(0.0)
    assert metrics.expected_calibration_error([1, 0], [0.0, 1.0]) == pytest.approx(1.0)
    bins = metrics.reliability_bins(y, p)
    assert [b.count for b in bins][2] == 32
    assert sum(b.count for b in bins) == 32


def test_reliability_bin_edges() -> None:
    bins = metrics.reliability_bins([1, 0, 1], [1.0, 0.0, 0.1], n_bins=10)
    assert bins[-1].count == 1  # p == 1 lands in the last bin
    assert bins[0].count == 1
    assert bins[1].count == 1


def test_fit_temperature_recovers_scale() -> None:
    rng = np.random.default_rng(4)
    true_logit = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    t = metrics.fit_temperature(true_logit * 3.0, y)  # over-confident by 3x
    assert t == pytest.approx(3.0, rel=0.15)
    multi = np.stack([np.zeros(4000), true_logit * 3.0], axis=1)
    assert metrics.fit_temperature(multi, y) == pytest.approx(t, rel=1e-3)


def test_multiclass_report() -> None:
    r = metrics.multiclass_report([0, 0, 1, 2], [0, 1, 1, 2], ("a", "b", "c"))
    assert r["accuracy"] == pytest.approx(0.75)
    assert r["confusion"]["a"] == {"a": 1, "b": 1, "c": 0}
    assert r["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert r["per_class"]["a"]["recall"] == pytest.approx(0.5)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="y_true"):
        metrics.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="probabilities"):
        metrics.roc_auc([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="values"):
        metrics.roc_auc([0, 1, 1], [0.1, 0.2])


def test_fit_platt_recovers_slope_and_bias() -> None:
    rng = np.random.default_rng(5)
    z = rng.normal(0, 2, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(int)
    a, b = metrics.fit_platt(z, y)
    assert a == pytest.approx(0.5, abs=0.08)
    assert b == pytest.approx(-1.0, abs=0.12)
    assert metrics.fit_platt([1.0, 2.0], [1, 1]) == (1.0, 0.0)  # one class: identity


def test_ece_floor_of_a_calibrated_model_shrinks_with_n() -> None:
    from node.lab.train.metrics import ece_if_calibrated

    rng = np.random.default_rng(0)
    small = ece_if_calibrated(rng.random(60), seed=1)
    large = ece_if_calibrated(rng.random(6000), seed=1)
    assert 0 < large[0] < small[0] and small[0] <= small[1]
    assert large[1] < 0.03  # thousands of studies: calibration is measurable to ~0.01
    p = rng.random(400)
    y = (rng.random(400) < p).astype(float)
    _mean, hi = ece_if_calibrated(p, seed=2)
    # a calibrated model lands in the range, an over-confident-positive one does not
    assert metrics.expected_calibration_error(y, p) < hi + 0.02
    assert metrics.expected_calibration_error(y, np.clip(p * 0.5 + 0.5, 0, 1)) > hi


def test_fit_platt_converges_from_far_away_logits() -> None:
    """Logits all near -3 (a detector's log10 volume fraction): a plain Newton step from the
    identity overshoots and diverged to slopes of +-30,000; the damped fit matches a general
    optimiser's answer."""
    from scipy.optimize import minimize

    z = np.array([-4 + 1.0 * (i % 2) + 0.3 * (i % 7) for i in range(40)])
    y = np.array([i % 2 for i in range(40)], dtype=float)
    x = np.stack([z, np.ones_like(z)], axis=1)

    def loss(w: np.ndarray) -> float:
        s = x @ w
        return float(np.sum(np.logaddexp(0.0, s) - y * s) + 0.5e-3 * float(w @ w))

    ref = minimize(loss, np.zeros(2), method="BFGS").x
    a, b = metrics.fit_platt(z, y)
    assert a == pytest.approx(ref[0], rel=1e-3) and b == pytest.approx(ref[1], rel=1e-3)
    assert metrics.fit_platt(z, 1 - y)[0] < 0

"""Study-level fusion: exact values, missing inputs, bands, and properties over random inputs."""

from __future__ import annotations

import math

import pytest

from node.config import ModelRoute, Rules, TaskSettings
from node.ensemble import (
    EPS,
    clip_probability,
    effective_temperature,
    fuse_study,
    fuse_task,
    logit,
    sigmoid,
)
from node.records import FindingStatus, SequenceLabel, SeriesPrediction

METHODS = ("weighted_mean_logit", "weighted_mean_probability", "max_weight")


def task_settings(
    routes: dict[str, float],
    method: str = "weighted_mean_logit",
    temperature: float = 1.0,
    band: tuple[float, float] = (0.35, 0.65),
) -> TaskSettings:
    return TaskSettings.model_validate(
        {
            "positive_label": "glioblastoma",
            "negative_label": "primary CNS lymphoma",
            "models": [
                {"bundle": b, "sequences": [SequenceLabel.T1C], "weight": w}
                for b, w in routes.items()
            ],
            "method": method,
            "temperature": temperature,
            "indeterminate_band": band,
        }
    )


def pred(bundle: str, p: float, series: str = "1.2.3", task: str = "gbm_pcnsl") -> SeriesPrediction:
    return SeriesPrediction(
        task=task,
        model_id=bundle,
        model_version="1.0.0",
        series_uid=series,
        sequence=SequenceLabel.T1C,
        probability=p,
        slice_indices=(0,),
        slice_probabilities=(p,),
    )


# --- exact values --------------------------------------------------------------------------------


def test_logit_and_sigmoid_are_inverse_and_clipped() -> None:
    assert sigmoid(logit(0.8)) == pytest.approx(0.8)
    assert logit(0.5) == 0.0
    assert math.isfinite(logit(0.0)) and math.isfinite(logit(1.0))
    assert clip_probability(0.0) == EPS and clip_probability(1.0) == 1 - EPS
    assert sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0


def test_weighted_mean_logit_value() -> None:
    rules = task_settings({"a": 1.0, "b": 0.5})
    f = fuse_task("gbm_pcnsl", rules, [pred("a", 0.9), pred("b", 0.2, series="9")])
    expected = sigmoid((1.0 * logit(0.9) + 0.5 * logit(0.2)) / 1.5)
    assert f.probability == pytest.approx(expected)
    assert f.status is FindingStatus.PRESENT  # ~0.766
    assert "weighted mean logit" in f.method and "a (weight 1" in f.method
    assert f.positive_label == "glioblastoma"
    assert [c.model_id for c in f.contributions] == ["a", "b"]


def test_weighted_mean_probability_value() -> None:
    rules = task_settings({"a": 3.0, "b": 1.0}, method="weighted_mean_probability")
    f = fuse_task("gbm_pcnsl", rules, [pred("a", 0.8), pred("b", 0.4)])
    assert f.probability == pytest.approx((3 * 0.8 + 0.4) / 4)


def test_max_weight_takes_the_heaviest_model_that_ran_and_averages_ties() -> None:
    rules = task_settings({"a": 1.0, "b": 2.0, "c": 2.0}, method="max_weight")
    f = fuse_task("gbm_pcnsl", rules, [pred("a", 0.9), pred("b", 0.2), pred("c", 0.4)])
    assert f.probability == pytest.approx(0.3)
    only_a = fuse_task("gbm_pcnsl", rules, [pred("a", 0.9)])
    assert only_a.probability == pytest.approx(0.9)


def test_temperature_scales_the_fused_logit() -> None:
    f = fuse_task("gbm_pcnsl", task_settings({"a": 1.0}, temperature=2.0), [pred("a", 0.9)])
    assert f.probability == pytest.approx(sigmoid(logit(0.9) / 2.0))
    assert "temperature 2" in f.method


def test_fitted_temperature_applies_in_full_only_when_every_route_ran() -> None:
    rules = task_settings({"t1c": 1.0, "adc": 0.5}, temperature=0.4)
    both = fuse_task("gbm_pcnsl", rules, [pred("t1c", 0.8), pred("adc", 0.7, series="9")])
    fused = (logit(0.8) + 0.5 * logit(0.7)) / 1.5
    assert both.probability == pytest.approx(sigmoid(fused / 0.4))
    # one of two ran: nothing was pooled, so the bundle keeps its own calibration
    alone = fuse_task("gbm_pcnsl", rules, [pred("adc", 0.7, series="9")])
    assert alone.probability == pytest.approx(0.7)
    assert "temperature 0.4 applied for 1 of 2 models" in alone.method


@pytest.mark.parametrize(
    ("t", "k", "n", "method", "expected"),
    [
        (0.4, 2, 2, "weighted_mean_logit", 0.4),
        (0.4, 1, 2, "weighted_mean_logit", 1.0),
        (0.4, 2, 3, "weighted_mean_probability", 0.7),
        (2.0, 3, 3, "weighted_mean_logit", 2.0),
        (0.4, 1, 2, "max_weight", 0.4),
        (0.4, 1, 1, "weighted_mean_logit", 0.4),
    ],
)
def test_effective_temperature(t: float, k: int, n: int, method: str, expected: float) -> None:
    assert effective_temperature(t, k, n, method) == pytest.approx(expected)


def test_several_series_of_one_bundle_are_averaged_before_weighting() -> None:
    rules = task_settings({"flair": 1.0, "t2": 1.0})
    preds = [pred("flair", 0.9, "1"), pred("flair", 0.7, "2"), pred("t2", 0.2, "3")]
    f = fuse_task("gbm_pcnsl", rules, preds)
    flair = (logit(0.9) + logit(0.7)) / 2
    assert f.probability == pytest.approx(sigmoid((flair + logit(0.2)) / 2))
    assert "2 series averaged" in f.method
    assert len(f.contributions) == 3


def test_no_predictions_is_not_assessable_with_reason() -> None:
    f = fuse_task("gbm_pcnsl", task_settings({"a": 1.0, "b": 0.5}), [])
    assert f.status is FindingStatus.NOT_ASSESSABLE
    assert f.probability is None
    assert f.contributions == ()
    assert "T1C" in f.reason and "a, b" in f.reason


def test_predictions_of_other_tasks_and_unknown_bundles_are_ignored() -> None:
    rules = task_settings({"a": 1.0})
    f = fuse_task("gbm_pcnsl", rules, [pred("a", 0.9, task="tubers"), pred("zzz", 0.9)])
    assert f.status is FindingStatus.NOT_ASSESSABLE


def test_non_finite_prediction_is_dropped_and_named() -> None:
    rules = task_settings({"a": 1.0, "b": 1.0})
    f = fuse_task("gbm_pcnsl", rules, [pred("a", float("nan")), pred("b", 0.1)])
    assert f.probability == pytest.approx(0.1)
    assert "ignored" in f.reason and "a" in f.reason
    assert f.status is FindingStatus.ABSENT


def test_missing_model_named_in_method() -> None:
    f = fuse_task("gbm_pcnsl", task_settings({"a": 1.0, "b": 0.5}), [pred("a", 0.5)])
    assert "not run: b" in f.method
    assert f.status is FindingStatus.INDETERMINATE


@pytest.mark.parametrize(
    ("p", "status"),
    [
        (0.65, FindingStatus.PRESENT),
        (0.6500001, FindingStatus.PRESENT),
        (0.6499999, FindingStatus.INDETERMINATE),
        (0.5, FindingStatus.INDETERMINATE),
        (0.3500001, FindingStatus.INDETERMINATE),
        (0.35, FindingStatus.ABSENT),
        (0.0, FindingStatus.ABSENT),
        (1.0, FindingStatus.PRESENT),
    ],
)
def test_band_boundaries(p: float, status: FindingStatus) -> None:
    for method in METHODS:
        f = fuse_task("gbm_pcnsl", task_settings({"a": 1.0}, method=method), [pred("a", p)])
        assert f.status is status, (method, p, f.probability)


def test_fuse_study_covers_enabled_tasks_in_order() -> None:
    tasks = Rules().tasks
    tasks = {
        **tasks,
        "glioma_grade": tasks["glioma_grade"].model_copy(update={"enabled": False}),
        "tubers": tasks["tubers"].model_copy(update={"enabled": True}),
    }
    rules = Rules().model_copy(update={"tasks": tasks})
    findings = fuse_study(rules, [pred("tubers_t2", 0.95, task="tubers")])
    assert [f.task for f in findings] == ["tumour", "gbm_pcnsl", "tubers"]
    assert findings[1].status is FindingStatus.NOT_ASSESSABLE
    assert findings[2].status is FindingStatus.PRESENT
    assert findings[2].positive_label == "cortical tubers"


def test_model_route_weight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        ModelRoute.model_validate({"bundle": "a", "sequences": ["T1C"], "weight": 0})

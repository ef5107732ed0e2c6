"""Ensemble evaluation and fitting: recovered coefficients, the served fusion, rule-file output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from node.config import TaskSettings
from node.ensemble import fuse_task, logit, sigmoid
from node.lab.train.data import DataError
from node.lab.train.ensemble_eval import (
    StudyOutputs,
    bundle_logits,
    evaluate_ensemble,
    fit_ensemble,
    fit_weights,
    rules_snippet,
)
from node.records import SequenceLabel, SeriesPrediction


def settings(weights: dict[str, float], temperature: float = 1.0) -> TaskSettings:
    return TaskSettings.model_validate(
        {
            "positive_label": "glioblastoma",
            "negative_label": "primary CNS lymphoma",
            "models": [
                {"bundle": b, "sequences": [seq], "weight": w}
                for (b, w), seq in zip(weights.items(), ("T1C", "ADC", "FLAIR"), strict=False)
            ],
            "temperature": temperature,
        }
    )


def pred(bundle: str, p: float, series: str) -> SeriesPrediction:
    return SeriesPrediction(
        task="gbm_pcnsl",
        model_id=bundle,
        model_version="1",
        series_uid=series,
        sequence=SequenceLabel.T1C,
        probability=p,
        slice_indices=(0,),
        slice_probabilities=(p,),
    )


def simulated(n: int, coef: tuple[float, float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of two calibrated-looking models and truths drawn from sigmoid(coef . z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, 2))
    z[:, 1] = 0.6 * z[:, 0] + 0.8 * z[:, 1]  # correlated evidence, as two sequences of one tumour
    p = 1.0 / (1.0 + np.exp(-(z @ np.asarray(coef))))
    y = (rng.random(n) < p).astype(float)
    return z, y


def outputs_from(z: np.ndarray, y: np.ndarray, names: tuple[str, str]) -> list[StudyOutputs]:
    out = []
    for i in range(len(y)):
        preds = tuple(
            pred(name, sigmoid(float(z[i, j])), f"{i}.{j}")
            for j, name in enumerate(names)
            if math.isfinite(z[i, j])
        )
        out.append(StudyOutputs(study_uid=str(i), truth=int(y[i]), predictions=preds))
    return out


def test_fit_weights_recovers_the_generating_coefficients() -> None:
    z, y = simulated(20000, (1.5, 0.5))
    weights, temperature = fit_weights(z, y)
    # c = (1.5, 0.5) is weights (1, 1/3) with temperature 1 / (1.5 + 0.5)
    assert weights[0] == pytest.approx(1.0)
    assert weights[1] == pytest.approx(1 / 3, abs=0.06)
    assert temperature == pytest.approx(0.5, abs=0.03)


def test_fit_weights_keeps_weights_positive_and_skips_incomplete_rows() -> None:
    z, y = simulated(4000, (1.0, 0.0), seed=1)
    z[:50, 1] = np.nan  # a missing ADC in 50 studies
    weights, temperature = fit_weights(z, y)
    assert weights[0] == 1.0 and 0 < weights[1] < 0.1  # a useless model gets a tiny weight
    assert temperature == pytest.approx(1.0, abs=0.1)


def test_fit_weights_needs_both_classes() -> None:
    with pytest.raises(DataError, match="both classes"):
        fit_weights(np.ones((5, 2)), np.ones(5))
    with pytest.raises(ValueError, match="studies, bundles"):
        fit_weights(np.ones(5), np.ones(5))


def test_bundle_logits_average_series_and_mark_missing() -> None:
    study = StudyOutputs(
        study_uid="s",
        truth=1,
        predictions=(pred("a", 0.9, "1"), pred("a", 0.6, "2")),
    )
    z = bundle_logits([study], ["a", "b"])
    assert z[0, 0] == pytest.approx((logit(0.9) + logit(0.6)) / 2)
    assert math.isnan(z[0, 1])


def test_fit_ensemble_lowers_the_log_loss_and_writes_a_valid_rule_snippet() -> None:
    z, y = simulated(3000, (1.2, 0.8), seed=2)
    task = settings({"gbm_pcnsl_t1c": 1.0, "gbm_pcnsl_adc": 0.5})
    outputs = outputs_from(z, y, ("gbm_pcnsl_t1c", "gbm_pcnsl_adc"))
    fit = fit_ensemble("gbm_pcnsl", task, outputs)
    assert fit.n_studies == 3000
    assert fit.nll_fitted < fit.nll_rules
    assert fit.temperature == pytest.approx(0.5, abs=0.05)
    snippet = rules_snippet("gbm_pcnsl", task, fit)
    parsed = yaml.safe_load("tasks:\n" + snippet)["tasks"]["gbm_pcnsl"]
    merged = task.model_dump() | parsed
    fitted = TaskSettings.model_validate(merged)
    assert fitted.temperature == fit.temperature
    assert [m.weight for m in fitted.models] == [
        fit.weights["gbm_pcnsl_t1c"],
        fit.weights["gbm_pcnsl_adc"],
    ]


def test_evaluate_ensemble_uses_the_served_fusion_and_compares_with_the_best_model() -> None:
    rng = np.random.default_rng(3)
    n = 400
    y = (rng.random(n) < 0.5).astype(float)
    good = np.where(y == 1, 2.0, -2.0) + rng.normal(0, 1.5, n)
    noise = rng.normal(0, 1.0, n)
    z = np.stack([good, noise], axis=1)
    z[:20, 0] = np.nan  # 20 studies without the good model's sequence
    task = settings({"good": 1.0, "noise": 0.01})
    outputs = outputs_from(z, y, ("good", "noise"))
    report = evaluate_ensemble("gbm_pcnsl", task, outputs, seed=0)
    first = fuse_task("gbm_pcnsl", task, outputs[0].predictions).probability
    assert first is not None
    assert report["n_patients"] == n and report["n_not_assessable"] == 0
    assert report["single_models"]["good"]["n_patients"] == n - 20
    cmp = report["comparison"]
    assert cmp["n_patients"] == n - 20
    assert cmp["best_single_model"] == "good"
    assert cmp["ensemble_auc"] == pytest.approx(cmp["best_single_auc"], abs=0.01)
    lo, hi = cmp["auc_difference_ci"]
    assert lo <= cmp["auc_difference"] <= hi
    # the noise model alone is far worse than the ensemble
    assert report["single_models"]["noise"]["auc"] < report["auc"] - 0.2


def test_evaluate_ensemble_counts_studies_no_model_could_read() -> None:
    outputs = [
        StudyOutputs(study_uid="1", truth=1, predictions=(pred("a", 0.8, "1"),)),
        StudyOutputs(study_uid="2", truth=0, predictions=(pred("a", 0.3, "2"),)),
        StudyOutputs(study_uid="3", truth=0, predictions=()),
    ]
    report = evaluate_ensemble("gbm_pcnsl", settings({"a": 1.0}), outputs)
    assert report["n_not_assessable"] == 1
    assert report["ensemble"]["n_patients"] == 2

"""Properties of the study-level fusion over random inputs (hypothesis)."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("hypothesis", reason="property tests need hypothesis (test extra)")

from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import TaskSettings
from node.ensemble import effective_temperature, fuse_task, logit, sigmoid
from node.records import FindingStatus, SeriesPrediction
from tests.unit.test_ensemble import METHODS, pred, task_settings

prob = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
weight = st.floats(min_value=0.01, max_value=100.0, allow_nan=False)
temperature = st.floats(min_value=0.05, max_value=20.0, allow_nan=False)
method = st.sampled_from(METHODS)
BUNDLES = ("a", "b", "c", "d")


@st.composite
def scenario(draw: st.DrawFn) -> tuple[TaskSettings, list[SeriesPrediction]]:
    n_bundles = draw(st.integers(min_value=1, max_value=4))
    weights = {b: draw(weight) for b in BUNDLES[:n_bundles]}
    rules = task_settings(weights, method=draw(method), temperature=draw(temperature))
    preds = [
        pred(draw(st.sampled_from(BUNDLES[:n_bundles])), draw(prob), series=str(i))
        for i in range(draw(st.integers(min_value=1, max_value=8)))
    ]
    return rules, preds


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_output_is_a_probability(case: tuple[TaskSettings, list[SeriesPrediction]]) -> None:
    rules, preds = case
    f = fuse_task("gbm_pcnsl", rules, preds)
    assert f.probability is not None and 0.0 <= f.probability <= 1.0
    assert f.status is not FindingStatus.NOT_ASSESSABLE
    assert len(f.contributions) == len(preds)


@settings(max_examples=200, deadline=None)
@given(scenario(), st.randoms())
def test_permutation_invariant(
    case: tuple[TaskSettings, list[SeriesPrediction]], rnd: random.Random
) -> None:
    rules, preds = case
    shuffled = list(preds)
    rnd.shuffle(shuffled)
    a = fuse_task("gbm_pcnsl", rules, preds)
    b = fuse_task("gbm_pcnsl", rules, shuffled)
    assert a.probability == b.probability
    assert a.status is b.status


@settings(max_examples=200, deadline=None)
@given(prob, weight, temperature, method)
def test_single_model_returns_its_own_scaled_probability(
    p: float, w: float, t: float, m: str
) -> None:
    f = fuse_task("gbm_pcnsl", task_settings({"a": w}, method=m, temperature=t), [pred("a", p)])
    assert f.probability == pytest.approx(sigmoid(logit(p) / t), rel=1e-9, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(scenario())
def test_renormalising_equals_running_only_present_models(
    case: tuple[TaskSettings, list[SeriesPrediction]],
) -> None:
    rules, preds = case
    present = {p.model_id for p in preds}
    kept = tuple(m for m in rules.models if m.bundle in present)
    # the fitted temperature is for all routes; with k of n it applies in proportion
    t = effective_temperature(rules.temperature, len(kept), len(rules.models), rules.method)
    only = rules.model_copy(update={"models": kept, "temperature": t})
    full = fuse_task("gbm_pcnsl", rules, preds)
    reduced = fuse_task("gbm_pcnsl", only, preds)
    assert full.probability == pytest.approx(reduced.probability, rel=1e-9, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(scenario(), st.data())
def test_monotonic_in_each_input(
    case: tuple[TaskSettings, list[SeriesPrediction]], data: st.DataObject
) -> None:
    rules, preds = case
    i = data.draw(st.integers(min_value=0, max_value=len(preds) - 1))
    higher = data.draw(st.floats(min_value=preds[i].probability, max_value=1.0))
    raised = list(preds)
    raised[i] = pred(preds[i].model_id, higher, series=preds[i].series_uid)
    before = fuse_task("gbm_pcnsl", rules, preds).probability
    after = fuse_task("gbm_pcnsl", rules, raised).probability
    assert before is not None and after is not None
    assert after >= before - 1e-12


@settings(max_examples=100, deadline=None)
@given(st.lists(prob, min_size=1, max_size=5), weight)
def test_duplicate_series_do_not_change_a_bundles_weight(ps: list[float], w: float) -> None:
    """Two bundles agreeing series by series: the answer is the per-bundle mean, whatever w."""
    rules = task_settings({"a": 1.0, "b": w})
    preds = [pred("a", p, str(i)) for i, p in enumerate(ps)] + [pred("b", sum(ps) / len(ps))]
    f = fuse_task("gbm_pcnsl", rules, preds)
    mean_logit = sum(logit(p) for p in ps) / len(ps)
    expected = sigmoid((mean_logit + w * logit(sum(ps) / len(ps))) / (1 + w))
    assert f.probability == pytest.approx(expected, rel=1e-9, abs=1e-12)

"""The lesion gate: no tumour diagnosis on a study where the lesion task found no lesion."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from node.config import Rules, TaskSettings
from node.ensemble import fuse_study
from node.records import FindingStatus, SequenceLabel, SeriesPrediction, TaskFinding


def _task(bundle: str, sequence: SequenceLabel, gate: str | None = None) -> TaskSettings:
    return TaskSettings.model_validate(
        {
            "positive_label": "positive",
            "negative_label": "negative",
            "models": [{"bundle": bundle, "sequences": [sequence], "weight": 1.0}],
            "requires_lesion": gate,
        }
    )


def _rules(gate: str | None = "tumour") -> Rules:
    return Rules(
        tasks={
            "tumour": _task("tumour_flair", SequenceLabel.FLAIR),
            "gbm_pcnsl": _task("gbm_pcnsl_t1c", SequenceLabel.T1C, gate),
        }
    )


def _pred(task: str, bundle: str, p: float) -> SeriesPrediction:
    return SeriesPrediction(
        task=task,
        model_id=bundle,
        model_version="1",
        series_uid=f"1.2.{len(bundle)}",
        sequence=SequenceLabel.T1C,
        probability=p,
        slice_indices=(0,),
        slice_probabilities=(p,),
    )


def _findings(
    p_tumour: float | None, p_gbm: float, gate: str | None = "tumour"
) -> dict[str, TaskFinding]:
    preds = [_pred("gbm_pcnsl", "gbm_pcnsl_t1c", p_gbm)]
    if p_tumour is not None:
        preds.append(_pred("tumour", "tumour_flair", p_tumour))
    return {f.task: f for f in fuse_study(_rules(gate), preds)}


def test_no_lesion_means_no_diagnosis_and_no_evidence() -> None:
    found = _findings(p_tumour=0.05, p_gbm=0.97)
    gbm = found["gbm_pcnsl"]
    assert gbm.status is FindingStatus.NO_LESION
    assert gbm.probability is None and gbm.contributions == ()
    assert "no lesion found" in gbm.reason
    assert found["tumour"].status is FindingStatus.ABSENT


def test_a_lesion_lets_the_task_answer() -> None:
    gbm = _findings(p_tumour=0.9, p_gbm=0.97)["gbm_pcnsl"]
    assert gbm.status is FindingStatus.PRESENT
    indeterminate = _findings(p_tumour=0.5, p_gbm=0.97)["gbm_pcnsl"]
    assert indeterminate.status is FindingStatus.PRESENT


def test_a_gate_that_could_not_run_is_said() -> None:
    gbm = _findings(p_tumour=None, p_gbm=0.97)["gbm_pcnsl"]
    assert gbm.status is FindingStatus.PRESENT
    assert "lesion presence (tumour) not assessed" in gbm.reason


def test_without_a_gate_nothing_changes() -> None:
    gbm = _findings(p_tumour=0.01, p_gbm=0.97, gate=None)["gbm_pcnsl"]
    assert gbm.status is FindingStatus.PRESENT


@settings(deadline=None)  # the fusion builds pydantic rules per example: no timing in a test
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gated_task_is_never_present_when_the_gate_says_absent(p_t: float, p_g: float) -> None:
    found = _findings(p_tumour=p_t, p_gbm=p_g)
    if found["tumour"].status is FindingStatus.ABSENT:
        assert found["gbm_pcnsl"].status is FindingStatus.NO_LESION
    else:
        assert found["gbm_pcnsl"].status is not FindingStatus.NO_LESION


@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        ({"gbm_pcnsl": ("gbm_pcnsl_t1c", "nosuch")}, "not another task"),
        ({"gbm_pcnsl": ("gbm_pcnsl_t1c", "gbm_pcnsl")}, "not another task"),
        (
            {"tumour": ("tumour_flair", "gbm_pcnsl"), "gbm_pcnsl": ("gbm_pcnsl_t1c", "tumour")},
            "itself gated",
        ),
    ],
)
def test_bad_gates_are_refused(tasks: dict[str, tuple[str, str]], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Rules(tasks={name: _task(b, SequenceLabel.T1C, g) for name, (b, g) in tasks.items()})

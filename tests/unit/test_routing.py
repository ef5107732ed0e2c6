"""Routing: which series go to which bundles, and the explanation IT reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from node.cli.rules import ExplainArgs, cmd_explain
from node.config import QualifySettings, Rules, validate_rules_text
from node.records import DecisionMethod, Route, SequenceDecision, SequenceLabel
from node.routing import explain_routes, route_study, study_qualifies

REPO = Path(__file__).resolve().parents[2]

L = SequenceLabel


def decision(uid: str, label: SequenceLabel, confidence: float = 0.9) -> SequenceDecision:
    return SequenceDecision(
        series_uid=uid,
        label=label,
        confidence=confidence,
        method=DecisionMethod.FUSED,
        reasons=(f"rule for {label.value}",),
        tag_label=label,
        cnn_label=label,
    )


def full_study() -> list[SequenceDecision]:
    return [
        decision("1", L.T1),
        decision("2", L.T1C),
        decision("3", L.T2),
        decision("4", L.FLAIR),
        decision("5", L.DWI),
        decision("6", L.ADC),
        decision("7", L.OTHER),
    ]


def all_tasks() -> Rules:
    """The built-in rules with every task on (tubers is off by default)."""
    tasks = {k: v.model_copy(update={"enabled": True}) for k, v in Rules().tasks.items()}
    return Rules(tasks=tasks)


def test_tubers_is_off_by_default_and_not_routed() -> None:
    assert Rules().tasks["tubers"].enabled is False
    assert all(r.task != "tubers" for r in route_study(full_study(), Rules()))


def test_full_study_default_routes() -> None:
    routes = route_study(full_study(), all_tasks())
    assert [(r.task, r.bundle, r.series_uid, r.sequence, r.weight) for r in routes] == [
        ("tumour", "tumour_flair_detector", "4", L.FLAIR, 1.0),
        ("tumour", "tumour_t1c_detector", "2", L.T1C, 0.912),
        ("gbm_pcnsl", "gbm_pcnsl_t1c", "2", L.T1C, 0.81),
        ("gbm_pcnsl", "gbm_pcnsl_adc", "6", L.ADC, 1.0),
        ("glioma_grade", "glioma_grade_t1c", "2", L.T1C, 0.646),
        ("glioma_grade", "glioma_grade_flair", "4", L.FLAIR, 0.491),
        ("glioma_grade", "glioma_grade_t1c_enhancement", "2", L.T1C, 1.0),
        ("tubers", "tubers_flair", "4", L.FLAIR, 0.108),
        ("tubers", "tubers_t2", "3", L.T2, 0.12),
        ("tubers", "tubers_flair_foci", "4", L.FLAIR, 1.0),
    ]
    assert all(isinstance(r, Route) for r in routes)


def test_other_is_never_routed_even_if_nothing_else() -> None:
    assert route_study([decision("7", L.OTHER), decision("8", L.OTHER)], all_tasks()) == ()


def test_task_without_matching_series_gets_no_routes() -> None:
    routes = route_study([decision("3", L.T2)], all_tasks())
    assert {r.task for r in routes} == {"tubers"}


def test_two_series_with_one_label_are_both_routed() -> None:
    routes = route_study([decision("a", L.FLAIR), decision("b", L.FLAIR)], all_tasks())
    tubers = [(r.bundle, r.series_uid) for r in routes if r.task == "tubers"]
    assert tubers == [
        ("tubers_flair", "a"),
        ("tubers_flair", "b"),
        ("tubers_flair_foci", "a"),
        ("tubers_flair_foci", "b"),
    ]


def test_series_listed_twice_is_routed_once() -> None:
    routes = route_study([decision("a", L.T2), decision("a", L.T2)], all_tasks())
    assert [r.series_uid for r in routes] == ["a"]


def test_disabled_task_gets_no_routes() -> None:
    tasks = dict(all_tasks().tasks)
    tasks["tubers"] = tasks["tubers"].model_copy(update={"enabled": False})
    rules = all_tasks().model_copy(update={"tasks": tasks})
    assert {r.task for r in route_study(full_study(), rules)} == {
        "tumour",
        "gbm_pcnsl",
        "glioma_grade",
    }


def test_route_with_several_labels() -> None:
    text = """\
tasks:
  t:
    positive_label: p
    negative_label: n
    models:
      - {bundle: any_t2w, sequences: [T2, FLAIR], weight: 2}
"""
    rules, problems = validate_rules_text(text)
    assert rules is not None, problems
    routes = route_study(full_study(), rules)
    assert [(r.series_uid, r.sequence, r.weight) for r in routes] == [
        ("3", L.T2, 2.0),
        ("4", L.FLAIR, 2.0),
    ]


def test_routing_does_not_depend_on_confidence() -> None:
    """Confidence is applied by the classifier (below min_confidence it says OTHER)."""
    routes = route_study([decision("2", L.T1C, confidence=0.1)], all_tasks())
    assert len(routes) == 4  # the lesion gate, gbm_pcnsl and glioma_grade (two bundles)


@pytest.mark.parametrize(
    ("modalities", "parts", "n", "ok", "words"),
    [
        (["MR"], [], 3, True, "qualifies"),
        (["CT"], [], 3, False, "none of MR"),
        (["MR", "SR"], [], 3, True, "qualifies"),
        (["MR"], ["BRAIN"], 0, False, "fewer than min_series"),
    ],
)
def test_study_qualifies_default(
    modalities: list[str], parts: list[str], n: int, ok: bool, words: str
) -> None:
    got, why = study_qualifies(modalities, parts, n, QualifySettings())
    assert got is ok and words in why


def test_study_qualifies_body_parts() -> None:
    q = QualifySettings(body_parts=("BRAIN", "HEAD"), min_series=2)
    assert study_qualifies(["MR"], ["head "], 2, q)[0] is True
    assert study_qualifies(["MR"], ["KNEE"], 2, q) == (
        False,
        "body parts KNEE include none of BRAIN, HEAD",
    )
    assert study_qualifies(["MR"], [""], 2, q)[0] is False  # blank body part with a filter
    assert study_qualifies(["MR"], None, 2, q)[0] is True  # unknown: not checked
    assert study_qualifies(["MR"], ["BRAIN"], 1, q)[0] is False


def test_explain_names_series_labels_routes_and_tasks() -> None:
    decisions = [decision("2", L.T1C), decision("4", L.FLAIR), decision("4b", L.FLAIR)]
    decisions += [decision("7", L.OTHER), decision("1", L.T1)]
    text = explain_routes(decisions, all_tasks(), series_names={"2": "#2 't1_mprage_gd'"})
    lines = text.splitlines()
    assert lines[0] == "series #2 't1_mprage_gd': T1C (confidence 0.90, by fused)"
    assert "    because: rule for T1C" in lines
    assert "    -> gbm_pcnsl_t1c (task gbm_pcnsl, route T1C, weight 0.81)" in lines
    assert "    -> not routed: OTHER series never go to a model" in lines
    assert "    -> not routed: no enabled task has a route for T1" in lines
    assert (
        "task gbm_pcnsl: weighted_mean_logit: gbm_pcnsl_t1c on 1 series (weight 0.81);"
        " gbm_pcnsl_adc skipped (no ADC series; weights renormalised)"
    ) in lines
    assert (
        "task tubers: weighted_mean_logit: tubers_flair on 2 series, averaged (weight 0.108);"
        in text
    )
    assert "tubers_flair_foci on 2 series, averaged (weight 1)" in text


def test_explain_not_assessable_and_disabled() -> None:
    tasks = dict(all_tasks().tasks)
    tasks["glioma_grade"] = tasks["glioma_grade"].model_copy(update={"enabled": False})
    rules = all_tasks().model_copy(update={"tasks": tasks})
    text = explain_routes([decision("3", L.T2)], rules)
    assert "task gbm_pcnsl: NOT ASSESSABLE: no series labelled ADC or T1C" in text
    assert "task glioma_grade: disabled" in text
    assert text.splitlines()[0].startswith("series 3: T2")


def test_cmd_explain_on_real_scanner_series(
    realdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two ADC maps, an FA map and a T1 from a real Siemens XA30 study."""
    pytest.importorskip("node.classify.sequence")
    source = realdata / "dcm_qa_xa30" / "In"
    for name in ("11_DWI_dir80_PA", "19_DWI_dir80_AP", "13_DWI_dir80_PA", "5_anat-T1w_acq-tfl"):
        shutil.copytree(source / name, tmp_path / "study" / name)
    rules = REPO / "routing_rules" / "default.yaml"
    args = ExplainArgs(rules_file=rules, study_dir=tmp_path / "study")
    assert cmd_explain(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("study: qualifies: 4 series, modalities MR")
    assert out.count("-> gbm_pcnsl_adc (task gbm_pcnsl, route ADC, weight 1)") == 2
    assert "series #13 'DWI_dir80_PA_FA': OTHER" in out
    assert "series #5 'anat-T1w_acq-tfl': T1" in out
    assert "task gbm_pcnsl: weighted_mean_logit: gbm_pcnsl_t1c skipped (no T1C series;" in out
    assert "gbm_pcnsl_adc on 2 series, averaged (weight 1)" in out
    assert "task tubers: disabled" in out


def test_cmd_explain_rejects_bad_rules_and_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("node:\n  prot: 1\n")
    assert cmd_explain(ExplainArgs(rules_file=bad, study_dir=tmp_path)) == 1
    assert "did you mean 'port'?" in capsys.readouterr().out
    good = REPO / "routing_rules" / "default.yaml"
    assert cmd_explain(ExplainArgs(rules_file=good, study_dir=tmp_path / "nope")) == 1
    assert "not a folder" in capsys.readouterr().out


def test_cmd_explain_applies_qualify_body_parts(
    realdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("node.classify.sequence")
    shutil.copytree(realdata / "dcm_qa_xa30" / "In" / "11_DWI_dir80_PA", tmp_path / "s" / "a")
    rules = tmp_path / "r.yaml"
    rules.write_text("qualify:\n  body_parts: [KNEE]\n")
    assert cmd_explain(ExplainArgs(rules_file=rules, study_dir=tmp_path / "s")) == 0
    out = capsys.readouterr().out
    assert "study: body parts BRAIN include none of KNEE" in out
    assert "nothing is routed" in out and "series #" not in out

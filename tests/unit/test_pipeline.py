"""pipeline: staged process_study, the audit record, the failure guard, `neuronode process`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from node.cli import study as study_cli
from node.cli.study import ProcessArgs, cmd_process
from node.config import Rules
from node.errors import LoadError, StageFailed
from node.log import uid_key
from node.pipeline import runner
from node.pipeline.audit import audit_path
from node.pipeline.context import Stage, StudyContext
from node.pipeline.runner import process_study
from node.pipeline.stages import STAGES
from node.records import StudyJob
from tests.unit.test_dicomio import SENTINEL_NAME, write_mr

PHI_STRINGS = (SENTINEL_NAME, "Zyxwvut", "SENTINEL-ID-4711", "19010203", "ACC-SENTINEL")


@pytest.fixture(autouse=True)
def _keep_log_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """cmd_process configures logging on the live stderr; keep that from leaking across tests."""
    monkeypatch.setattr(study_cli, "configure", lambda **_kw: None)


def _study(tmp_path: Path, *, n_series: int = 2, n_slices: int = 3) -> tuple[str, list[Path]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    paths = []
    for s in range(n_series):
        series = generate_uid()
        for k in range(n_slices):
            paths.append(
                write_mr(
                    tmp_path / f"s{s}_{k}.dcm",
                    study=study,
                    series=series,
                    position=(0, 0, 2.0 * k),
                    number=s + 1,
                    instance=k + 1,
                    value=k,
                )
            )
    return study, paths


def _job(study: str, paths: list[Path], **kw: object) -> StudyJob:
    return StudyJob(
        job_id=int(kw.get("job_id", 7)),  # type: ignore[call-overload]
        study_uid=study,
        instance_paths=tuple(paths),
        attempt=int(kw.get("attempt", 2)),  # type: ignore[call-overload]
        reopened=bool(kw.get("reopened", True)),
    )


def test_audit_records_what_arrived_without_patient_data(tmp_path: Path) -> None:
    study, paths = _study(tmp_path / "in")
    (tmp_path / "in" / "junk.bin").write_bytes(b"\x00" * 10)
    paths.append(tmp_path / "in" / "junk.bin")
    out = tmp_path / "out"
    outcome = process_study(_job(study, paths), Rules(), out_dir=out)
    assert outcome.audit_path == out / uid_key(study) / "audit.json"
    assert (outcome.n_series, outcome.n_instances, outcome.n_decode_errors) == (2, 6, 1)
    text = outcome.audit_path.read_text(encoding="utf-8")
    for phi in PHI_STRINGS:
        assert phi not in text
    audit = json.loads(text)
    assert audit["not_for_clinical_use"] is True
    assert audit["status"] == "done"
    assert (audit["job_id"], audit["attempt"], audit["reopened"]) == (7, 2, True)
    assert audit["study_instance_uid"] == study
    assert audit["study_key"] == uid_key(study)
    assert audit["node_version"]
    # Every stage before the audit itself has its duration recorded, in order.
    assert [s["stage"] for s in audit["stages"]] == [s.value for s, _ in STAGES[:-1]]
    assert [u["file"] for u in audit["unreadable_files"]] == [str(paths[-1])]
    first = audit["series"][0]
    assert first["series_number"] == 1
    assert first["description"] == "t1_mprage_sag"
    assert first["series_key"] == uid_key(first["series_instance_uid"])
    assert first["n_instances"] == 3 and first["n_frames"] == 3
    assert first["sop_classes"] == ["MR Image Storage"]
    assert first["transfer_syntaxes"] == ["Explicit VR Little Endian"]
    assert first["matrix"] == ["4x5"]
    assert first["volume_shape"] == [3, 4, 5]
    assert first["slice_spacing_mm"] == pytest.approx(2.0)
    assert first["orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert first["decode_errors"] == []
    # Atomic write: no temporary file left beside the record.
    assert [p.name for p in outcome.audit_path.parent.iterdir()] == ["audit.json"]


def test_decode_error_is_listed_under_its_series(tmp_path: Path) -> None:
    study, paths = _study(tmp_path / "in", n_series=1)
    broken = paths[1]
    broken.write_bytes(broken.read_bytes()[:-11])
    outcome = process_study(_job(study, paths), Rules(), out_dir=tmp_path / "out")
    audit = json.loads(outcome.audit_path.read_text())
    (series,) = audit["series"]
    assert [e["file"] for e in series["decode_errors"]] == [str(broken)]
    assert series["volume_shape"] == [2, 4, 5]
    assert audit["n_decode_errors"] == 1


def test_one_summary_line_per_study_with_keys_only(tmp_path: Path) -> None:
    study, paths = _study(tmp_path / "in")
    with capture_logs() as logs:
        process_study(_job(study, paths), Rules(), out_dir=tmp_path / "out")
    summaries = [e for e in logs if e["event"] == "study_processed"]
    assert len(summaries) == 1
    line = summaries[0]
    assert line["study_key"] == uid_key(study)
    assert (line["n_series"], line["n_instances"], line["n_errors"]) == (2, 6, 0)
    assert line["duration_ms"] >= 0
    assert study not in repr(logs)
    assert all(phi not in repr(logs) for phi in PHI_STRINGS)


def _boom(ctx: StudyContext) -> StudyContext:
    raise ZeroDivisionError("header said Zyxwvut^Sentinelpatient")


def _load_error(ctx: StudyContext) -> StudyContext:
    raise LoadError("no usable series")


def test_failed_stage_is_audited_and_raised_as_node_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, paths = _study(tmp_path / "in")
    monkeypatch.setattr(runner, "STAGES", (STAGES[0], (Stage.LOAD, _boom)))
    with pytest.raises(StageFailed) as info, capture_logs() as logs:
        process_study(_job(study, paths), Rules(), out_dir=tmp_path / "out")
    assert info.value.stage is Stage.LOAD
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    audit_text = audit_path(tmp_path / "out", study).read_text()
    assert SENTINEL_NAME not in audit_text  # third-party messages are not copied
    audit = json.loads(audit_text)
    assert audit["status"] == "failed"
    assert audit["failed_stage"] == "load"
    assert audit["error"] == {"type": "ZeroDivisionError", "message": ""}
    assert audit["series"] and audit["n_instances"] == 6  # what was loaded before is kept
    failed = [e for e in logs if e["event"] == "study_failed"]
    assert len(failed) == 1 and failed[0]["stage"] == "load"


def test_node_errors_pass_through_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, paths = _study(tmp_path / "in")
    monkeypatch.setattr(runner, "STAGES", ((Stage.LOAD, _load_error),))
    with pytest.raises(LoadError, match="no usable series"):
        process_study(_job(study, paths), Rules(), out_dir=tmp_path / "out")
    audit = json.loads(audit_path(tmp_path / "out", study).read_text())
    assert audit["error"] == {"type": "LoadError", "message": "no usable series"}
    assert audit["series"] == []


def test_cmd_process_groups_studies_skips_other_files_and_prints_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    study_a, _ = _study(src / "a", n_series=2)
    study_b, _ = _study(src / "b" / "deep", n_series=1)
    (src / "README.txt").write_text("hello")
    (src / "DICOMDIR").write_bytes(b"\x00" * 200)
    out = tmp_path / "out"
    args = ProcessArgs(directory=src, rules=tmp_path / "absent.yaml", out=out)
    assert cmd_process(args) == 0
    printed = capsys.readouterr().out
    assert "using the built-in defaults" in printed
    assert "2 study(ies), 9 DICOM file(s), 2 other file(s) skipped" in printed
    assert "t1_mprage_sag" in printed and "MR Image" in printed
    assert "Explicit VR Little Endian" in printed
    assert str(audit_path(out, study_a)) in printed
    assert str(audit_path(out, study_b)) in printed
    assert SENTINEL_NAME not in printed
    assert audit_path(out, study_a).is_file() and audit_path(out, study_b).is_file()


def test_cmd_process_reads_an_existing_rule_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nlogging:\n  format: json\n")
    _study(tmp_path / "in", n_series=1)
    args = ProcessArgs(directory=tmp_path / "in", rules=rules, out=tmp_path / "out")
    assert cmd_process(args) == 0
    assert f"rules: {rules}" in capsys.readouterr().out


def test_one_uid_with_two_numbers_gets_two_audit_entries_with_distinct_keys(
    tmp_path: Path,
) -> None:
    study, series = generate_uid(), generate_uid()
    tmp_path.mkdir(exist_ok=True)
    paths = [
        write_mr(tmp_path / f"n{n}.dcm", study=study, series=series, position=(0, 0, 0), number=n)
        for n in (1, 2)
    ]
    outcome = process_study(_job(study, paths), Rules(), out_dir=tmp_path / "out")
    audit = json.loads(outcome.audit_path.read_text())
    entries = audit["series"]
    assert [e["series_number"] for e in entries] == [1, 2]
    assert {e["series_instance_uid"] for e in entries} == {series}
    assert all(e["uid_shared_with_other_numbers"] for e in entries)
    assert entries[0]["series_key"] == uid_key(f"{series}#1")
    assert entries[0]["series_key"] != entries[1]["series_key"]
    assert outcome.n_series == 2


@pytest.mark.parametrize(("part", "status"), [("KNEE", "skipped"), ("brain", "done")])
def test_qualify_reads_body_part_from_the_headers(tmp_path: Path, part: str, status: str) -> None:
    import pydicom

    study, paths = _study(tmp_path / "in", n_series=2)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.BodyPartExamined = part
        ds.save_as(p)
    rules = Rules.model_validate({"qualify": {"body_parts": ["BRAIN", "HEAD"]}})
    job = StudyJob(job_id=1, study_uid=study, instance_paths=tuple(paths), attempt=1)
    process_study(job, rules, out_dir=tmp_path / "out")
    audit = json.loads(audit_path(tmp_path / "out", study).read_text())
    assert audit["status"] == status
    assert (audit["qualifies"] is True) is (status == "done")

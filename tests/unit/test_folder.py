"""node.dicom.folder: a folder tree grouped by study; one study UID in two folders stays two."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from node.classify.study import classify_folder
from node.config import SequenceSettings
from node.dicom.folder import dicom_files, scan_folder
from node.log import uid_key
from tests.unit.test_dicomio import write_mr


def _series(folder: Path, study: str, series: str, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_mr(
            folder / f"{k}.dcm",
            study=study,
            series=series,
            position=(0, 0, 2.0 * k),
            number=1,
            instance=k + 1,
            value=k,
        )
        for k in range(n)
    ]


def test_one_study_uid_in_two_folders_stays_two_studies(tmp_path: Path) -> None:
    shared, other = generate_uid(), generate_uid()
    first = _series(tmp_path / "a" / "s1", shared, generate_uid())
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same study exported twice
    _series(tmp_path / "c" / "s1", other, generate_uid())
    (tmp_path / "notes.txt").write_text("not DICOM")
    with capture_logs() as logs:
        scan = scan_folder(tmp_path)
    assert [uid for uid, _ in scan.studies] == [shared, shared, other]
    assert scan.folders == (tmp_path / "a", tmp_path / "b", tmp_path / "c")
    assert scan.studies[0][1] == tuple(sorted(first))
    assert all(p.parts[-3] == "b" for p in scan.studies[1][1])
    assert scan.shared_uids == (shared,)
    assert scan.n_skipped == 1
    warned = [e for e in logs if e["event"] == "study_uid_in_several_folders"]
    assert [(e["study_key"], e["count"]) for e in warned] == [(uid_key(shared), 2)]
    # Merged, the copies would give one series of six slices at three positions.
    run = classify_folder(tmp_path, SequenceSettings(), bundle=None)
    assert run.n_studies == 3 and run.n_shared_study_uids == 1
    assert [h.n_instances for h in run.headers] == [3, 3, 3]


def test_one_study_in_subfolders_of_one_folder_is_one_study(tmp_path: Path) -> None:
    study = generate_uid()
    _series(tmp_path / "p1" / "s1", study, generate_uid())
    _series(tmp_path / "p1" / "s2", study, generate_uid())
    _series(tmp_path / "p1" / "s2" / "deeper", study, generate_uid(), n=2)
    scan = scan_folder(tmp_path)
    assert [(uid, len(paths)) for uid, paths in scan.studies] == [(study, 8)]
    assert scan.shared_uids == ()
    assert len(dicom_files(tmp_path)) == 8


def test_files_directly_in_the_folder_and_a_copy_beside_them_stay_apart(tmp_path: Path) -> None:
    study = generate_uid()
    _series(tmp_path, study, generate_uid(), n=2)
    shutil.copytree(tmp_path, tmp_path.parent / "copy")
    shutil.move(tmp_path.parent / "copy", tmp_path / "x")
    scan = scan_folder(tmp_path)
    assert scan.folders == (tmp_path, tmp_path / "x")
    assert scan.shared_uids == (study,)


def test_a_study_laid_out_one_folder_per_series_is_one_study(tmp_path: Path) -> None:
    """`neuronode process study_0001` on synth's layout (study/series/files): every series
    folder is a top-level folder of the scan, and together they are the one study."""
    study = generate_uid()
    _series(tmp_path, study, generate_uid(), n=2)  # and one series' files at the top
    for name in ("s1", "s2", "s3"):
        _series(tmp_path / name, study, generate_uid())
    with capture_logs() as logs:
        scan = scan_folder(tmp_path)
    assert [(uid, len(paths)) for uid, paths in scan.studies] == [(study, 11)]
    assert scan.folders == (tmp_path,)
    assert scan.shared_uids == ()
    assert not [e for e in logs if e["event"] == "study_uid_in_several_folders"]
    run = classify_folder(tmp_path, SequenceSettings(), bundle=None)
    assert run.n_studies == 1 and len(run.headers) == 4

"""Report objects: deterministic UIDs, heatmap Secondary Captures and the TID 1500 SR."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.config import OutputSettings
from node.errors import ReportError
from node.records import (
    DecisionMethod,
    FindingStatus,
    Heatmap,
    SequenceDecision,
    SequenceLabel,
    SeriesPrediction,
    SliceGeometry,
    SliceRef,
    StudyResult,
    TaskFinding,
)
from node.report.codes import SR_SOP_CLASS_UIDS, finding_code
from node.report.sc import build_heatmap_images, burn_caption, jet, overlay_cam, window_to_unit
from node.report.sr import build_sr, reencode_sr
from node.report.uids import result_uid, sr_uid
from tests.conftest import pydicom_file

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
XA30_T1 = REALDATA / "dcm_qa_xa30" / "In" / "5_anat-T1w_acq-tfl"


def mr_small() -> Path:
    """pydicom's classic single-frame MR test file."""
    return pydicom_file("MR_small.dcm")


def blob(rows: int, cols: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    """A Gaussian blob in 0..1: a made-up Grad-CAM map."""
    y, x = np.mgrid[0:rows, 0:cols]
    out: np.ndarray = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2)).astype(np.float32)
    return out


def slice_of(path: Path, frame: int | None) -> tuple[SliceRef, np.ndarray]:
    """The SliceRef and pixels of one slice (frame 1-based for enhanced files)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    if frame is not None:
        pixels = pixels[frame - 1]
        pffg = ds.PerFrameFunctionalGroupsSequence[frame - 1]
        shared = ds.SharedFunctionalGroupsSequence[0]
        pos = tuple(float(v) for v in pffg.PlanePositionSequence[0].ImagePositionPatient)
        ori_src = pffg if "PlaneOrientationSequence" in pffg else shared
        ori = tuple(float(v) for v in ori_src.PlaneOrientationSequence[0].ImageOrientationPatient)
        meas = pffg if "PixelMeasuresSequence" in pffg else shared
        spacing = tuple(float(v) for v in meas.PixelMeasuresSequence[0].PixelSpacing)
    else:
        pos = tuple(float(v) for v in ds.ImagePositionPatient)
        ori = tuple(float(v) for v in ds.ImageOrientationPatient)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    ref = SliceRef(
        path=path,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        frame_number=frame,
        geometry=SliceGeometry(
            position=pos,  # type: ignore[arg-type]
            orientation=ori,  # type: ignore[arg-type]
            pixel_spacing=spacing,  # type: ignore[arg-type]
            slice_thickness=None,
        ),
    )
    return ref, pixels


def make_result(
    path: Path,
    frames: tuple[int | None, ...] = (None,),
    *,
    probability: float | None = 0.87,
    status: FindingStatus = FindingStatus.PRESENT,
    version: str = "1.0.0",
    extra_series: tuple[str, ...] = (),
    weights: str = "",
) -> StudyResult:
    """A hand-made StudyResult over a real source file with Gaussian-blob heatmaps."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    heatmaps = []
    for i, frame in enumerate(frames):
        ref, pixels = slice_of(path, frame)
        r, c = pixels.shape
        heatmaps.append(
            Heatmap(
                series_uid=str(ds.SeriesInstanceUID),
                slice_index=i,
                source=ref,
                cam=blob(r, c, r * 0.4, c * 0.6, max(r, c) / 8),
                image=pixels,
            )
        )
    pred = SeriesPrediction(
        task="gbm_pcnsl",
        model_id="gbm_pcnsl_t1c",
        model_version=version,
        series_uid=str(ds.SeriesInstanceUID),
        sequence=SequenceLabel.T1C,
        probability=0.9,
        slice_indices=tuple(range(len(frames))),
        slice_probabilities=tuple(0.9 for _ in frames),
        heatmaps=tuple(heatmaps),
        weights_sha256=weights,
    )
    gbm = TaskFinding(
        task="gbm_pcnsl",
        positive_label="glioblastoma",
        negative_label="primary CNS lymphoma",
        status=status,
        probability=probability,
        contributions=(pred,),
        method="weighted mean logit, temperature 1.0",
        reason="one T1C series above the band",
    )
    tubers = TaskFinding(
        task="tubers",
        positive_label="cortical tubers",
        negative_label="no cortical tubers",
        status=FindingStatus.NOT_ASSESSABLE,
        probability=None,
        contributions=(),
        method="weighted mean logit",
        reason="no FLAIR or T2 series",
    )
    seqs = tuple(
        SequenceDecision(
            series_uid=uid,
            label=SequenceLabel.T1C,
            confidence=0.95,
            method=DecisionMethod.TAGS,
            reasons=("contrast agent tag set",),
        )
        for uid in (str(ds.SeriesInstanceUID), *extra_series)
    )
    return StudyResult(
        study_uid=str(ds.StudyInstanceUID),
        source_paths=(path,),
        sequences=seqs,
        findings=(gbm, tubers),
    )


def xa30_t1() -> Path:
    if not XA30_T1.is_dir():
        pytest.skip("../shared/realdata is not beside the repo")
    return next(XA30_T1.glob("*.dcm"))


OUT = OutputSettings(heatmaps_per_series=2)


def test_result_uid_is_deterministic_and_valid() -> None:
    a = result_uid("sr", "1.2.3", "4.5", uid_root=None)
    assert a == result_uid("sr", "1.2.3", "4.5", uid_root=None)
    assert a != result_uid("sc", "1.2.3", "4.5", uid_root=None)
    assert a.startswith("2.25.") and len(a) <= 64
    rooted = result_uid("sr", "1.2.3", uid_root="1.2.826.0.1.3680043.10.1234")
    assert rooted.startswith("1.2.826.0.1.3680043.10.1234.") and len(rooted) == 64
    assert not rooted.split(".")[-1].startswith("0")
    with pytest.raises(ValueError, match="uid_root"):
        result_uid("sr", "1", uid_root="1.02.3")


def test_jet_and_window() -> None:
    lut = jet(np.array([0.0, 0.5, 1.0]))
    assert lut[0].tolist() == pytest.approx([0.0, 0.0, 0.5])  # dark blue at 0
    assert lut[1].tolist() == pytest.approx([0.5, 1.0, 0.5])
    assert lut[2].tolist() == pytest.approx([0.5, 0.0, 0.0])  # dark red at 1
    w = window_to_unit(np.arange(1000, dtype=np.float32).reshape(10, 100))
    assert w.min() == 0.0 and w.max() == 1.0
    assert window_to_unit(np.full((4, 4), 7.0)).max() == 0.0  # flat image: no division by zero


def test_overlay_only_where_cam_is_high() -> None:
    image = np.tile(np.linspace(0, 100, 32, dtype=np.float32), (32, 1))
    cam = np.zeros((32, 32), np.float32)
    cam[10:20, 10:20] = 1.0
    rgb = overlay_cam(image, cam)
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    low = rgb[0:5, 0:5]
    assert np.all(low[..., 0] == low[..., 1]) and np.all(low[..., 1] == low[..., 2])  # grey
    hot = rgb[15, 15].astype(int)
    assert hot[0] > hot[2]  # red dominates where the CAM is 1 (not inverted)
    with pytest.raises(ValueError, match="shape"):
        overlay_cam(image, cam[:10])


def test_finding_codes() -> None:
    assert finding_code("Glioblastoma").value == "393563007"
    assert finding_code("primary CNS lymphoma").scheme_designator == "99NEURONODE"
    assert finding_code("tuberous sclerosis").value == "7199000"
    assert finding_code("odd new thing").value == "ODDNEWTHING"


def test_heatmap_images_classic_mr() -> None:
    result = make_result(mr_small())
    (sc,) = build_heatmap_images(result, OUT, uid_root=None)
    src = pydicom.dcmread(mr_small(), stop_before_pixels=True)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.StudyInstanceUID == src.StudyInstanceUID
    assert sc.SeriesInstanceUID != src.SeriesInstanceUID
    assert sc.PatientID == src.PatientID and sc.PatientName == src.PatientName
    assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
    # The slice keeps its resolution; the caption is a band added below it.
    assert sc.Columns == src.Columns and sc.Rows > src.Rows
    assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in src.PixelSpacing]
    assert list(sc.PatientOrientation) == ["L", "P"]  # axial: rows run to the left, columns back
    ref = sc.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert "ReferencedFrameNumber" not in ref
    assert "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
    assert "not a localisation" in sc.ImageComments
    again = build_heatmap_images(result, OUT, uid_root=None)[0]
    assert again.SOPInstanceUID == sc.SOPInstanceUID  # pushed twice: same object


def test_heatmap_images_enhanced_frame_and_limit() -> None:
    path = xa30_t1()
    result = make_result(path, frames=(40, 48, 56))
    scs = build_heatmap_images(result, OutputSettings(heatmaps_per_series=2), uid_root=None)
    assert len(scs) == 2  # the limit, taking the inference stage's first choices
    assert [int(s.SourceImageSequence[0].ReferencedFrameNumber) for s in scs] == [40, 48]
    assert scs[0].SpecificCharacterSet == "ISO_IR 100"
    assert len({s.SOPInstanceUID for s in scs}) == 2
    caption_rows = scs[0].pixel_array[-5:, :, :]
    assert caption_rows.max() > 200  # burned-in white text in the caption band
    none = build_heatmap_images(result, OutputSettings(heatmaps_per_series=0), uid_root=None)
    assert none == ()


def walk(items: object) -> list[Dataset]:
    out: list[Dataset] = []
    for item in items:  # type: ignore[attr-defined]
        out.append(item)
        out.extend(walk(item.get("ContentSequence", [])))
    return out


def test_sr_content() -> None:
    result = make_result(mr_small())
    scs = build_heatmap_images(result, OUT, uid_root=None)
    sr = build_sr(result, scs, uid_root=None, predecessor=None, sop_class="comprehensive3d")
    src = pydicom.dcmread(mr_small(), stop_before_pixels=True)
    assert sr.SOPClassUID == SR_SOP_CLASS_UIDS["comprehensive3d"]
    assert sr.SeriesDescription == "AI results - NOT FOR DIAGNOSTIC USE"
    assert sr.PatientID == src.PatientID and sr.StudyInstanceUID == src.StudyInstanceUID
    items = walk(sr.ContentSequence)
    codes = [(i.ConceptCodeSequence[0].CodeValue) for i in items if i.ValueType == "CODE"]
    assert "52101004" in codes  # Present
    assert "NOTASSESSABLE" in codes
    nums = [
        i
        for i in items
        if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "111012"
    ]
    assert len(nums) == 1  # only the assessable task has a certainty
    mv = nums[0].MeasuredValueSequence[0]
    assert float(mv.NumericValue) == pytest.approx(87.0)
    assert mv.MeasurementUnitsCodeSequence[0].CodeValue == "%"
    names = [
        i.ConceptNameCodeSequence[0].CodeValue for i in items if "ConceptNameCodeSequence" in i
    ]
    assert "393563007" in names  # glioblastoma as the evaluated concept
    refs = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"
    }
    assert scs[0].SOPInstanceUID in refs and src.SOPInstanceUID in refs
    texts = " ".join(str(i.TextValue) for i in items if i.ValueType == "TEXT")
    assert "T1C" in texts and "NOT FOR DIAGNOSTIC USE" in texts
    algo = [
        i.TextValue
        for i in items
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111001"
    ]
    assert "gbm_pcnsl_t1c" in algo
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99NEURONODE"
    assert "PredecessorDocumentsSequence" not in sr


def test_sr_uids_and_predecessor() -> None:
    result = make_result(mr_small())
    scs = build_heatmap_images(result, OUT, uid_root=None)
    sr1 = build_sr(result, scs, uid_root=None)
    assert build_sr(result, scs, uid_root=None).SOPInstanceUID == sr1.SOPInstanceUID
    assert sr_uid(result, "comprehensive3d", uid_root=None) == sr1.SOPInstanceUID
    reopened = make_result(mr_small(), extra_series=("1.2.3.4.5.6",))
    sr2 = build_sr(reopened, scs, uid_root=None, predecessor=sr1)
    assert sr2.SOPInstanceUID != sr1.SOPInstanceUID
    assert sr2.SeriesInstanceUID == sr1.SeriesInstanceUID
    pred = sr2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr1.SOPInstanceUID
    texts = " ".join(str(i.TextValue) for i in walk(sr2.ContentSequence) if i.ValueType == "TEXT")
    assert f"supersedes report {sr1.SOPInstanceUID}" in texts
    newer = make_result(mr_small(), version="2.0.0")
    assert build_sr(newer, (), uid_root=None).SOPInstanceUID != sr1.SOPInstanceUID
    # retrained weights under the same version: new SR and heatmap UIDs, never a silent overwrite
    retrained = make_result(mr_small(), weights="ab" * 32)
    assert build_sr(retrained, (), uid_root=None).SOPInstanceUID != sr1.SOPInstanceUID
    new_scs = build_heatmap_images(retrained, OUT, uid_root=None)
    assert {d.SOPInstanceUID for d in new_scs}.isdisjoint({d.SOPInstanceUID for d in scs})
    other = pydicom.dcmread(mr_small(), stop_before_pixels=True)
    other.StudyInstanceUID = "1.2.3"
    with pytest.raises(ReportError, match="another study"):
        build_sr(result, scs, uid_root=None, predecessor=other)


@pytest.mark.parametrize("sop_class", ["comprehensive", "enhanced"])
def test_sr_other_classes_and_reencode(sop_class: str) -> None:
    result = make_result(mr_small())
    sr = build_sr(result, (), uid_root=None, sop_class=sop_class)  # type: ignore[arg-type]
    assert sr.SOPClassUID == SR_SOP_CLASS_UIDS[sop_class]  # type: ignore[index]
    sr3d = build_sr(result, (), uid_root=None)
    re = reencode_sr(sr3d, sop_class, uid_root=None)  # type: ignore[arg-type]
    assert re.SOPClassUID == SR_SOP_CLASS_UIDS[sop_class]  # type: ignore[index]
    assert re.SOPInstanceUID != sr3d.SOPInstanceUID
    assert re.file_meta.MediaStorageSOPInstanceUID == re.SOPInstanceUID
    assert sr3d.SOPClassUID == SR_SOP_CLASS_UIDS["comprehensive3d"]  # original untouched
    assert reencode_sr(sr3d, "comprehensive3d", uid_root=None) is sr3d


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="StudyResult"):
        build_sr("x", (), uid_root=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sop_class"):
        build_sr(make_result(mr_small()), (), uid_root=None, sop_class="basic")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="StudyResult"):
        build_heatmap_images("x", OUT, uid_root=None)  # type: ignore[arg-type]


def test_wrong_study_and_missing_sources_are_report_errors() -> None:
    import dataclasses

    result = make_result(mr_small())
    other = dataclasses.replace(result, study_uid="1.2.3")
    with pytest.raises(ReportError, match="another study"):
        build_sr(other, (), uid_root=None)
    with pytest.raises(ReportError, match="another study"):
        build_heatmap_images(other, OUT, uid_root=None)
    with pytest.raises(ReportError, match="no source"):
        build_sr(dataclasses.replace(result, source_paths=()), (), uid_root=None)
    with pytest.raises(ReportError, match="cannot read"):
        build_sr(
            dataclasses.replace(result, source_paths=(Path("/nonexistent.dcm"),)), (), uid_root=None
        )


def test_caption_band_is_below_the_image_and_leaves_it_untouched() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    out = burn_caption(image, ("gbm_pcnsl: glioblastoma present (p=91%)", "NOT FOR DIAGNOSTIC USE"))
    assert out.shape[1] == 96 and out.shape[0] > 64
    assert np.array_equal(out[:64], image)  # every anatomy pixel as it was
    band = out[64:]
    assert band.max() > 200 and band.min() == 0  # white text on black
    longer = burn_caption(image, ("x " * 200,))
    assert longer.shape[0] > out.shape[0]  # long captions wrap onto more lines, never cut


def _stable(ds: Dataset) -> object:
    """A dataset's elements as plain values, without its pixels and its clock readings (dates
    and times of creation), recursively."""
    out: dict[str, object] = {}
    for e in ds:
        if e.keyword == "PixelData" or e.VR in ("DA", "TM", "DT"):
            continue
        out[e.keyword] = [_stable(i) for i in e.value] if e.VR == "SQ" else str(e.value)
    return out


@pytest.mark.parametrize("case", ["classic", "enhanced"])
def test_unrendered_heatmaps_are_the_same_objects_but_for_pixels(case: str) -> None:
    """The SR is built from heatmaps not drawn yet (it goes out first): each must be the image
    drawn later in every attribute but its pixels, so the SR says what the PACS gets."""
    if case == "classic":
        result, outputs = make_result(mr_small()), OUT
    else:
        result = make_result(xa30_t1(), frames=(40, 48, 56))
        outputs = OutputSettings(heatmaps_per_series=3)
    drawn = build_heatmap_images(result, outputs, uid_root=None)
    planned = build_heatmap_images(result, outputs, uid_root=None, render=False)
    assert len(planned) == len(drawn) > 0
    for p, d in zip(planned, drawn, strict=True):
        assert _stable(p) == _stable(d)
        assert len(p.PixelData) == len(d.PixelData) == d.Rows * d.Columns * 3
        assert not any(p.PixelData) and any(d.PixelData)
    # So the SR made from either names the same images with the same sizes.
    from_planned = build_sr(result, planned, uid_root=None)
    from_drawn = build_sr(result, drawn, uid_root=None)
    assert from_planned.SOPInstanceUID == from_drawn.SOPInstanceUID
    assert _stable(from_planned) == _stable(from_drawn)


def test_the_warm_up_builds_a_heatmap_and_an_sr_through_the_same_constructors() -> None:
    from node.report.sr import warm_up

    sr = warm_up()
    assert sr.SOPClassUID == SR_SOP_CLASS_UIDS["comprehensive3d"]
    refs = {
        str(ref.ReferencedSOPClassUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert refs == {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7"}  # MR, SC


def _encoded_without_clock(ds: Dataset) -> bytes:
    """The Part 10 bytes with every date and time value emptied (they read the clock)."""

    def blank(items: Dataset) -> None:
        for e in items:
            if e.VR in ("DA", "TM", "DT"):
                e.value = ""
            elif e.VR == "SQ":
                for item in e.value:
                    blank(item)

    blank(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("case", ["classic", "enhanced"])
def test_the_sr_is_byte_for_byte_what_the_plain_highdicom_constructor_makes(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_sr hands highdicom's SR constructor the root container without its children (no
    copy and re-read of the tree): the document must be the one the constructor makes from
    the whole tree."""
    import node.report.sr as sr_module
    from node.report.sources import quietly

    if case == "classic":
        result, outputs = make_result(mr_small()), OUT
    else:
        result = make_result(xa30_t1(), frames=(40, 48, 56))
        outputs = OutputSettings(heatmaps_per_series=3)
    scs = build_heatmap_images(result, outputs, uid_root=None)
    fast = build_sr(result, scs, uid_root=None)
    monkeypatch.setattr(
        sr_module,
        "_document",
        lambda cls, *, content, **kw: quietly(cls, content=content, **kw),
    )
    plain = build_sr(result, scs, uid_root=None)
    assert len(fast.ContentSequence) == len(plain.ContentSequence) > 3
    assert _encoded_without_clock(fast) == _encoded_without_clock(plain)

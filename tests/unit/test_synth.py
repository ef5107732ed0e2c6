"""Synthetic study generator: determinism, layout, headers vs truth, lesion truth, options."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.lab.synth import (
    PHENOTYPES,
    VENDORS,
    generate_study,
    study_labels,
    study_plan,
    write_studies,
)
from node.lab.synth.anatomy import load_template
from node.lab.synth.study import SynthStudy

SMALL_SIZE, SMALL_SLICES = 64, 12
SMALL: dict[str, int] = {"size": SMALL_SIZE, "slices": SMALL_SLICES}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_studies(out, studies=4, seed=11, vendors=list(VENDORS), size=48, slices=8)
    return out


def _typical(
    phenotype: str, vendor: str = "siemens", start: int = 100, size: int = SMALL_SIZE
) -> SynthStudy:
    for seed in range(start, start + 30):
        st = generate_study(
            seed,
            phenotype=phenotype,
            vendor=vendor,
            distractors=False,
            size=size,
            slices=SMALL_SLICES,
        )
        if not st.atypical and st.lesions:
            return st
    raise AssertionError(f"no typical {phenotype} drawn")


def _sphere(st: SynthStudy, lesion: dict[str, object], frac: float) -> np.ndarray:
    """Voxels within frac * radius of a manifest lesion centre, on the routed grid."""
    g = st.grid
    pts = g.points()
    c = np.array(lesion["center_mm"], dtype=np.float32)
    r = float(lesion["radius_mm"])  # type: ignore[arg-type]
    inside: np.ndarray = np.linalg.norm(pts - c, axis=-1) <= frac * r
    return inside


def _pixels(st: SynthStudy, kind: str) -> np.ndarray:
    s = next(x for x in st.series if x.kind == kind)
    return np.stack([ds.pixel_array for ds in s.datasets]).astype(np.float32)


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        write_studies(out, studies=2, seed=seed, size=32, slices=4)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert len(ha) > 40
    assert ha == hb
    assert ha["study_0001/series_002/1.dcm"] != hc["study_0001/series_002/1.dcm"]


def test_layout_manifest_and_csvs(written: Path) -> None:
    m = json.loads((written / "manifest.json").read_text())
    assert m["generator"] == "neuronode.synth" and m["seed"] == 11
    assert [s["folder"] for s in m["studies"]] == [f"study_{i:04d}" for i in range(1, 5)]
    assert sorted(s["vendor"] for s in m["studies"]) == sorted(VENDORS)
    with (written / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["series_uid", "label", "study_uid", "description"]
    n_series = sum(len(s["series"]) for s in m["studies"])
    assert len(rows) == n_series == 4 * 11
    with (written / "study_labels.csv").open() as fh:
        srows = list(csv.DictReader(fh))
    assert list(srows[0]) == [
        "StudyInstanceUID",
        "phenotype",
        "gbm_pcnsl",
        "glioma_grade",
        "tubers",
    ]
    for st, row in zip(m["studies"], srows, strict=True):
        assert row["StudyInstanceUID"] == st["study_uid"]
        assert (
            {k: row[k] for k in ("gbm_pcnsl", "glioma_grade", "tubers")}
            == st["labels"]
            == study_labels(st["phenotype"])
        )
        for s in st["series"]:
            files = sorted((written / s["folder"]).glob("*.dcm"))
            assert len(files) == s["n_instances"]
            assert {
                "series_uid",
                "series_number",
                "label",
                "description",
                "kind",
                "n_instances",
            } <= set(s)
        for les in st["lesions"]:
            assert (
                len(les["center_mm"]) == 3
                and len(les["center_voxel"]) == 3
                and les["radius_mm"] > 0
            )


def test_study_labels_mapping() -> None:
    assert study_labels("gbm") == {"gbm_pcnsl": "gbm", "glioma_grade": "high", "tubers": "absent"}
    assert study_labels("pcnsl") == {"gbm_pcnsl": "pcnsl", "glioma_grade": "", "tubers": "absent"}
    assert study_labels("lgg")["glioma_grade"] == "low"
    assert study_labels("hgg")["glioma_grade"] == "high"
    assert study_labels("tsc")["tubers"] == "present"
    assert study_labels("normal") == {"gbm_pcnsl": "", "glioma_grade": "", "tubers": "absent"}
    # tumours have no tubers: they are the tubers task's hard negatives
    assert {study_labels(p)["tubers"] for p in ("gbm", "pcnsl", "lgg", "hgg")} == {"absent"}
    with pytest.raises(ValueError, match="phenotype"):
        study_labels("meningioma")


def test_manifest_labels_agree_with_headers(written: Path) -> None:
    m = json.loads((written / "manifest.json").read_text())
    for st in m["studies"]:
        by_kind = {}
        for s in st["series"]:
            files = sorted((written / s["folder"]).glob("*.dcm"), key=lambda p: int(p.stem))
            dss = [pydicom.dcmread(f) for f in files]
            ds = dss[0]
            by_kind[s["kind"]] = dss
            assert (
                ds.SeriesInstanceUID == s["series_uid"] and ds.StudyInstanceUID == st["study_uid"]
            )
            assert ds.SeriesNumber == s["series_number"]
            assert ds.get("SeriesDescription", "") == s["description"]
            assert ds.PatientID == st["patient_id"] and str(ds.PatientName).startswith("SYNTH^CASE")
            assert ds.SpecificCharacterSet == "ISO_IR 100"
            expected = {
                "t1": "T1",
                "t1c": "T1C",
                "t2": "T2",
                "flair": "FLAIR",
                "dwi": "DWI",
                "adc": "ADC",
            }.get(s["kind"], "OTHER")
            assert s["label"] == expected
            if s["kind"] == "dwi":
                assert sorted({float(d.DiffusionBValue) for d in dss}) == [0.0, 1000.0]
            if s["kind"] == "adc":
                assert "ADC" in ds.ImageType and ds.ImageType[0] == "DERIVED"
            if s["kind"] == "flair":
                assert "IR" in ds.ScanningSequence and float(ds.InversionTime) > 1500
            if s["kind"] == "bold":
                assert ds.NumberOfTemporalPositions == 3
        t1, t1c = by_kind["t1"][0], by_kind["t1c"][0]
        assert (t1.RepetitionTime, t1.EchoTime, t1.ScanningSequence) == (
            t1c.RepetitionTime,
            t1c.EchoTime,
            t1c.ScanningSequence,
        )
        assert t1c.SeriesNumber > t1.SeriesNumber and t1c.AcquisitionTime > t1.AcquisitionTime
        assert "ContrastBolusAgent" not in t1
        frames = {ds.FrameOfReferenceUID for dss in by_kind.values() for ds in dss}
        assert len(frames) == 1


@pytest.mark.parametrize(
    ("vendor", "tag", "creator", "expected"),
    [
        ("siemens", (0x0019, 0x0C), "SIEMENS MR HEADER", 1000),
        ("ge", (0x0043, 0x39), "GEMS_PARM_01", 1000),
        ("philips", (0x2001, 0x03), "Philips Imaging DD 001", 1000.0),
    ],
)
def test_vendor_private_b_value(
    vendor: str, tag: tuple[int, int], creator: str, expected: float
) -> None:
    st = generate_study(5, phenotype="normal", vendor=vendor, size=32, slices=4, distractors=False)
    dwi = next(s for s in st.series if s.kind == "dwi")
    ds = dwi.datasets[-1]
    block = ds.private_block(tag[0], creator)
    value = block[tag[1]].value
    first = value[0] if vendor == "ge" else value
    assert float(first) == expected
    assert float(ds.DiffusionBValue) == 1000.0


def test_geometry_consistent() -> None:
    st = generate_study(8, phenotype="normal", vendor="ge", size=32, slices=6, distractors=False)
    dss = next(s for s in st.series if s.kind == "t2").datasets
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.array([d.ImagePositionPatient for d in dss], dtype=float)
    steps = np.diff(ipp, axis=0)
    spacing = float(dss[0].SpacingBetweenSlices)
    assert np.allclose(steps, normal * spacing, atol=1e-3)
    assert float(dss[0].SliceThickness) <= spacing
    assert len({d.FrameOfReferenceUID for d in dss}) == 1


def test_gbm_enhances_on_t1c_not_on_t1() -> None:
    st = _typical("gbm")
    les = st.lesions[0]
    t1, t1c = _pixels(st, "t1"), _pixels(st, "t1c")
    wm = st.volumes["wm_fraction"] > 0.9
    ref = float(np.median(t1[wm]))
    inside = _sphere(st, les, 1.0)
    far = ~_sphere(st, les, 2.5) & wm
    enhancing = (t1c - t1) > 0.4 * ref
    assert enhancing[inside].sum() > 20
    assert enhancing[inside].mean() > 0.1
    assert enhancing[far].mean() < 0.01
    # On T1 alone the lesion is not brighter than white matter.
    assert float(np.percentile(t1[inside], 90)) < 1.2 * ref


def test_lgg_does_not_enhance() -> None:
    st = _typical("lgg")
    t1, t1c = _pixels(st, "t1"), _pixels(st, "t1c")
    ref = float(np.median(t1[st.volumes["wm_fraction"] > 0.9]))
    inside = _sphere(st, st.lesions[0], 0.8)
    assert ((t1c - t1) > 0.4 * ref)[inside].mean() < 0.02


@pytest.mark.parametrize("style", ["a", "b", "c"])
def test_normal_brain_vessels_enhance_and_the_images_tell_post_contrast(style: str) -> None:
    """Every brain has blood that gadolinium brightens (dural sinuses, choroid plexus): a
    normal study's post-contrast T1 differs from its pre-contrast run only there, enough for
    the node's image evidence to call it post-contrast; without vessels (the generator before)
    the two runs were alike and nothing could tell them apart."""
    from node.classify.contrast import judge_contrast

    st = generate_study(
        21, phenotype="normal", vendor="siemens", style=style, distractors=False, size=96,
        slices=24, randomise=True,
    )  # fmt: skip
    t1, t1c = _pixels(st, "t1"), _pixels(st, "t1c")
    ref = float(np.median(t1[st.volumes["wm_fraction"] > 0.9]))
    brighter = (t1c - t1) > 0.4 * ref
    assert brighter.mean() > 0.002  # about a percent of the field of view
    evidence = judge_contrast(t1, t1c)
    assert evidence.post_contrast is True, evidence.reason
    assert judge_contrast(t1, t1).post_contrast is False


def test_plain_style_a_keeps_the_anatomy_the_shipped_bundles_were_trained_on() -> None:
    """Plain style-a studies (no randomisation, no plane) have no vessel map: they are the
    shipped bundles' training data and stay what those bundles were trained on."""
    from node.classify.contrast import judge_contrast

    st = generate_study(21, phenotype="normal", vendor="siemens", distractors=False, size=96)
    evidence = judge_contrast(_pixels(st, "t1"), _pixels(st, "t1c"))
    assert evidence.post_contrast is False, evidence.reason


@pytest.mark.parametrize("source", ["mni152", "procedural", "parametric"])
def test_vessels_are_carved_out_of_csf_not_painted_on(source: str) -> None:
    """The vessel map is a tissue of its own: it takes its volume from CSF (then cortex), so an
    intracranial voxel's fractions still sum to at most one; a few to tens of millilitres."""
    from node.lab.synth.anatomy import TEMPLATE_CHANNELS, carve_vessels

    t = load_template(source)
    maps = t.maps.astype(np.float32) / 255.0
    raw = {name: maps[..., i] for i, name in enumerate(TEMPLATE_CHANNELS)}
    ch = carve_vessels(raw)
    before = raw["csf"] + raw["gm"] + raw["wm"]
    after = ch["csf"] + ch["gm"] + ch["wm"] + ch["vessels"]
    assert float(np.abs(after - before).max()) < 1e-5
    assert float(ch["vessels"].max()) > 0.9
    vessels = ch["vessels"] > 0.5
    step = abs(float(t.affine[0, 0]))
    assert 4.0 < vessels.sum() * step**3 / 1000.0 < 40.0  # millilitres: sinuses and plexus
    assert float(ch["ventricles"][vessels].max()) <= 0.5  # plexus inside, not replacing, CSF


def test_pcnsl_adc_below_white_matter() -> None:
    st = _typical("pcnsl", vendor="ge", size=96)
    adc = _pixels(st, "adc")
    centre = st.lesions[0]["center_voxel"]
    assert isinstance(centre, (list, tuple))
    k, r, c = (int(v) for v in centre)
    assert st.volumes["lesion_fraction"][k, r, c] > 0.5  # the lesion is where the manifest says
    inside = (st.volumes["lesion_fraction"] > 0.8) & _sphere(st, st.lesions[0], 1.0)
    wm = (st.volumes["wm_fraction"] > 0.9) & (adc > 0)
    assert inside.sum() > 20
    assert float(adc[inside].mean()) < 0.9 * float(adc[wm].mean())
    gbm = _typical("gbm", vendor="ge", size=96)
    core = _sphere(gbm, gbm.lesions[0], 0.3)
    wm2 = (gbm.volumes["wm_fraction"] > 0.9) & (_pixels(gbm, "adc") > 0)
    g_adc = _pixels(gbm, "adc")
    assert float(g_adc[core].mean()) > float(g_adc[wm2].mean())


def test_tubers_bright_on_flair() -> None:
    st = _typical("tsc", vendor="philips")
    flair = _pixels(st, "flair")
    tubers = [les for les in st.lesions if les["kind"] == "tuber"]
    assert len(tubers) >= 2
    inside = np.zeros(flair.shape, dtype=bool)
    for les in tubers:
        inside |= _sphere(st, les, 0.5)
    wm = (st.volumes["wm_fraction"] > 0.9) & ~inside
    assert float(flair[inside].mean()) > 1.25 * float(flair[wm].mean())


def test_flair_csf_dark_t2_csf_bright_t1_wm_over_gm() -> None:
    st = generate_study(
        21,
        phenotype="normal",
        vendor="siemens",
        distractors=False,
        size=SMALL_SIZE,
        slices=SMALL_SLICES,
    )
    from node.lab.synth.anatomy import centred_grid, sample_anatomy  # noqa: F401  (shape check only)

    wm = st.volumes["wm_fraction"] > 0.9
    t2, flair, t1 = st.volumes["t2"], st.volumes["flair"], st.volumes["t1"]
    vent_mask = (t2 > np.percentile(t2[t2 > 0], 99)) & (st.volumes["adc"] > 2.0)
    assert vent_mask.sum() > 10
    assert t2[vent_mask].mean() > 2 * t2[wm].mean()
    assert flair[vent_mask].mean() < 0.6 * flair[wm].mean()
    assert t1[wm].mean() > t1[vent_mask].mean()


def test_phenotype_and_vendor_mix_cycles() -> None:
    plan = study_plan(24, 7, None, None)
    assert {p for _, p, _ in plan} == set(PHENOTYPES)
    assert {v for _, _, v in plan} == set(VENDORS)
    assert len({(p, v) for _, p, v in plan}) >= 12
    assert plan == study_plan(24, 7, None, None)
    assert [p for _, p, _ in study_plan(3, 1, ["tsc"], ["ge"])] == ["tsc"] * 3
    with pytest.raises(ValueError, match="vendor"):
        study_plan(1, 1, None, ["canon"])


def test_descriptions_sometimes_blank_or_misleading() -> None:
    statuses = []
    for seed in range(40):
        st = generate_study(
            seed, phenotype="normal", vendor="siemens", size=32, slices=4, distractors=False
        )
        statuses += [s.description_status for s in st.series]
    bad = sum(s != "ok" for s in statuses) / len(statuses)
    assert 0.03 < bad < 0.2
    assert {"blank", "misleading"} <= set(statuses)


def test_contrast_agent_on_some_post_contrast_series() -> None:
    has = []
    for seed in range(12):
        st = generate_study(
            seed, phenotype="normal", vendor="philips", size=32, slices=4, distractors=False
        )
        has.append(
            "ContrastBolusAgent" in next(s for s in st.series if s.kind == "t1c").datasets[0]
        )
    assert 0 < sum(has) < len(has)


def test_distractors_small_and_other(written: Path) -> None:
    m = json.loads((written / "manifest.json").read_text())
    kinds = {s["kind"]: s for s in m["studies"][0]["series"]}
    assert set(kinds) >= {"localizer", "bold", "fieldmap", "fa", "reformat"}
    assert all(
        kinds[k]["label"] == "OTHER" for k in ("localizer", "bold", "fieldmap", "fa", "reformat")
    )
    assert kinds["localizer"]["n_instances"] == 3
    loc = [pydicom.dcmread(p) for p in (written / kinds["localizer"]["folder"]).glob("*.dcm")]
    assert len({tuple(d.ImageOrientationPatient) for d in loc}) == 3
    st = generate_study(1, phenotype="normal", vendor="ge", size=32, slices=4, distractors=False)
    assert [s.kind for s in st.series] == ["t2", "flair", "dwi", "adc", "t1", "t1c"]


def test_enhanced_multiframe() -> None:
    st = generate_study(
        4, phenotype="gbm", vendor="siemens", size=32, slices=6, enhanced=True, distractors=False
    )
    for s in st.series:
        assert len(s.datasets) == 1
        ds = s.datasets[0]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
        n = 12 if s.kind == "dwi" else 6
        assert ds.NumberOfFrames == n and len(ds.PerFrameFunctionalGroupsSequence) == n
        assert ds.pixel_array.shape == (n, 32, 32)
    dwi = next(s for s in st.series if s.kind == "dwi").datasets[0]
    bvals = [f.MRDiffusionSequence[0].DiffusionBValue for f in dwi.PerFrameFunctionalGroupsSequence]
    assert bvals == [0.0] * 6 + [1000.0] * 6
    assert len(dwi.DimensionIndexSequence) == 3
    index = [
        tuple(f.FrameContentSequence[0].DimensionIndexValues)
        for f in dwi.PerFrameFunctionalGroupsSequence
    ]
    assert index[0] == (1, 1, 1) and index[6] == (1, 1, 2) and len(set(index)) == 12


@pytest.mark.parametrize("ts", ["implicit", "rle", "jpeg-ls", "jpeg2000"])
def test_transfer_syntaxes_round_trip(tmp_path: Path, ts: str) -> None:
    ref, out = tmp_path / "ref", tmp_path / ts
    write_studies(ref, studies=1, seed=2, size=32, slices=4, vendors=["ge"], distractors=False)
    write_studies(
        out,
        studies=1,
        seed=2,
        size=32,
        slices=4,
        vendors=["ge"],
        distractors=False,
        transfer_syntax=ts,
    )
    for p in sorted(ref.rglob("*.dcm"))[:10]:
        a = pydicom.dcmread(p)
        b = pydicom.dcmread(out / p.relative_to(ref))
        assert np.array_equal(a.pixel_array, b.pixel_array)
        if ts != "implicit":
            assert b.file_meta.TransferSyntaxUID.is_compressed


def test_unavailable_or_unknown_transfer_syntax(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no encoder available.*jpeg-lossless"):
        write_studies(
            tmp_path, studies=1, seed=1, size=32, slices=4, transfer_syntax="jpeg-lossless"
        )
    with pytest.raises(ValueError, match="transfer_syntax must be one of"):
        write_studies(tmp_path, studies=1, seed=1, size=32, slices=4, transfer_syntax="zip")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="phenotype"):
        generate_study(1, phenotype="x", vendor="ge")
    with pytest.raises(ValueError, match="vendor"):
        generate_study(1, phenotype="gbm", vendor="x")
    with pytest.raises(ValueError, match="size"):
        generate_study(1, phenotype="gbm", vendor="ge", size=8)


def test_procedural_fallback_without_nilearn(monkeypatch: pytest.MonkeyPatch) -> None:
    load_template.cache_clear()
    monkeypatch.setitem(sys.modules, "nilearn", None)  # import nilearn -> ImportError
    try:
        assert load_template().source == "procedural"
        st = generate_study(
            3,
            phenotype="gbm",
            vendor="generic",
            size=32,
            slices=8,
            distractors=False,
            template_source="procedural",
        )
        t2 = st.volumes["t2"]
        assert t2.max() > 0 and st.lesions
        with pytest.raises(ImportError):
            load_template("mni152")
    finally:
        load_template.cache_clear()


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    rc = main(
        [
            "synth",
            "--out",
            str(tmp_path / "o"),
            "--studies",
            "1",
            "--seed",
            "2",
            "--size",
            "32",
            "--slices",
            "4",
            "--phenotype",
            "tsc",
            "--vendor",
            "philips",
            "--no-distractors",
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["studies"][0]["phenotype"] == "tsc" and m["studies"][0]["vendor"] == "philips"
    assert len(m["studies"][0]["series"]) == 6
    rc = main(["synth", "--out", str(tmp_path / "p"), "--phenotype", "meningioma"])
    assert rc == 2
    assert "phenotype" in capsys.readouterr().out


@pytest.mark.slow
def test_one_full_size_study() -> None:
    """A full-size study renders every slice at its size (its speed is a benchmark figure, not
    a test: timed assertions flake on a shared machine)."""
    load_template()
    st = generate_study(
        1, phenotype="gbm", vendor="siemens", size=256, slices=24, distractors=False
    )
    assert sum(len(s.datasets) for s in st.series) == 24 * 7
    assert {(int(d.Rows), int(d.Columns)) for s in st.series for d in s.datasets} == {(256, 256)}


# --- Domain randomisation and rendering styles (issues 12 and 13) ---


def _patient_points(dss: list[pydicom.Dataset]) -> np.ndarray:
    """Patient coordinates (slices, rows, cols, 3) of every pixel, from IOP/IPP/PixelSpacing."""
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    dr, dc = (float(x) for x in dss[0].PixelSpacing)
    r = np.arange(int(dss[0].Rows))[:, None, None] * dr * col
    c = np.arange(int(dss[0].Columns))[None, :, None] * dc * row
    return np.stack([np.array(d.ImagePositionPatient, dtype=float) + r + c for d in dss]).astype(
        np.float32
    )


@pytest.mark.parametrize("style", ["a", "b", "c"])
@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal"])
def test_geometry_per_plane_puts_the_head_right_side_up(plane: str, style: str) -> None:
    from node.lab.synth.anatomy import sample_points

    st = generate_study(
        31,
        phenotype="gbm",
        vendor="siemens",
        size=64,
        slices=10,
        distractors=False,
        style=style,
        plane=plane,
    )
    assert st.subject is not None
    for s in st.series:
        assert s.plane == plane
        dss = list(s.datasets)
        pts = _patient_points(dss)
        # The header's geometry is the one the pixels were rendered on ...
        n = st.grids[s.kind].shape[0]
        assert np.allclose(pts[:n], st.grids[s.kind].points(), atol=0.01)
        if s.kind not in ("t1", "t2"):
            continue
        # ... and the head a reader finds at each pixel's patient position is the one shown.
        f = sample_points(st.subject, pts)
        head: np.ndarray = np.asarray(sum(f[t] for t in ("scalp", "csf", "gm", "wm")) > 0.5)
        img = np.stack([d.pixel_array for d in dss]).astype(float)
        shown = img > 0.1 * np.percentile(img, 99)

        def dice(x: np.ndarray, head: np.ndarray = head) -> float:
            return float(2 * (x & head).sum() / (x.sum() + head.sum()))

        assert dice(shown) > 0.7, (s.kind, dice(shown))
        if plane != "axial":  # upside down, the same pixels would not be the head
            assert dice(shown[:, ::-1]) < dice(shown) - 0.04, (s.kind, dice(shown[:, ::-1]))
        iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
        if plane != "axial":
            assert iop[5] < -0.9  # rows run inferior: the vertex is at the top of the image
    # The lesion is where the T1C header geometry says, not in the mirrored hemisphere.
    t1c = list(next(s for s in st.series if s.kind == "t1c").datasets)
    pts = _patient_points(t1c)
    centre = np.array(st.lesions[0]["center_mm"], dtype=np.float32)
    d = np.linalg.norm(pts - centre, axis=-1)
    k, r, c = np.unravel_index(np.argmin(d), d.shape)
    tol = 0.6 * float(t1c[0].SpacingBetweenSlices) + 2.0
    assert d[k, r, c] < tol and st.volumes["lesion_fraction"][k, r, c] > 0.3
    if abs(centre[0]) > 15:
        mirrored = centre * np.array([-1, 1, 1], dtype=np.float32)
        dm = np.linalg.norm(pts - mirrored, axis=-1)
        km = np.unravel_index(np.argmin(dm), dm.shape)
        assert st.volumes["lesion_fraction"][km] < 0.1


def test_randomised_geometry_varies_and_is_written_consistently() -> None:
    seen = set()
    for seed in range(8):
        st = generate_study(
            seed,
            phenotype="pcnsl",
            vendor="ge",
            size=48,
            slices=8,
            distractors=False,
            randomise=True,
        )
        for s in st.series:
            ds = s.datasets[0]
            seen.add((s.kind, s.plane, s.acquisition))
            assert ds.MRAcquisitionType == s.acquisition
            g = s.geometry
            directions = [float(v) for v in (*g["row_dir"], *g["col_dir"])]  # type: ignore[misc]
            assert [float(x) for x in ds.ImageOrientationPatient] == pytest.approx(
                directions, abs=1e-4
            )
            assert float(ds.SliceThickness) == pytest.approx(g["slice_thickness_mm"], abs=1e-3)
            if s.acquisition == "3D":
                assert float(ds.SliceThickness) < 2.0
            else:
                assert float(ds.SliceThickness) >= 2.9
            # Every series keeps the lesion inside its stack.
            k = s.lesions[0]["center_voxel"][0]  # type: ignore[index]
            assert 0 <= k < g["shape"][0]  # type: ignore[index]
    planes = {p for _, p, _ in seen}
    assert planes == {"axial", "sagittal", "coronal"}
    assert {a for _, _, a in seen} == {"2D", "3D"}
    assert {a for k, _, a in seen if k in ("dwi", "adc")} == {"2D"}


def test_tissue_draws_keep_every_physical_ordering() -> None:
    from node.lab.synth.contrast import TISSUES, Acquisition
    from node.lab.synth.randomise import draw_tissues, ordering_violations

    acqs = {
        "t1": Acquisition(equation="se", tr_ms=500, te_ms=10),
        "t1c": Acquisition(equation="se", tr_ms=500, te_ms=10, contrast=True),
        "t2": Acquisition(equation="se", tr_ms=4500, te_ms=100),
        "flair": Acquisition(equation="ir", tr_ms=9000, te_ms=110, ti_ms=2500),
        "dwi": Acquisition(equation="epi", tr_ms=5000, te_ms=80, b_value=1000, fat_sat=True),
    }
    rng = np.random.default_rng(0)
    t1_wm = []
    for style in ("a", "b", "c"):
        for field_t in (1.5, 3.0):
            for _ in range(15):
                tissues, tries = draw_tissues(rng, style=style, field_t=field_t, acqs=acqs)
                assert tries <= 40
                assert ordering_violations(tissues, acqs, style) == ()
                t1_wm.append(tissues["wm"].t1_ms)
    assert max(t1_wm) / min(t1_wm) > 1.5  # wide ranges, not one table
    # The check itself can fail: a table with T2-dark CSF breaks T2 and FLAIR orderings.
    from dataclasses import replace

    broken = {**TISSUES, "csf": replace(TISSUES["csf"], t2_ms=60.0, t1_ms=700.0)}
    assert "t2: csf > gm > wm" in ordering_violations(broken, acqs, "a")


@pytest.mark.parametrize("style", ["a", "b", "c"])
def test_randomised_images_keep_the_ordering(style: str) -> None:
    from node.lab.synth.anatomy import sample_points

    for seed in (1, 2, 3):
        st = generate_study(
            seed,
            phenotype="normal",
            vendor="philips",
            size=64,
            slices=12,
            distractors=False,
            randomise=True,
            style=style,
        )
        assert st.subject is not None and st.tissue_draws <= 40
        med = {}
        for kind in ("t1", "t2", "flair"):
            f = sample_points(st.subject, st.grids[kind].points())
            up = {
                k: np.clip(
                    __import__("node.lab.synth.contrast", fromlist=["x"]).upsample_inplane(
                        v, 64, 64
                    ),
                    0,
                    1,
                )
                for k, v in f.items()
            }
            vol = st.volumes[kind]
            masks = {"wm": up["wm"] > 0.9, "csf": up["ventricles"] > 0.7}
            if min(int(m.sum()) for m in masks.values()) < 15:
                continue
            med[kind] = {k: float(np.median(vol[m])) for k, m in masks.items()}
        assert med, "no series with enough pure white matter and ventricle"
        if "t1" in med:
            assert med["t1"]["wm"] > med["t1"]["csf"]
        if "t2" in med:
            assert med["t2"]["csf"] > med["t2"]["wm"]
        if "flair" in med:
            assert med["flair"]["csf"] < med["flair"]["wm"]


def test_styles_differ_in_noise_and_headers() -> None:
    kw = {"phenotype": "normal", "vendor": "siemens", "size": 64, "slices": 8}
    a = generate_study(12, distractors=False, style="a", **kw)  # type: ignore[arg-type]
    b = generate_study(12, distractors=False, style="b", **kw)  # type: ignore[arg-type]

    def background_ratio(st: SynthStudy) -> float:
        # Air in the image corners: Rician (one channel) gives Rayleigh noise, mean/std ~1.9;
        # root-sum-of-squares over many coils gives noncentral chi, mean/std well above 3.
        t2 = st.volumes["t2"]
        corner = np.concatenate([t2[:, :6, :6].ravel(), t2[:, -6:, :6].ravel()])
        return float(corner.mean() / corner.std())

    assert background_ratio(a) < 2.4 < 3.0 < background_ratio(b)
    da = {s.kind: s.datasets for s in a.series}
    db = {s.kind: s.datasets for s in b.series}
    assert ({s.description for s in a.series} - {""}).isdisjoint({s.description for s in b.series})
    assert da["t2"][0].StudyDescription != db["t2"][0].StudyDescription
    assert "DiffusionBValue" in da["dwi"][-1] and "DiffusionBValue" not in db["dwi"][-1]
    assert db["dwi"][-1].SequenceName == "*ep_b1000t"  # b-value still in name and private tag
    assert "RescaleSlope" not in da["t2"][0] and float(db["t2"][0].RescaleSlope) == 1.0
    assert db["t2"][0].ProtocolName != db["t2"][0].SeriesDescription
    # Different anatomy: the brain's share of the T2 stack is not the same head.
    assert a.subject is not None and b.subject is not None
    assert a.subject.template_source != b.subject.template_source == "parametric"


def test_randomised_styles_deterministic_per_seed(tmp_path: Path) -> None:
    kw = {"studies": 3, "size": 32, "slices": 6, "styles": ["a", "b", "c"], "randomise": True}
    write_studies(tmp_path / "x", seed=5, **kw)  # type: ignore[arg-type]
    write_studies(tmp_path / "y", seed=5, **kw)  # type: ignore[arg-type]
    write_studies(tmp_path / "z", seed=6, **kw)  # type: ignore[arg-type]
    hx, hy, hz = _hashes(tmp_path / "x"), _hashes(tmp_path / "y"), _hashes(tmp_path / "z")
    assert hx == hy
    assert hx["manifest.json"] != hz["manifest.json"]
    m = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert [s["style"] for s in m["studies"]] == ["a", "b", "c"]
    for study in m["studies"]:
        assert study["randomised"] is True and study["field_strength_t"] in (1.5, 3.0)
        for s in study["series"]:
            assert {"style", "plane", "acquisition", "field_strength_t", "vendor"} <= set(s)
            assert s["vendor"] == study["vendor"] and s["style"] == study["style"]
            if s["label"] != "OTHER":
                assert s["plane"] in ("axial", "sagittal", "coronal")
                assert len(s["geometry"]["shape"]) == 3 and len(s["lesions"]) == len(
                    study["lesions"]
                )


def test_style_and_plane_arguments() -> None:
    with pytest.raises(ValueError, match="style"):
        generate_study(1, phenotype="gbm", vendor="ge", style="d")
    with pytest.raises(ValueError, match="plane"):
        generate_study(1, phenotype="gbm", vendor="ge", plane="oblique")
    with pytest.raises(ValueError, match="style"):
        write_studies(Path("/nonexistent"), studies=1, seed=1, styles=["z"])


def test_cli_synth_style_b_randomised(tmp_path: Path) -> None:
    from node.cli import main

    rc = main(
        [
            "synth",
            "--out",
            str(tmp_path / "o"),
            "--studies",
            "2",
            "--seed",
            "3",
            "--size",
            "32",
            "--slices",
            "6",
            "--style",
            "b",
            "--randomise",
            "--no-distractors",
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert {s["style"] for s in m["studies"]} == {"b"}
    rc = main(
        [
            "synth",
            "--out",
            str(tmp_path / "p"),
            "--studies",
            "1",
            "--size",
            "32",
            "--slices",
            "4",
            "--plane",
            "coronal",
            "--no-distractors",
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert {s["plane"] for s in m["studies"][0]["series"]} == {"coronal"}


def test_randomised_study_in_both_styles() -> None:
    """Both styles render a randomised study at 128x128 (speed: a benchmark figure, not a
    timed assertion)."""
    load_template()
    load_template("parametric")
    for style in ("a", "b", "c"):
        st = generate_study(
            1,
            phenotype="gbm",
            vendor="ge",
            size=128,
            slices=16,
            distractors=False,
            style=style,
            randomise=True,
        )
        assert len(st.series) >= 4 and all(s.datasets for s in st.series)
        for s in st.series:  # every series carries an image, not a blank
            mid = s.datasets[len(s.datasets) // 2]
            assert float(np.asarray(mid.pixel_array, dtype=float).std()) > 0


@pytest.mark.parametrize(("plane", "style"), [("axial", "a"), ("sagittal", "a"), ("coronal", "b")])
def test_distractors_are_centred_on_the_head(plane: str, style: str) -> None:
    """BOLD, field map and FA are centred on the routed stack's middle, not on the corner of its
    middle slice (ImagePositionPatient): the head fills the middle of their images."""
    st = generate_study(
        5, phenotype="normal", vendor="siemens", size=64, slices=8, style=style, plane=plane
    )
    for s in st.series:
        if s.kind not in ("bold", "fieldmap", "fa"):
            continue
        ds = s.datasets[len(s.datasets) // 2]
        img = ds.pixel_array.astype(np.float64)
        head = img > img.min() + 0.2 * (img.max() - img.min())
        rows, cols = np.nonzero(head)
        assert head.mean() > 0.2, (s.kind, head.mean())
        for got, n in ((rows.mean(), img.shape[0]), (cols.mean(), img.shape[1])):
            assert abs(got - (n - 1) / 2) < 0.15 * n, (s.kind, plane, got, n)


# --- Rendering style c (issue 13, item 5: a third style for calibration) ---


def test_style_c_differs_in_physics_noise_and_headers() -> None:
    kw = {"phenotype": "normal", "vendor": "ge", "size": 64, "slices": 8, "distractors": False}
    a = generate_study(12, style="a", **kw)  # type: ignore[arg-type]
    b = generate_study(12, style="b", **kw)  # type: ignore[arg-type]
    c = generate_study(12, style="c", **kw)  # type: ignore[arg-type]
    # Its own deformation of the atlas: radial-basis bumps, no sinusoids, no lattice field.
    assert c.subject is not None and c.subject.bumps is not None
    assert c.subject.elastic is None and c.subject.warp_amp.size == 0
    assert c.subject.template_source != "parametric"
    # Headers: its own naming, numbering, storage and protocol name.
    names = {s.kind: s.description for s in c.series}
    for other in (a, b):
        assert ({s.description for s in other.series} - {""}).isdisjoint(set(names.values()))
    dc = {s.kind: s.datasets for s in c.series}
    t2 = dc["t2"][0]
    assert t2.StudyDescription == "NEURO^BRAIN TUMOUR"
    assert t2.ProtocolName == f"BRAIN_TUMOUR_{c.field_t:g}T"
    assert t2.SeriesNumber % 100 == 0 and dc["adc"][0].SeriesNumber == dc["dwi"][0].SeriesNumber + 1
    # GE stores signed 16 bits in styles a and b; style c stores unsigned 16 bits.
    da = {s.kind: s.datasets for s in a.series}
    assert da["t2"][0].PixelRepresentation == 1 and t2.PixelRepresentation == 0
    assert t2.BitsStored == 16
    # Noise: one Rician channel (Rayleigh background, mean/std ~1.9), unlike style b's coils.
    corner = np.concatenate(
        [c.volumes["t2"][:, :6, :6].ravel(), c.volumes["t2"][:, -6:, :6].ravel()]
    )
    assert 1.5 < float(corner.mean() / corner.std()) < 2.4
    # Style c's signal model is not style a's or b's: the same tissue gives other contrasts.
    from node.lab.synth.contrast import (
        TISSUES,
        Acquisition,
        tissue_signal,
        tissue_signal_b,
        tissue_signal_c,
    )

    t2_acq = Acquisition(equation="se", tr_ms=4500, te_ms=100, echo_train=16, mt=0.35)
    ratios = [
        f(TISSUES["gm"], t2_acq) / f(TISSUES["wm"], t2_acq)
        for f in (tissue_signal, tissue_signal_b, tissue_signal_c)
    ]
    assert abs(ratios[2] - ratios[0]) > 0.03 and abs(ratios[2] - ratios[1]) > 0.03


def test_style_c_physics_follow_the_field() -> None:
    """T2* shortening grows with the field (gradient echo darker at 3 T), MT saturation darkens
    white matter more than grey on a multi-slice T2, and the transmit field is stronger at 3 T."""
    from dataclasses import replace

    from node.lab.synth.contrast import TISSUES, Acquisition, tissue_signal_c, transmit_field

    gre = Acquisition(equation="gre", tr_ms=10, te_ms=4.5, flip_deg=12)
    wm = TISSUES["wm"]
    assert tissue_signal_c(wm, replace(gre, field_t=3.0)) < tissue_signal_c(wm, gre)
    t2 = Acquisition(equation="se", tr_ms=4500, te_ms=100)
    gm = TISSUES["gm"]

    def gm_wm(acq: Acquisition) -> float:
        return tissue_signal_c(gm, acq) / tissue_signal_c(wm, acq)

    assert gm_wm(replace(t2, mt=0.4)) > gm_wm(t2) * 1.03
    rng = np.random.default_rng(0)
    spread = {f: float(np.ptp(transmit_field(rng, (4, 32, 32), f))) for f in (1.5, 3.0)}
    assert spread[3.0] > 2 * spread[1.5]


def test_style_c_flair_nulls_csf_and_lesions_keep_their_signs() -> None:
    """On rendered style-c images: FLAIR CSF dark, lymphoma bright on T1C and dark on ADC."""
    from node.lab.synth.anatomy import sample_points

    st = generate_study(
        4, phenotype="pcnsl", vendor="siemens", size=64, slices=12, distractors=False, style="c"
    )
    assert st.subject is not None
    f = sample_points(st.subject, st.grids["flair"].points())
    from node.lab.synth.contrast import upsample_inplane

    vent = np.clip(upsample_inplane(f["ventricles"], 64, 64), 0, 1) > 0.7
    wm = st.volumes["wm_fraction"] > 0.9
    fl = st.volumes["flair"]
    assert np.median(fl[vent]) < 0.6 * np.median(fl[wm])
    lesion = st.volumes["lesion_fraction"] > 0.8
    assert lesion.sum() > 10
    t1, t1c = st.volumes["t1"], st.volumes["t1c"]
    assert np.median(t1c[lesion]) > 1.2 * np.median(t1c[wm])
    assert np.median(t1[lesion]) < np.median(t1[wm])
    # The ADC map has the DWI's own grid: the lesion centre there against its white matter.
    adc_series = next(s for s in st.series if s.kind == "adc")
    centre = adc_series.lesions[0]["center_voxel"]
    k, r, c = (round(float(x)) for x in centre)  # type: ignore[attr-defined]
    fa = sample_points(st.subject, st.grids["adc"].points())
    wm_adc = np.clip(upsample_inplane(fa["wm"], 64, 64), 0, 1) > 0.9
    adc = st.volumes["adc"]
    assert np.median(adc[k, r - 1 : r + 2, c - 1 : c + 2]) < 0.95 * np.median(adc[wm_adc])


def test_cli_synth_style_c_randomised_is_deterministic(tmp_path: Path) -> None:
    from node.cli import main

    args = ["--studies", "2", "--seed", "3", "--size", "32", "--slices", "6", "--style", "c"]
    for name in ("x", "y"):
        assert main(["synth", "--out", str(tmp_path / name), *args, "--randomise"]) == 0
    assert _hashes(tmp_path / "x") == _hashes(tmp_path / "y")
    m = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert {s["style"] for s in m["studies"]} == {"c"}
    routed = [s for st in m["studies"] for s in st["series"] if s["label"] != "OTHER"]
    assert {s["style"] for s in routed} == {"c"}
    assert all(s["artefacts"]["accel"] in (2, 3, 4) for s in routed)


def test_style_c_files_pass_dciodvfy(tmp_path: Path) -> None:
    """Every vendor's style-c files, classic and enhanced, without dciodvfy errors."""
    import shutil
    import subprocess

    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    for enhanced in (False, True):
        out = tmp_path / ("enh" if enhanced else "classic")
        write_studies(
            out,
            studies=4,
            seed=19,
            vendors=["siemens", "ge", "philips", "generic"],
            size=32,
            slices=4,
            enhanced=enhanced,
            styles=["c"],
            randomise=True,
            distractors=False,
        )
        files = sorted(out.rglob("*.dcm"))
        assert files
        failures = {}
        for f in files[::2]:
            run = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True, check=False)
            errors = [x for x in (run.stdout + run.stderr).splitlines() if x.startswith("Error")]
            if errors:
                failures[str(f.relative_to(tmp_path))] = errors
        assert failures == {}

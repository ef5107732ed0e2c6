"""Series headers from in-memory datasets: vendor b-value tags, enhanced groups, grouping."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from node.dicom.headers import header_from_datasets, normalise_manufacturer, read_series_headers

MR = "1.2.840.10008.5.1.4.1.1.4"
ENH_MR = "1.2.840.10008.5.1.4.1.1.4.1"
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


def mr(number: int = 1, z: float = 0.0, **kw: Any) -> Dataset:
    """One classic MR instance with the attributes the header reader uses."""
    ds = Dataset()
    ds.SOPClassUID = MR
    ds.SOPInstanceUID = f"1.2.3.4.{number}.{int(z * 10)}"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.SeriesNumber = 5
    ds.InstanceNumber = number
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.SeriesDescription = "t1_se_tra"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = ["SK", "SP"]
    ds.RepetitionTime = "500"
    ds.EchoTime = "12"
    ds.FlipAngle = "90"
    ds.ImageOrientationPatient = AXIAL
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.PixelSpacing = [0.9, 0.9]
    ds.SliceThickness = "5"
    ds.Rows = 256
    ds.Columns = 256
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.AcquisitionTime = "101500.5"
    for key, value in kw.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("SIEMENS", "siemens"),
        ("Siemens Healthineers", "siemens"),
        ("Siemens HealthCare GmbH", "siemens"),
        ("GE MEDICAL SYSTEMS", "ge"),
        ("GE", "ge"),
        ("Philips Medical Systems", "philips"),
        ("Philips Healthcare", "philips"),
        ("TOSHIBA_MEC", "canon"),
        ("Canon Medical Systems", "canon"),
        ("UIH", "uih"),
        ("United Imaging Healthcare", "uih"),
        ("Hitachi Medical Corporation", "hitachi"),
        ("FUJIFILM Healthcare", "hitachi"),
        ("Bruker", "other"),
        ("", "other"),
    ],
)
def test_manufacturer_names_are_normalised(text: str, name: str) -> None:
    assert normalise_manufacturer(text) == name


def test_classic_series_physics_geometry_and_times() -> None:
    datasets = [mr(i + 1, z=5.0 * i) for i in range(3)]
    datasets[2].AcquisitionTime = "101730"
    h = header_from_datasets(reversed(datasets))
    assert h.series_uid == "1.2.3.4" and h.series_number == 5
    assert h.manufacturer == "siemens"
    assert h.scanning_sequence == ("SE",)
    assert h.sequence_variant == ("SK", "SP")
    assert (h.repetition_time_ms, h.echo_time_ms, h.flip_angle_deg) == (500.0, 12.0, 90.0)
    assert h.echo_times_ms == (12.0,)
    assert h.inversion_time_ms is None
    assert h.orientation == "axial" and h.orientations == ("axial",)
    assert h.n_instances == 3 and h.n_frames == 3 and h.n_temporal_positions == 1
    assert h.acquisition_times == (36900.5, 37050.0)
    assert h.pixel_spacing == (0.9, 0.9) and h.slice_thickness == 5.0
    assert h.rows == 256 and h.samples_per_pixel == 1
    assert not h.is_localizer and not h.is_mosaic
    assert h.inversion_recovery is False


def test_siemens_private_b_value() -> None:
    datasets = []
    for i, b in enumerate(("0", "1000", "1000")):
        ds = mr(i + 1, ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"])
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", b)
        datasets.append(ds)
    assert header_from_datasets(datasets).b_values == (0.0, 1000.0)


def test_ge_private_b_value_drops_the_billion_bias() -> None:
    a = mr(1, Manufacturer="GE MEDICAL SYSTEMS")
    a.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", [1000001000, 8, 0, 0])
    b = mr(2, Manufacturer="GE MEDICAL SYSTEMS")
    block = b.private_block(0x0043, "GEMS_PARM_01", create=True)
    block.add_new(0x39, "UN", b"0\\8\\0\\0 ")  # implicit-VR style raw bytes
    h = header_from_datasets([a, b])
    assert h.manufacturer == "ge"
    assert h.b_values == (0.0, 1000.0)


def test_ge_private_pulse_sequence_name_and_phase_image() -> None:
    ds = mr(1, Manufacturer="GE MEDICAL SYSTEMS")
    ds.private_block(0x0019, "GEMS_ACQU_01", create=True).add_new(0x9C, "LO", "B0map")
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x2F, "SS", 1)
    h = header_from_datasets([ds])
    assert h.sequence_name == "B0map"
    assert h.complex_parts == ("PHASE",)


def test_philips_private_b_value_float_and_raw_bytes() -> None:
    a = mr(1, Manufacturer="Philips Medical Systems")
    a.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", 800.0)
    b = mr(2, Manufacturer="Philips Medical Systems")
    b.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(
        0x03, "UN", struct.pack("<f", 0.0)
    )
    assert header_from_datasets([a, b]).b_values == (0.0, 800.0)


def test_uih_private_b_value() -> None:
    ds = mr(1, Manufacturer="UIH")
    ds.add_new((0x0065, 0x0010), "LO", "Image Private Header")
    ds.add_new((0x0065, 0x1009), "FD", 1000.0)
    assert header_from_datasets([ds]).b_values == (1000.0,)


def test_canon_b_value_from_image_comments() -> None:
    ds = mr(1, Manufacturer="TOSHIBA_MEC", ImageComments="b=1000(0.140,0.134,-0.981)")
    other = mr(2, Manufacturer="TOSHIBA_MEC", ImageComments="b=0(0,0,0)")
    assert header_from_datasets([ds, other]).b_values == (0.0, 1000.0)


def test_private_b_value_of_another_vendor_is_ignored() -> None:
    ds = mr(1, Manufacturer="Philips Medical Systems")
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", "1000")
    assert header_from_datasets([ds]).b_values == ()


def test_standard_b_value_contrast_agent_and_inversion() -> None:
    ds = mr(
        1,
        DiffusionBValue=1000.0,
        ContrastBolusAgent="Gadovist",
        ContrastBolusRoute="IV",
        ScanningSequence=["SE", "IR"],
        InversionTime="2500",
    )
    h = header_from_datasets([ds])
    assert h.b_values == (1000.0,)
    assert (h.contrast_agent, h.contrast_route) == ("Gadovist", "IV")
    assert h.inversion_recovery is True and h.inversion_time_ms == 2500.0


def test_blank_contrast_agent_words_mean_none() -> None:
    assert header_from_datasets([mr(1, ContrastBolusAgent="NONE")]).contrast_agent is None


def test_two_echoes_and_repeated_positions() -> None:
    field_map = [mr(1, z=0.0, EchoTime="4.92"), mr(2, z=0.0, EchoTime="7.38")]
    assert header_from_datasets(field_map).echo_times_ms == (4.92, 7.38)
    assert header_from_datasets(field_map).n_temporal_positions == 1
    bold = [mr(i + 1, z=float(i % 3)) for i in range(30)]  # 3 slices x 10 volumes
    assert header_from_datasets(bold).n_temporal_positions == 10


def test_temporal_positions_tag_and_mosaic() -> None:
    ds = mr(1, NumberOfTemporalPositions=120, ImageType=["ORIGINAL", "PRIMARY", "M", "MOSAIC"])
    h = header_from_datasets([ds])
    assert h.n_temporal_positions == 120 and h.is_mosaic


def test_localizer_from_mixed_planes_and_image_type() -> None:
    mixed = [mr(1), mr(2, ImageOrientationPatient=SAGITTAL)]
    assert header_from_datasets(mixed).is_localizer
    assert header_from_datasets(mixed).orientations == ("axial", "sagittal")
    loc = mr(1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert header_from_datasets([loc]).is_localizer


def _item(**kw: Any) -> Dataset:
    item = Dataset()
    for key, value in kw.items():
        setattr(item, key, value)
    return item


def enhanced(frame_types: list[list[str]], tes: list[float], bs: list[float]) -> Dataset:
    """An enhanced MR object whose facts live only in its functional groups."""
    ds = Dataset()
    ds.SOPClassUID = ENH_MR
    ds.SOPInstanceUID = "1.2.3.9.1"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.9"
    ds.SeriesNumber = 801
    ds.Modality = "MR"
    ds.Manufacturer = "Philips Medical Systems"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "T1", "MIXED"]
    ds.AcquisitionContrast = "T1"
    ds.PulseSequenceName = "FFE"
    ds.EchoPulseSequence = "GRADIENT"
    ds.NumberOfFrames = len(frame_types)
    ds.Rows = 64
    ds.Columns = 64
    shared = _item(
        MRTimingAndRelatedParametersSequence=DicomSequence(
            [_item(RepetitionTime="3.8", FlipAngle="12", EchoTrainLength="1")]
        ),
        MRModifierSequence=DicomSequence([_item(InversionRecovery="NO")]),
        ContrastBolusUsageSequence=DicomSequence(
            [_item(ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES")]
        ),
        PixelMeasuresSequence=DicomSequence([_item(PixelSpacing=[2.0, 2.0], SliceThickness="3")]),
    )
    frames = []
    for i, (ft, te, b) in enumerate(zip(frame_types, tes, bs, strict=True)):
        frames.append(
            _item(
                MRImageFrameTypeSequence=DicomSequence([_item(FrameType=ft)]),
                MREchoSequence=DicomSequence([_item(EffectiveEchoTime=te)]),
                MRDiffusionSequence=DicomSequence(
                    [_item(DiffusionBValue=b, DiffusionDirectionality="ISOTROPIC")]
                ),
                FrameContentSequence=DicomSequence([_item(TemporalPositionIndex=i + 1)]),
                PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=AXIAL)]),
                PlanePositionSequence=DicomSequence(
                    [_item(ImagePositionPatient=[0.0, 0.0, float(i)])]
                ),
            )
        )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    return ds


def test_enhanced_functional_groups_are_read() -> None:
    ds = enhanced(
        [["ORIGINAL", "PRIMARY", "T1", "M"], ["ORIGINAL", "PRIMARY", "T1", "FIELD_MAP"]],
        [1.52, 0.0],
        [0.0, 1000.0],
    )
    h = header_from_datasets([ds])
    assert h.manufacturer == "philips"
    assert h.sequence_name == "FFE" and h.echo_pulse_sequence == "GRADIENT"
    assert "FIELD_MAP" in h.image_type and h.image_type[:4] == (
        "ORIGINAL",
        "PRIMARY",
        "T1",
        "MIXED",
    )
    assert h.acquisition_contrast == ("T1",)
    assert (h.repetition_time_ms, h.flip_angle_deg, h.echo_train_length) == (3.8, 12.0, 1)
    assert h.echo_times_ms == (0.0, 1.52)
    assert h.b_values == (0.0, 1000.0)
    assert h.diffusion_directionality == ("ISOTROPIC",)
    assert h.contrast_agent == "administered"
    assert h.inversion_recovery is False
    assert h.n_frames == 2 and h.n_temporal_positions == 2
    assert h.pixel_spacing == (2.0, 2.0) and h.slice_thickness == 3.0
    assert h.orientation == "axial"


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_read_series_headers_groups_by_uid_and_splits_series_numbers(tmp_path: Path) -> None:
    for i in range(3):
        _save(mr(i + 1, z=float(i)), tmp_path / f"a{i}.dcm")
    # One UID re-sent under two series numbers (as in dcm_qa_ts): two series.
    for number in (7, 8):
        ds = mr(1, SeriesInstanceUID="1.2.3.7", SeriesNumber=number)
        ds.SOPInstanceUID = f"1.2.3.7.{number}"
        _save(ds, tmp_path / f"ts{number}.dcm")
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "sub").mkdir()
    _save(mr(1, SeriesInstanceUID="1.2.3.5", SeriesNumber=2), tmp_path / "sub" / "x.dcm")
    headers = read_series_headers([tmp_path])
    assert [(h.series_uid, h.series_number, h.n_instances) for h in headers] == [
        ("1.2.3.5", 2, 1),
        ("1.2.3.4", 5, 3),
        ("1.2.3.7", 7, 1),
        ("1.2.3.7", 8, 1),
    ]


def test_read_series_headers_accepts_single_files(tmp_path: Path) -> None:
    path = _save(mr(1), tmp_path / "one.dcm")
    (headers,) = read_series_headers([path])
    assert headers.series_description == "t1_se_tra"
    assert read_series_headers([tmp_path / "missing"]) == ()


def test_enhanced_groups_with_missing_values_do_not_fail() -> None:
    ds = enhanced([["ORIGINAL", "PRIMARY", "M", "NONE"]], [30.0], [0.0])
    timing = ds.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence[0]
    del timing.RepetitionTime
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
    h = header_from_datasets([ds])
    assert h.repetition_time_ms is None and h.slice_thickness is None
    assert h.flip_angle_deg == 12.0


def test_header_needs_an_instance() -> None:
    with pytest.raises(ValueError, match="at least one instance"):
        header_from_datasets([])


def test_enhanced_pulse_sequence_flags_become_classic_codes() -> None:
    ds = enhanced([["ORIGINAL", "PRIMARY", "M", "NONE"]], [30.0], [0.0])
    ds.EchoPlanarPulseSequence = "YES"
    ds.TimeOfFlightContrast = "YES"
    ds.PhaseContrast = "NO"
    h = header_from_datasets([ds])
    assert h.scanning_sequence == ("EP", "GR")
    assert h.scan_options == ("TOF",)
    ds.EchoPulseSequence = "SPIN"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SharedFunctionalGroupsSequence[0].MRModifierSequence[0].InversionRecovery = "YES"
    assert header_from_datasets([ds]).scanning_sequence == ("SE", "IR")


def test_private_tags_carry_vendor_series_through_the_rules() -> None:
    """Blank descriptions: the private b-value alone makes DWI, per vendor."""
    from node.classify.tags import classify_by_tags
    from node.records import SequenceLabel

    def dwi(vendor: str, b: float) -> Dataset:
        ds = mr(
            1,
            Manufacturer=vendor,
            SeriesDescription="",
            ScanningSequence=["EP", "SE"],
            ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
            RepetitionTime="6000",
            EchoTime="80",
        )
        if vendor.startswith("GE"):
            block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
            block.add_new(0x39, "IS", [1_000_000_000 + int(b), 8, 0, 0])
        elif vendor.startswith("Philips"):
            block = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
            block.add_new(0x03, "FL", b)
        elif vendor.startswith("TOSHIBA"):
            ds.ImageComments = f"b={int(b)}(0.1,0.2,0.97)"
        elif vendor == "UIH":
            ds.add_new((0x0065, 0x1009), "FD", b)
        else:
            block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
            block.add_new(0x0C, "IS", str(int(b)))
        return ds

    for vendor in ("GE MEDICAL SYSTEMS", "Philips", "TOSHIBA_MEC", "UIH", "SIEMENS"):
        verdict = classify_by_tags(header_from_datasets([dwi(vendor, 1000.0)]))
        assert verdict.label is SequenceLabel.DWI, vendor
        assert verdict.rule == "dwi-bvalue"
        # The same EPI without any b-value is not routed as DWI.
        plain = mr(1, Manufacturer=vendor, SeriesDescription="", ScanningSequence=["EP", "SE"])
        assert classify_by_tags(header_from_datasets([plain])).label is SequenceLabel.OTHER


# --- private creators removed by an anonymiser (read at the fixed address, as dcm2niix does) ---


def _dwi(vendor: str) -> Dataset:
    return mr(
        1,
        Manufacturer=vendor,
        SeriesDescription="",
        ScanningSequence=["EP", "SE"],
        ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
        RepetitionTime="6000",
        EchoTime="80",
    )


@pytest.mark.parametrize(
    ("vendor", "tag", "vr", "value", "address"),
    [
        ("SIEMENS", (0x0019, 0x100C), "IS", "1000", "(0019,100C)"),
        ("GE MEDICAL SYSTEMS", (0x0043, 0x1039), "IS", [1_000_001_000, 8, 0, 0], "(0043,1039)"),
        ("Philips Medical Systems", (0x2001, 0x1003), "FL", 1000.0, "(2001,1003)"),
    ],
)
def test_b_value_at_the_fixed_address_when_the_creator_was_removed(
    vendor: str, tag: tuple[int, int], vr: str, value: Any, address: str
) -> None:
    from node.classify.tags import classify_by_tags
    from node.records import SequenceLabel

    ds = _dwi(vendor)
    ds.add_new(tag, vr, value)  # the element is kept, its private creator (gggg,0010) is gone
    h = header_from_datasets([ds])
    assert h.b_values == (1000.0,)
    assert address in h.b_values_note and "private creator missing" in h.b_values_note
    verdict = classify_by_tags(h)
    assert verdict.label is SequenceLabel.DWI
    assert "private creator missing" in verdict.reason


def test_fixed_address_is_not_read_when_another_creator_owns_the_block() -> None:
    ds = _dwi("SIEMENS")
    ds.add_new((0x0019, 0x0010), "LO", "SOME OTHER CREATOR")
    ds.add_new((0x0019, 0x100C), "IS", "1000")
    h = header_from_datasets([ds])
    assert h.b_values == () and h.b_values_note == ""


def test_b_value_with_its_creator_says_nothing_about_addresses() -> None:
    ds = _dwi("SIEMENS")
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", "1000")
    h = header_from_datasets([ds])
    assert h.b_values == (1000.0,) and h.b_values_note == ""


def test_private_tag_checks_its_arguments() -> None:
    from node.dicom.private import PrivateTag

    with pytest.raises(ValueError, match="group"):
        PrivateTag(group=0x0018, creator="X", offset=0x0C, name="even group")
    with pytest.raises(TypeError, match="creator"):
        PrivateTag(group=0x0019, creator="", offset=0x0C, name="no creator")
    with pytest.raises(ValueError, match="offset"):
        PrivateTag(group=0x0019, creator="X", offset=0x100, name="offset too big")


# --- non-image objects sharing a series with images ---------------------------------------------

RAW_DATA = "1.2.840.10008.5.1.4.1.1.66"
SIEMENS_NON_IMAGE = "1.3.12.2.1107.5.9.1"


def _non_image(sop_class: str, number: int, **kw: Any) -> Dataset:
    ds = mr(number, SOPClassUID=sop_class, **kw)
    for keyword in ("Rows", "Columns", "ImageType", "PixelSpacing", "ImageOrientationPatient"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def test_non_image_objects_do_not_decide_the_series() -> None:
    from node.classify.tags import classify_by_tags
    from node.records import SequenceLabel

    raw = _non_image(RAW_DATA, 0)  # lowest instance number: it would have been "first"
    csa = _non_image(SIEMENS_NON_IMAGE, 99)
    h = header_from_datasets([raw, mr(1, z=0.0), mr(2, z=5.0), csa])
    assert h.sop_class_uid == MR and h.n_instances == 2 and h.n_set_aside == 2
    assert classify_by_tags(h).label is SequenceLabel.T1


def test_a_series_of_only_non_image_objects_stays_other() -> None:
    from node.classify.tags import classify_by_tags
    from node.records import SequenceLabel

    h = header_from_datasets([_non_image(RAW_DATA, 1)])
    assert h.n_set_aside == 0 and h.sop_class_uid == RAW_DATA
    assert classify_by_tags(h).label is SequenceLabel.OTHER


def test_read_series_headers_sets_non_images_aside_before_splitting_numbers(
    tmp_path: Path,
) -> None:
    _save(mr(1, z=0.0), tmp_path / "a.dcm")
    _save(mr(2, z=5.0), tmp_path / "b.dcm")
    # Raw data under the images' UID but with its own SeriesNumber: no spurious extra series.
    _save(_non_image(RAW_DATA, 3, SeriesNumber=99), tmp_path / "raw.dcm")
    (h,) = read_series_headers([tmp_path])
    assert (h.series_number, h.n_instances, h.n_set_aside) == (5, 2, 1)


# --- susceptibility-weighted and phase images ---------------------------------------------------


@pytest.mark.parametrize(
    "image_type",
    [
        ["ORIGINAL", "PRIMARY", "SW_M_FFE", "M", "FFE"],  # Philips SWIp magnitude
        ["ORIGINAL", "PRIMARY", "SW_P_FFE", "P", "FFE"],  # Philips SWIp phase
        ["DERIVED", "PRIMARY", "SWI", "NORM", "DIS2D"],  # Siemens SWI
        ["DERIVED", "PRIMARY", "MNIP", "NORM"],  # Siemens minimum-intensity projection
        ["ORIGINAL", "PRIMARY", "P", "ND"],  # Siemens phase
        ["ORIGINAL", "PRIMARY", "PHASE"],
    ],
)
def test_susceptibility_and_phase_images_are_other_never_t1(image_type: list[str]) -> None:
    from node.classify.tags import classify_by_tags
    from node.records import SequenceLabel

    # Short TR, short TE, moderate flip: the spoiled-GRE physics alone would say T1.
    ds = mr(
        1,
        SeriesDescription="",
        ImageType=image_type,
        ScanningSequence="GR",
        RepetitionTime="27",
        EchoTime="12",
        FlipAngle="15",
    )
    verdict = classify_by_tags(header_from_datasets([ds]))
    assert verdict.label is SequenceLabel.OTHER, verdict


def test_enhanced_acquisition_contrast_t2_star_is_other() -> None:
    from node.classify.tags import classify_by_tags
    from node.records import SequenceLabel

    ds = mr(1, SeriesDescription="", ScanningSequence="GR", RepetitionTime="27", EchoTime="12")
    ds.AcquisitionContrast = "T2_STAR"
    verdict = classify_by_tags(header_from_datasets([ds]))
    assert (verdict.label, verdict.rule) == (SequenceLabel.OTHER, "susceptibility")

"""DICOM writing for synthetic studies: one header builder for all vendors, classic or enhanced.

Why this module is long: DICOM writing for classic and enhanced MR in every transfer syntax,
with the per-vendor private tags; lab code, never imported by the node.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import config as dcm_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from node.lab.synth.vendors import Protocol, Vendor

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
IMPLEMENTATION_UID = UID("1.2.826.0.1.3680043.8.498.1")  # pydicom's root + .1: this generator

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg-lossless": JPEGLosslessSV1,
}
# What to install when an encoder is missing.
_ENCODER_PACKAGES = {
    "rle": "numpy (pydicom's native RLE encoder)",
    "jpeg-ls": "pyjpegls",
    "jpeg2000": "pylibjpeg and pylibjpeg-openjpeg",
    "jpeg-lossless": (
        "nothing: pydicom 3 has no JPEG Lossless (Process 14) encoder; use jpeg-ls, jpeg2000 or rle"
    ),
}


def check_transfer_syntax(name: str) -> UID:
    """The UID for a transfer syntax name; ValueError if unknown or its encoder is missing."""
    if name not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {tuple(TRANSFER_SYNTAXES)}, not {name!r}")
    uid = TRANSFER_SYNTAXES[name]
    if uid.is_compressed:
        from pydicom.pixels.encoders.base import get_encoder

        try:
            available = get_encoder(uid).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ValueError(
                f"no encoder available for transfer syntax {name!r} ({uid}); install "
                f"{_ENCODER_PACKAGES[name]}"
            )
    return uid


def make_uid(*parts: object) -> str:
    """A valid UID derived only from the given parts (same parts, same UID)."""
    return str(generate_uid(entropy_srcs=["neuronode.synth", *(str(p) for p in parts)]))


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyHeader:
    """Patient, study and equipment attributes shared by every series of a study."""

    seed: int
    study_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    weight_kg: float
    study_date: str
    study_time: str
    accession: str
    study_id: str
    vendor: Vendor
    model: str
    field_t: float
    serial: str
    study_description: str = "MR BRAIN WITH AND WITHOUT CONTRAST"


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameSpec:
    """Geometry and acquisition facts of one image (one file, or one frame when enhanced)."""

    position: tuple[float, float, float]
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    pixel_mm: tuple[float, float]
    thickness_mm: float
    slice_mm: float
    b_value: float | None = None
    temporal_index: int | None = None  # 1-based
    time: str = ""  # AcquisitionTime hhmmss.ffffff
    sequence_name: str | None = None  # per-frame override (Siemens *ep_b0 / *ep_b1000t)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SeriesSpec:
    """One series to write: its protocol as the vendor names it, pixel values and frames."""

    kind: str
    protocol: Protocol
    description: str
    series_uid: str
    series_number: int
    series_time: str
    frames: tuple[FrameSpec, ...]
    pixels: npt.NDArray[np.integer]  # (frames, rows, cols) stored values
    rescale_slope: float | None
    contrast_agent: str | None
    temporal_positions: int | None
    imaging_frequency_mhz: float
    # Header conventions that differ between rendering styles (defaults: style a).
    standard_b_value: bool = True  # classic DWI: also the standard DiffusionBValue (0018,9087)
    window: bool = True  # classic: WindowCenter/WindowWidth
    protocol_name: str | None = None  # ProtocolName when it differs from the description


def _ds(s: str) -> str:
    """A decimal string short enough for DS (16 chars)."""
    out = f"{s}"
    return out[:16]


def _fmt(v: float) -> str:
    return _ds(f"{v:.6g}")


def _window(pixels: npt.NDArray[np.integer], slope: float) -> tuple[float, float]:
    lo, hi = np.percentile(pixels[:, ::4, ::4], [1, 99.5])
    return (float(round((lo + hi) / 2 * slope, 1)), float(round(max(hi - lo, 1) * slope, 1)))


def _common(
    ds: Dataset, study: StudyHeader, series: SeriesSpec, sop_class: UID, sop_uid: str
) -> None:
    """Attributes every instance shares: SOP common, patient, study, series, equipment."""
    v = study.vendor
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = series.series_time
    ds.StudyDate = study.study_date
    ds.SeriesDate = study.study_date
    ds.AcquisitionDate = study.study_date
    ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = series.series_time
    ds.ContentTime = series.series_time
    ds.AccessionNumber = study.accession
    ds.Modality = "MR"
    ds.Manufacturer = v.manufacturer
    ds.InstitutionName = v.institution
    ds.ReferringPhysicianName = ""
    ds.StationName = f"SYNMR{study.serial[-3:]}"
    ds.StudyDescription = study.study_description
    if series.description:
        ds.SeriesDescription = series.description
    ds.ManufacturerModelName = study.model
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = study.age
    ds.PatientWeight = _fmt(study.weight_kg)
    ds.PatientIdentityRemoved = "NO"
    ds.BodyPartExamined = "BRAIN"
    ds.DeviceSerialNumber = study.serial
    ds.SoftwareVersions = v.software
    ds.ProtocolName = series.protocol_name or series.description or series.protocol.description
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.series_number
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _mr_physics(ds: Dataset, study: StudyHeader, series: SeriesSpec) -> None:
    """MR acquisition attributes (classic MR Image module and equipment)."""
    p = series.protocol
    ds.ScanningSequence = list(p.scanning_sequence)
    ds.SequenceVariant = list(p.sequence_variant)
    ds.ScanOptions = list(p.scan_options) if p.scan_options else ""
    ds.MRAcquisitionType = p.acquisition_type
    ds.SequenceName = p.sequence_name
    ds.AngioFlag = "N"
    ds.RepetitionTime = _fmt(p.tr_ms)
    ds.EchoTime = _fmt(p.te_ms)
    if "IR" in p.scanning_sequence:
        ds.InversionTime = _fmt(p.ti_ms or 0.0)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = _fmt(series.imaging_frequency_mhz)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _fmt(study.field_t)
    ds.EchoTrainLength = p.echo_train
    ds.FlipAngle = _fmt(p.flip_deg)
    ds.PixelBandwidth = "200"
    ds.ReceiveCoilName = "Head_32"
    ds.TransmitCoilName = "Body"
    ds.InPlanePhaseEncodingDirection = "COL" if p.equation == "epi" else "ROW"
    ds.PercentPhaseFieldOfView = "100"
    ds.PercentSampling = "100"
    ds.PatientOrientation = ""


def _contrast(ds: Dataset, series: SeriesSpec) -> None:
    if series.contrast_agent:
        ds.ContrastBolusAgent = series.contrast_agent
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = "7.5"


def _pixels(
    ds: Dataset, study: StudyHeader, pixels: npt.NDArray[np.integer], slope: float | None
) -> None:
    v = study.vendor
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(pixels.shape[-2])
    ds.Columns = int(pixels.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = v.bits_stored
    ds.HighBit = v.bits_stored - 1
    ds.PixelRepresentation = 1 if v.signed else 0
    dtype = np.int16 if v.signed else np.uint16
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()


def _b_value_tags(ds: Dataset, study: StudyHeader, b: float, standard: bool = True) -> None:
    """The standard b-value (unless `standard` is off) and the vendor's private one."""
    v = study.vendor
    if standard:
        ds.DiffusionBValue = float(b)
        ds.DiffusionDirectionality = "ISOTROPIC" if b > 0 else "NONE"
    if not v.private_creator:
        return
    block = ds.private_block(v.private_group, v.private_creator, create=True)
    if v.private_vr == "FL":
        block.add_new(v.private_element, "FL", float(b))
    elif v.manufacturer.startswith("GE"):
        block.add_new(v.private_element, "IS", [int(b), 8, 0, 0])
    else:
        block.add_new(v.private_element, "IS", int(b))


def build_classic(study: StudyHeader, series: SeriesSpec) -> tuple[Dataset, ...]:
    """One classic MR Image Storage instance per frame."""
    out = []
    slope = series.rescale_slope
    wc, ww = _window(series.pixels, slope or 1.0)
    n = len(series.frames)
    for i, fr in enumerate(series.frames):
        ds = Dataset()
        sop = make_uid(study.seed, series.series_uid, "sop", i)
        _common(ds, study, series, MR_IMAGE_STORAGE, sop)
        ds.ImageType = list(series.protocol.image_type)
        ds.AcquisitionTime = fr.time or series.series_time
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        _mr_physics(ds, study, series)
        if fr.sequence_name:
            ds.SequenceName = fr.sequence_name
        _contrast(ds, series)
        ds.SliceThickness = _fmt(fr.thickness_mm)
        ds.SpacingBetweenSlices = _fmt(fr.slice_mm)
        ds.ImagePositionPatient = [_fmt(x) for x in fr.position]
        ds.ImageOrientationPatient = [_fmt(x) for x in (*fr.row_dir, *fr.col_dir)]
        normal = np.cross(fr.row_dir, fr.col_dir)
        ds.SliceLocation = _fmt(float(np.dot(normal, fr.position)))
        ds.PixelSpacing = [_fmt(fr.pixel_mm[0]), _fmt(fr.pixel_mm[1])]
        if series.temporal_positions:
            ds.NumberOfTemporalPositions = series.temporal_positions
            ds.TemporalPositionIdentifier = fr.temporal_index or 1
            ds.ImagesInAcquisition = n
        if fr.b_value is not None:
            _b_value_tags(ds, study, fr.b_value, series.standard_b_value)
        _pixels(ds, study, series.pixels[i], slope)
        if slope is not None:
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = _fmt(slope)
            ds.RescaleType = "US"
        if series.window:
            ds.WindowCenter = _fmt(wc)
            ds.WindowWidth = _fmt(ww)
        out.append(_attach_meta(ds))
    return tuple(out)


def _item(**kw: object) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def build_enhanced(study: StudyHeader, series: SeriesSpec) -> tuple[Dataset, ...]:
    """One Enhanced MR Image Storage instance holding every frame (shared + per-frame groups)."""
    p = series.protocol
    ds = Dataset()
    _common(
        ds,
        study,
        series,
        ENHANCED_MR_IMAGE_STORAGE,
        make_uid(study.seed, series.series_uid, "sop", "mf"),
    )
    derived = p.image_type[0] == "DERIVED"
    it3 = {
        "t1": "T1",
        "t1c": "T1",
        "t2": "T2",
        "flair": "FLAIR",
        "dwi": "DIFFUSION",
        "adc": "DIFFUSION",
    }.get(series.kind, "UNKNOWN")
    ds.ImageType = [p.image_type[0], "PRIMARY", it3, "NONE"]
    ds.AcquisitionDateTime = study.study_date + series.series_time
    ds.AcquisitionDuration = 120.0
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = {
        "t1": "T1",
        "t1c": "T1",
        "t2": "T2",
        "flair": "T2",
        "dwi": "DIFFUSION",
        "adc": "DIFFUSION",
        "bold": "T2_STAR",
        "fieldmap": "UNKNOWN",
    }.get(series.kind, "UNKNOWN")
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    del ds.AcquisitionDate  # enhanced objects carry AcquisitionDateTime instead
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = Sequence([])
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.MagneticFieldStrength = study.field_t
    ds.BodyPartExamined = "BRAIN"
    # MR Pulse Sequence module
    if not derived:
        ds.PulseSequenceName = p.sequence_name.strip("*")[:16]
        ds.MRAcquisitionType = p.acquisition_type
        ds.EchoPulseSequence = (
            "GRADIENT"
            if "GR" in p.scanning_sequence and "SE" not in p.scanning_sequence
            else "SPIN"
        )
        if ds.EchoPulseSequence == "SPIN":
            ds.MultipleSpinEcho = "NO"
        ds.MultiPlanarExcitation = "YES" if p.acquisition_type == "2D" else "NO"
        ds.PhaseContrast = "NO"
        ds.TimeOfFlightContrast = "NO"
        ds.SteadyStatePulseSequence = "NONE"
        ds.EchoPlanarPulseSequence = "YES" if "EP" in p.scanning_sequence else "NO"
        ds.SaturationRecovery = "NO"
        ds.SpectrallySelectedSuppression = "FAT" if p.fat_sat else "NONE"
        ds.OversamplingPhase = "NONE"
        ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
        ds.SegmentedKSpaceTraversal = "PARTIAL" if p.echo_train > 1 else "SINGLE"
        ds.RectilinearPhaseEncodeReordering = "LINEAR"
        ds.NumberOfKSpaceTrajectories = 1
        if p.acquisition_type == "3D":
            ds.CoverageOfKSpace = "FULL"
    if series.contrast_agent:
        # Kept at the top level too: classifiers that read classic headers look for it here.
        ds.ContrastBolusAgent = series.contrast_agent
        ds.ContrastBolusAgentSequence = Sequence(
            [
                _item(
                    CodeValue="C-17800",
                    CodingSchemeDesignator="SRT",
                    CodeMeaning="Gadolinium",
                    ContrastBolusAgentNumber=1,
                    ContrastBolusAdministrationRouteSequence=Sequence(
                        [
                            _item(
                                CodeValue="47625008",
                                CodingSchemeDesignator="SCT",
                                CodeMeaning="Intravenous route",
                            )
                        ]
                    ),
                    ContrastBolusIngredientCodeSequence=Sequence(
                        [
                            _item(
                                CodeValue="C-17800",
                                CodingSchemeDesignator="SRT",
                                CodeMeaning="Gadolinium",
                            )
                        ]
                    ),
                    ContrastBolusVolume=7.5,
                    ContrastBolusIngredientConcentration=1.0,
                )
            ]
        )
    frames = series.frames
    n = len(frames)
    slope = series.rescale_slope or 1.0
    wc, ww = _window(series.pixels, slope)
    f0 = frames[0]
    normal0 = np.cross(f0.row_dir, f0.col_dir)
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence(
        [
            _item(
                PixelSpacing=[_fmt(f0.pixel_mm[0]), _fmt(f0.pixel_mm[1])],
                SliceThickness=_fmt(f0.thickness_mm),
                SpacingBetweenSlices=_fmt(f0.slice_mm),
            )
        ]
    )
    shared.FrameAnatomySequence = Sequence(
        [
            _item(
                FrameLaterality="U",
                AnatomicRegionSequence=Sequence(
                    [_item(CodeValue="12738006", CodingSchemeDesignator="SCT", CodeMeaning="Brain")]
                ),
            )
        ]
    )
    shared.PlaneOrientationSequence = Sequence(
        [_item(ImageOrientationPatient=[_fmt(x) for x in (*f0.row_dir, *f0.col_dir)])]
    )
    shared.PixelValueTransformationSequence = Sequence(
        [_item(RescaleIntercept="0", RescaleSlope=_fmt(slope), RescaleType="US")]
    )
    shared.FrameVOILUTSequence = Sequence([_item(WindowCenter=_fmt(wc), WindowWidth=_fmt(ww))])
    if not derived:
        shared.MRTimingAndRelatedParametersSequence = Sequence(
            [
                _item(
                    RepetitionTime=float(p.tr_ms),
                    FlipAngle=float(p.flip_deg),
                    EchoTrainLength=p.echo_train,
                    RFEchoTrainLength=p.echo_train,
                    GradientEchoTrainLength=1 if p.equation == "epi" else 0,
                    GradientOutputType="DB_DT",
                    GradientOutput=10.0,
                    SpecificAbsorptionRateSequence=Sequence(
                        [
                            _item(
                                SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                                SpecificAbsorptionRateValue=0.5,
                            )
                        ]
                    ),
                    OperatingModeSequence=Sequence(
                        [
                            _item(OperatingModeType="GRADIENT", OperatingMode="IEC_NORMAL"),
                            _item(OperatingModeType="RF", OperatingMode="IEC_NORMAL"),
                        ]
                    ),
                )
            ]
        )
        shared.MRFOVGeometrySequence = Sequence(
            [
                _item(
                    InPlanePhaseEncodingDirection="COLUMN" if p.equation == "epi" else "ROW",
                    MRAcquisitionFrequencyEncodingSteps=int(series.pixels.shape[2] * p.resolution),
                    MRAcquisitionPhaseEncodingStepsInPlane=int(
                        series.pixels.shape[1] * p.resolution
                    ),
                    PercentSampling=100.0,
                    PercentPhaseFieldOfView=100.0,
                )
            ]
        )
        shared.MREchoSequence = Sequence([_item(EffectiveEchoTime=float(p.te_ms))])
        shared.MRModifierSequence = Sequence(
            [
                _item(
                    InversionRecovery="YES" if p.ti_ms else "NO",
                    **({"InversionTimes": [float(p.ti_ms)]} if p.ti_ms else {}),
                    FlowCompensation="NONE",
                    Spoiling="RF" if p.equation == "gre" else "NONE",
                    T2Preparation="NO",
                    SpectrallySelectedExcitation="NONE",
                    SpatialPresaturation="NONE",
                    PartialFourier="NO",
                    ParallelAcquisition="NO",
                )
            ]
        )
        shared.MRImagingModifierSequence = Sequence(
            [
                _item(
                    MagnetizationTransfer="NONE",
                    BloodSignalNulling="NO",
                    Tagging="NONE",
                    TransmitterFrequency=series.imaging_frequency_mhz,
                    PixelBandwidth=200.0,
                )
            ]
        )
        shared.MRReceiveCoilSequence = Sequence(
            [
                _item(
                    ReceiveCoilName="Head_32",
                    ReceiveCoilManufacturerName=study.vendor.manufacturer,
                    ReceiveCoilType="MULTICOIL",
                    QuadratureReceiveCoil="NO",
                    MultiCoilDefinitionSequence=Sequence(
                        [_item(MultiCoilElementName="HEA", MultiCoilElementUsed="YES")]
                    ),
                )
            ]
        )
        shared.MRTransmitCoilSequence = Sequence(
            [
                _item(
                    TransmitCoilName="Body",
                    TransmitCoilManufacturerName=study.vendor.manufacturer,
                    TransmitCoilType="BODY",
                )
            ]
        )
        shared.MRAveragesSequence = Sequence([_item(NumberOfAverages=1.0)])
    if series.contrast_agent:
        shared.ContrastBolusUsageSequence = Sequence(
            [
                _item(
                    ContrastBolusAgentNumber=1,
                    ContrastBolusAgentAdministered="YES",
                    ContrastBolusAgentDetected="YES",
                )
            ]
        )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    # Dimensions: stack, position in the stack, then b-value (DWI) or time (BOLD) when they vary.
    positions = sorted({fr.position for fr in frames}, key=lambda q: float(np.dot(q, normal0)))
    b_values = sorted({fr.b_value for fr in frames if fr.b_value is not None})
    b_dim = len(b_values) > 1 and not derived
    t_dim = any(fr.temporal_index for fr in frames)
    per = []
    for fr in frames:
        f = Dataset()
        index = [1, positions.index(fr.position) + 1]
        if b_dim:
            index.append(b_values.index(fr.b_value or 0.0) + 1)
        elif t_dim:
            index.append(fr.temporal_index or 1)
        content = _item(
            FrameAcquisitionDateTime=study.study_date + (fr.time or series.series_time),
            FrameReferenceDateTime=study.study_date + (fr.time or series.series_time),
            FrameAcquisitionDuration=100.0,
            StackID="1",
            InStackPositionNumber=index[1],
            DimensionIndexValues=index,
        )
        if fr.temporal_index:
            content.TemporalPositionIndex = fr.temporal_index
        f.FrameContentSequence = Sequence([content])
        f.PlanePositionSequence = Sequence(
            [_item(ImagePositionPatient=[_fmt(x) for x in fr.position])]
        )
        ftype = [p.image_type[0], "PRIMARY", it3, "NONE"]
        f.MRImageFrameTypeSequence = Sequence(
            [
                _item(
                    FrameType=ftype,
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                    ComplexImageComponent="MAGNITUDE",
                    AcquisitionContrast=ds.AcquisitionContrast,
                )
            ]
        )
        if fr.b_value is not None and not derived:
            f.MRDiffusionSequence = Sequence(
                [
                    _item(
                        DiffusionBValue=float(fr.b_value),
                        DiffusionDirectionality="ISOTROPIC" if fr.b_value > 0 else "NONE",
                    )
                ]
            )
        per.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    dim_uid = make_uid(study.seed, series.series_uid, "dim")
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionIndexSequence = Sequence(
        [
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=0x00209056,
                FunctionalGroupPointer=0x00209111,
                DimensionDescriptionLabel="Stack ID",
            ),
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=0x00209057,
                FunctionalGroupPointer=0x00209111,
                DimensionDescriptionLabel="In-Stack Position Number",
            ),
        ]
    )
    if b_dim:
        ds.DimensionIndexSequence.append(
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=0x00189087,
                FunctionalGroupPointer=0x00189117,
                DimensionDescriptionLabel="Diffusion b-value",
            )
        )
    elif t_dim:
        ds.DimensionIndexSequence.append(
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=0x00209128,
                FunctionalGroupPointer=0x00209111,
                DimensionDescriptionLabel="Temporal Position Index",
            )
        )
    ds.NumberOfFrames = n
    ds.ContentDate = study.study_date
    ds.ContentTime = series.series_time
    if series.temporal_positions:
        ds.NumberOfTemporalPositions = series.temporal_positions
    if frames[0].b_value is not None:
        # Vendor private b-value of the first frame, as enhanced exports keep it.
        _b_value_tags(ds, study, frames[-1].b_value or 0.0)
        del ds.DiffusionBValue
        del ds.DiffusionDirectionality
    _pixels(ds, study, series.pixels, series.rescale_slope)
    return (_attach_meta(ds),)


def _attach_meta(ds: Dataset) -> Dataset:
    """File meta for an uncompressed instance, so in-memory datasets decode (pixel_array)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "NEURONODE_SYN"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def encode(ds: Dataset, transfer_syntax: UID) -> Dataset:
    """Set the transfer syntax; compressed syntaxes compress the pixel data in place."""
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        _attach_meta(ds)
    if transfer_syntax.is_compressed:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def write_dataset(ds: Dataset, path: Path) -> str:
    """Write one instance as a DICOM file; returns its SHA-256 (for determinism checks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with dcm_config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()

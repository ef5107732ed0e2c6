"""The records that flow between stages: small, typed, immutable.

Records carry paths and UIDs, never open pydicom Datasets. Records holding numpy
arrays use ``eq=False`` (arrays have no truth value for ``==``).

Helpers that add a stage append their records at the end of this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


class SequenceLabel(StrEnum):
    """What a series is, for routing."""

    T1 = "T1"
    T1C = "T1C"
    T2 = "T2"
    FLAIR = "FLAIR"
    DWI = "DWI"
    ADC = "ADC"
    OTHER = "OTHER"


class StudyStatus(StrEnum):
    """Where a study stands in the spool index."""

    RECEIVING = "receiving"
    READY = "ready"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"  # dead letter: gave up after max attempts


# --- receive / spool -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceRef:
    """The UIDs that place one instance in the spool, validated before any file is named."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredInstance:
    """An instance durably written to the spool and indexed."""

    ref: InstanceRef
    path: Path
    size_bytes: int
    received_at: float  # unix time
    calling_ae: str
    duplicate: bool = False  # the same SOP Instance UID was already stored: nothing was rewritten
    # Expected-count hints read from the header (None when absent).
    images_in_acquisition: int | None = None
    temporal_positions: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyJob:
    """One ready study handed to a worker: its instance files and how often it has been tried."""

    job_id: int
    study_uid: str
    instance_paths: tuple[Path, ...]
    attempt: int  # 1 on the first try
    reopened: bool = False  # the study had been processed before and got new instances


# --- dicomio -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SliceGeometry:
    """Where one slice (or frame) sits in patient space."""

    position: tuple[float, float, float]  # ImagePositionPatient (mm)
    orientation: tuple[float, float, float, float, float, float]  # row then column cosines
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slice_thickness: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SliceRef:
    """The source of one slice: the file, its SOP instance and (for multi-frame) the frame."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based, None for single-frame objects
    geometry: SliceGeometry


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SeriesVolume:
    """A series as slices in spatial order (for a time series: the first volume's order kept)."""

    study_uid: str
    series_uid: str
    series_number: int | None
    pixels: FloatArray  # (n_slices, rows, cols), modality LUT (rescale) applied
    slices: tuple[SliceRef, ...]  # one per pixels[i]
    slice_spacing_mm: float | None  # distance between consecutive slice centres
    n_instances: int
    n_frames: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeProblem:
    """A file of the study that could not be used, and why (for the audit record)."""

    path: Path
    series_uid: str | None
    reason: str


# --- sequence classification ------------------------------------------------------------------


class DecisionMethod(StrEnum):
    """Which step decided a series label: the tag rules, the CNN, both, or the study context."""

    TAGS = "tags"
    CNN = "cnn"
    FUSED = "fused"
    STUDY_CONTEXT = "study-context"


class EvidenceKind(StrEnum):
    """The evidence a series label rests on (docs/sequence.md)."""

    TAGS = "tags"  # acquisition physics and standard tags (ImageType, b-values, TR/TE/TI, agent)
    DESCRIPTION = "description"  # SeriesDescription / ProtocolName words
    ORDER_IMAGE = "order+image"  # acquisition order in the study plus image contrast evidence
    CNN = "cnn"  # the slice CNN's calibrated vote
    NONE = "none"  # nothing usable: the series is OTHER


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceDecision:
    """The label a series got, how sure, by which method, and the evidence for it."""

    series_uid: str
    label: SequenceLabel
    confidence: float  # 0..1
    method: DecisionMethod
    reasons: tuple[str, ...]  # human-readable evidence: the rule that fired and why, CNN votes
    tag_label: SequenceLabel | None = None  # None when the tag rules abstained
    cnn_label: SequenceLabel | None = None  # None when the CNN did not run
    cnn_votes: tuple[tuple[SequenceLabel, int], ...] = field(default_factory=tuple)
    evidence: EvidenceKind = EvidenceKind.TAGS  # what decided the label (docs/sequence.md)


# --- pipeline ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyOutcome:
    """What one run of the pipeline on a study produced (returned to the worker)."""

    study_uid: str
    audit_path: Path
    n_series: int
    n_instances: int
    n_decode_errors: int
    # (stage, milliseconds) for each stage that ran, in order (the stage latency metrics)
    stage_ms: tuple[tuple[str, float], ...] = ()


# --- specialists, explanation, ensemble (issue 5) ------------------------------------------------


class FindingStatus(StrEnum):
    """A study-level answer for one task."""

    PRESENT = "present"
    ABSENT = "absent"
    INDETERMINATE = "indeterminate"
    NOT_ASSESSABLE = "not-assessable"  # no suitable series in the study
    NO_LESION = "no-lesion"  # the lesion gate found no lesion: the task gives no diagnosis


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Heatmap:
    """A Grad-CAM map for one key slice, on the source slice's pixel grid, normalised to 0..1."""

    series_uid: str
    slice_index: int  # index into SeriesVolume.slices
    source: SliceRef
    cam: FloatArray  # (rows, cols), 0..1, higher = more attention
    image: FloatArray  # (rows, cols) the source slice pixels (modality values)
    # False: the key slice is chosen but its map not computed yet (zeros): the SR can name the
    # heatmap before it is drawn; the HEATMAPS stage computes it.
    explained: bool = True


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SeriesPrediction:
    """One specialist model's answer on one series."""

    task: str  # gbm_pcnsl, glioma_grade, tubers
    model_id: str  # bundle name
    model_version: str
    series_uid: str
    sequence: SequenceLabel  # the label that routed the series here
    probability: float  # series-level probability of the task's positive class
    slice_indices: tuple[int, ...]
    slice_probabilities: tuple[float, ...]
    heatmaps: tuple[Heatmap, ...] = ()
    # The bundle's weights digest: result UIDs depend on it, so retrained weights published
    # under the same version still give new UIDs (and never overwrite different content).
    weights_sha256: str = ""
    # The tumour-centred square the bundle read (rows r0:r1, cols c0:c1), None = whole slices.
    region: tuple[int, int, int, int] | None = None
    # What the heatmaps show: "grad-cam" (a network's attention) or "lesion" (a detector's
    # measured bright region, node.bundles.lesion).
    map_kind: str = "grad-cam"


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class TaskFinding:
    """The study-level answer for one task after the ensemble."""

    task: str
    positive_label: str  # e.g. "glioblastoma"
    negative_label: str  # e.g. "primary CNS lymphoma"
    status: FindingStatus
    probability: (
        float | None
    )  # calibrated probability of the positive label; None if not assessable
    contributions: tuple[SeriesPrediction, ...]
    method: str  # e.g. "weighted mean logit, temperature 1.3"
    reason: str  # human-readable: why this status


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class StudyResult:
    """Everything the report stage needs for one study."""

    study_uid: str
    source_paths: tuple[Path, ...]  # instance files of the study (for copying patient/study attrs)
    sequences: tuple[SequenceDecision, ...]
    findings: tuple[TaskFinding, ...]
    reopened: bool = False
    # (SeriesInstanceUID, SeriesNumber as written) from the headers already read; empty: the
    # report reads the source headers for them
    series_numbers: tuple[tuple[str, str], ...] = ()


# --- sequence classification: headers, verdicts, policy (issue 4) ------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesHeader:
    """The acquisition physics of one series, read from its headers (no pixels), vendor-normalised.

    Multi-valued facts (image type, echo times, b-values, orientations) are the union over all
    instances and frames of the series, so a rule can see e.g. the two echoes of a field map.
    """

    series_uid: str
    study_uid: str
    series_number: int | None
    series_description: str
    protocol_name: str
    sequence_name: str  # SequenceName, enhanced PulseSequenceName or the GE private name
    manufacturer: str  # siemens, ge, philips, canon, uih, hitachi, other
    model: str
    sop_class_uid: str
    modality: str
    image_type: tuple[str, ...]  # upper-case tokens (ImageType + enhanced FrameType), as seen
    scanning_sequence: tuple[str, ...]  # SE, IR, GR, EP, RM
    sequence_variant: tuple[str, ...]  # SK, MTC, SS, TRSS, SP, MP, OSP, NONE
    scan_options: tuple[str, ...]
    mr_acquisition_type: str  # 2D, 3D or ""
    echo_pulse_sequence: str = ""  # enhanced MR: SPIN, GRADIENT, BOTH
    inversion_recovery: bool | None = None  # enhanced MR modifier, or IR in ScanningSequence
    acquisition_contrast: tuple[str, ...] = ()  # enhanced AcquisitionContrast values
    complex_parts: tuple[str, ...] = ()  # MAGNITUDE, PHASE, REAL, IMAGINARY, MIXED
    repetition_time_ms: float | None = None
    echo_time_ms: float | None = None  # the shortest echo time
    echo_times_ms: tuple[float, ...] = ()  # distinct echo times, sorted
    inversion_time_ms: float | None = None
    flip_angle_deg: float | None = None
    echo_train_length: int | None = None
    b_values: tuple[float, ...] = ()  # sorted unique (standard, enhanced and vendor private tags)
    diffusion_directionality: tuple[str, ...] = ()  # ISOTROPIC, DIRECTIONAL, NONE, BMATRIX
    contrast_agent: str | None = None  # ContrastBolusAgent text or "administered" (enhanced)
    contrast_route: str | None = None
    n_instances: int = 0
    n_frames: int = 0  # total frames (1 per single-frame instance)
    n_temporal_positions: int = 1
    acquisition_times: tuple[float, float] | None = None  # first, last; seconds from midnight
    orientation: str = ""  # axial, sagittal, coronal, oblique (first image), "" if unknown
    body_part: str = ""  # BodyPartExamined (for the rules' qualify: section)
    orientations: tuple[str, ...] = ()  # all distinct plane labels in the series
    rows: int | None = None
    cols: int | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    photometric_interpretation: str = ""
    samples_per_pixel: int = 1
    is_mosaic: bool = False
    is_localizer: bool = False
    # Where the b-values came from when that is worth saying (a private tag read at its fixed
    # address because an anonymiser removed its private creator), else "".
    b_values_note: str = ""
    n_set_aside: int = 0  # non-image objects (raw data, vendor private SOP classes) ignored


@dataclass(frozen=True, slots=True, kw_only=True)
class TagVerdict:
    """What the tag rules say about one series: a label, or None when they abstain."""

    label: SequenceLabel | None
    confidence: float  # 0..1; 0 when abstaining
    rule: str  # name of the rule that fired (or "abstain")
    reason: str  # human-readable: which tags, which values
    evidence: EvidenceKind = EvidenceKind.TAGS  # TAGS (physics) or DESCRIPTION (words only)
    # Routable labels the tags could not rule out: T1 with no contrast information leaves T1C
    # open (and a T1C known only from words leaves T1 open). Only these the CNN may choose.
    open_labels: tuple[SequenceLabel, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CnnVerdict:
    """The slice CNN's series-level opinion: majority label over sampled slices."""

    label: SequenceLabel
    confidence: float  # vote fraction x mean probability of the winning label
    votes: tuple[tuple[SequenceLabel, int], ...]  # per label, most votes first
    n_slices: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FusionPolicy:
    """How the CNN vote meets the tag verdict (the table in docs/sequence.md).

    Fixed whatever the policy: a confident tag label is never overturned, a tag OTHER is
    absolute, and a CNN vote below ``min_cnn_confidence`` counts for nothing.
    """

    min_confidence: float = 0.5  # a tag label at or above this is confident; below, unsure
    min_cnn_confidence: float = 0.6  # the CNN's calibrated confidence a vote must reach to count
    # Who decides where the tags do not: "tags" (the CNN only confirms or doubts, never names a
    # label), "cnn_if_abstain" (the CNN names the label when the tags abstain; a CNN that
    # contradicts an unsure tag label gives OTHER) or "cnn" (the CNN also decides over an unsure
    # tag label).
    unsure_tags: Literal["tags", "cnn_if_abstain", "cnn"] = "cnn_if_abstain"
    # The CNN sees one slice at a time: on slices without a lesion or a vessel, T1 before and
    # after gadolinium look alike (the sequence bundle's card: 36% T1/T1C swaps on synth). So by
    # default the CNN never chooses between T1 and T1C, even where the tags leave it open.
    cnn_decides_contrast: bool = False

    def __post_init__(self) -> None:
        for name in ("min_confidence", "min_cnn_confidence"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TypeError(f"{name}: a number from 0 to 1 is needed, not {value!r}")
            if not 0 <= value <= 1:
                raise ValueError(f"{name}: {value} is not between 0 and 1")
        if self.unsure_tags not in ("tags", "cnn_if_abstain", "cnn"):
            raise ValueError(
                f"unsure_tags: {self.unsure_tags!r} is not one of tags, cnn_if_abstain, cnn"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ContrastEvidence:
    """Image evidence that the later of two co-registered T1 volumes is post-contrast."""

    post_contrast: bool | None  # None: the volumes could not tell (too little head in view)
    score: float  # enhanced fraction minus the darkened fraction (what noise alone gives)
    enhanced_fraction: float  # of head voxels, brighter on the later volume beyond threshold
    darkened_fraction: float  # of head voxels, darker on the later volume beyond threshold
    n_voxels: int  # head voxels compared
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ContrastPair:
    """Two T1 series of one protocol whose images could tell pre- from post-contrast."""

    earlier_uid: str
    earlier_number: int | None
    later_uid: str
    later_number: int | None


# --- dicomio: headers and a loaded study (issue 2) --------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceHeader:
    """What one instance file says about itself, read without its pixels (no patient data)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    series_number: int | None
    series_description: str
    modality: str
    transfer_syntax_uid: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    n_frames: int  # 0 for objects without pixel data (SR, documents)
    image_type: tuple[str, ...]
    photometric: str | None
    has_pixels: bool


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SeriesLayout:
    """A series' volume as its headers lay it out, before any pixel is decoded: the slices in
    spatial order with their geometry and the volume's shape. ``plan`` is how node.dicom.volumes
    decodes it (private to that module); ``node.dicom.volumes.decode_series`` gives the
    ``SeriesVolume``."""

    study_uid: str
    series_uid: str
    series_number: int | None
    shape: tuple[int, int, int]  # (n_slices, rows, cols) of the decoded volume
    slices: tuple[SliceRef, ...]
    slice_spacing_mm: float | None
    n_instances: int
    n_frames: int
    plan: object = None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class StudyLoad:
    """A study read from its headers (one read per file): every instance header, each series'
    layout and header record, and the files that failed. Pixels are decoded later, one series
    at a time, only where a model reads them."""

    headers: tuple[InstanceHeader, ...]
    layouts: tuple[SeriesLayout, ...]
    problems: tuple[DecodeProblem, ...]
    series_headers: tuple[SeriesHeader, ...] = ()


# --- routing (issues 5, 6) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One series sent to one specialist bundle for one task, with its ensemble weight."""

    task: str  # key under `tasks:` in the rule file
    bundle: str  # bundle folder name under models_dir
    series_uid: str
    sequence: SequenceLabel  # the label that matched the route
    weight: float  # the route's weight; several series to one bundle are averaged first


# --- delivery (issue 6) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SendResult:
    """What became of one object at one destination after one attempt."""

    sop_instance_uid: str  # the object as it was queued
    sent_sop_instance_uid: str  # what the peer holds (differs after an SR fallback)
    sent_sop_class_uid: str
    delivered: bool  # success, or a warning status under which the peer kept the object
    status_code: int | None  # DIMSE status or HTTP status; None when nothing was answered
    retryable: bool  # for a failure: worth trying again later
    message: str


class DeliveryState(StrEnum):
    """Where one result object stands at one destination in the outbox."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"  # dead letter: gave up; `neuronode requeue` sends it again
    PARKED = "parked"  # its destination is no longer in the rules; sent again if it comes back


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One outbox row: an object file bound for one destination."""

    row_id: int
    sop_uid: str
    destination: str
    study_uid: str
    sop_class_uid: str
    path: Path
    state: DeliveryState
    attempts: int
    next_attempt_at: float  # unix time
    last_error: str | None
    last_status_code: int | None
    sent_sop_uid: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryCounts:
    """What one pass of the sender did."""

    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    unreachable: tuple[str, ...] = ()  # destinations that could not be reached this pass

"""Vendor conventions as data: protocol names, sequence parameters, pixel formats, private tags."""

from __future__ import annotations

from dataclasses import dataclass

VENDORS = ("siemens", "ge", "philips", "generic")
ROUTED_KINDS = ("t1", "t1c", "t2", "flair", "dwi", "adc")
DISTRACTOR_KINDS = ("localizer", "bold", "fieldmap", "fa", "reformat")
KIND_LABEL = {"t1": "T1", "t1c": "T1C", "t2": "T2", "flair": "FLAIR", "dwi": "DWI", "adc": "ADC"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Protocol:
    """One series as a vendor's scanner writes it."""

    description: str
    sequence_name: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    acquisition_type: str  # 2D or 3D
    equation: str  # signal equation (contrast.Acquisition)
    tr_ms: float
    te_ms: float
    ti_ms: float | None = None
    flip_deg: float = 90.0
    echo_train: int = 1
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")
    resolution: float = 1.0  # acquired / displayed matrix
    snr: float = 40.0
    fat_sat: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Vendor:
    """What differs between manufacturers: names, pixel format, numbering, private b-value tag."""

    manufacturer: str
    models: tuple[str, ...]
    software: str
    institution: str
    bits_stored: int
    signed: bool
    white_matter_level: tuple[float, float]  # stored value range of white matter on T1
    rescale_slope: tuple[float, float] | None  # Philips scales stored values
    series_base: int  # series numbers are series_base * n (+1 for Philips)
    series_offset: int
    private_creator: str
    private_group: int
    private_element: int  # element offset inside the private block
    private_vr: str  # VR of the b-value
    t1_options: tuple[tuple[Protocol, tuple[str, ...]], ...]  # (T1 protocol, T1C descriptions)
    protocols: dict[str, Protocol]
    contrast_agents: tuple[str, ...]


def _p(desc: str, seq: str, ss: str, sv: str, so: str, acq: str, eq: str, tr: float, te: float, **kw: object) -> Protocol:
    return Protocol(
        description=desc,
        sequence_name=seq,
        scanning_sequence=tuple(ss.split("\\")),
        sequence_variant=tuple(sv.split("\\")),
        scan_options=tuple(so.split("\\")) if so else (),
        acquisition_type=acq,
        equation=eq,
        tr_ms=tr,
        te_ms=te,
        **kw,  # type: ignore[arg-type]
    )


_SIEMENS = Vendor(
    manufacturer="SIEMENS",
    models=("Skyra", "Prisma", "Avanto", "Vida"),
    software="syngo MR E11",
    institution="SYNTHETIC SITE A",
    bits_stored=12,
    signed=False,
    white_matter_level=(250.0, 700.0),
    rescale_slope=None,
    series_base=1,
    series_offset=0,
    private_creator="SIEMENS MR HEADER",
    private_group=0x0019,
    private_element=0x0C,
    private_vr="IS",
    t1_options=(
        (_p("t1_se_tra", "*se2d1", "SE", "SP", "", "2D", "se", 520, 9.1, flip_deg=90, snr=45), ("t1_se_tra", "t1_se_tra_KM", "t1_se_tra_post")),
        (
            _p("t1_mprage_tra_p2_iso", "*tfl3d1_16ns", "GR\\IR", "SK\\SP\\MP", "IR", "3D", "ir", 2000, 2.3, ti_ms=900, flip_deg=8, snr=50),
            ("t1_mprage_tra_p2_iso", "t1_mprage_tra_p2_iso_KM", "t1_mprage_tra_post"),
        ),
    ),
    protocols={
        "t2": _p("t2_tse_tra", "*tse2d1_15", "SE", "SK\\SP\\OSP", "PFP", "2D", "se", 4500, 96, echo_train=15, snr=45),
        "flair": _p("t2_tirm_tra_dark-fluid", "*tir2d1_13", "SE\\IR", "SK\\SP\\MP\\OSP", "IR", "2D", "ir", 9000, 85, ti_ms=2500, echo_train=13, resolution=0.8, snr=32),
        "dwi": _p("ep2d_diff_3scan_trace_p2_TRACEW", "*ep_b1000t", "EP", "SK\\SP", "PFP\\FS", "2D", "epi", 5000, 89, image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND", "NORM"), resolution=0.55, snr=45, fat_sat=True),
        "adc": _p("ep2d_diff_3scan_trace_p2_ADC", "*ep_b1000t", "EP", "SK\\SP", "PFP\\FS", "2D", "epi", 5000, 89, image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND", "NORM"), resolution=0.55, snr=45, fat_sat=True),
        "localizer": _p("localizer", "*fl2d1", "GR", "SP", "", "2D", "gre", 8.6, 4.0, flip_deg=20, image_type=("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"), snr=20),
        "bold": _p("ep2d_bold_resting", "*epfid2d1_64", "EP", "SK", "FS", "2D", "gre", 2000, 30, flip_deg=90, image_type=("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"), snr=25),
        "fieldmap": _p("gre_field_mapping", "*fm2d2r", "GR", "SP", "", "2D", "gre", 488, 7.38, flip_deg=60, image_type=("ORIGINAL", "PRIMARY", "P", "ND"), snr=20),
        "fa": _p("ep2d_diff_mddw_20_p2_FA", "*ep_b0_1000", "EP", "SK\\SP", "PFP\\FS", "2D", "epi", 7000, 95, image_type=("DERIVED", "PRIMARY", "DIFFUSION", "FA", "ND", "NORM"), snr=20),
        "reformat": _p("t1_MPR_cor", "*tfl3d1_16ns", "GR\\IR", "SK\\SP\\MP", "IR", "3D", "ir", 2000, 2.3, ti_ms=900, flip_deg=8, image_type=("DERIVED", "SECONDARY", "MPR", "ND", "NORM"), snr=45),
    },
    contrast_agents=("Gadovist", "Dotarem", "Gadobutrol 1.0 mmol/ml"),
)

_GE = Vendor(
    manufacturer="GE MEDICAL SYSTEMS",
    models=("DISCOVERY MR750", "SIGNA Premier", "Optima MR450w"),
    software="DV26.0_R03",
    institution="SYNTHETIC SITE B",
    bits_stored=16,
    signed=True,
    white_matter_level=(700.0, 3000.0),
    rescale_slope=None,
    series_base=1,
    series_offset=0,
    private_creator="GEMS_PARM_01",
    private_group=0x0043,
    private_element=0x39,
    private_vr="IS",
    t1_options=(
        (_p("Ax T1 SE", "se", "SE", "NONE", "FAST_GEMS", "2D", "se", 550, 10, snr=40), ("Ax T1 SE +C", "AX T1 SE POST", "Ax T1 +C")),
        (_p("AX T1 FLAIR", "fse-ir", "SE\\IR", "SK\\OSP", "FAST_GEMS\\IR_GEMS", "2D", "ir", 2200, 10, ti_ms=860, echo_train=8, snr=40), ("AX T1 FLAIR POST", "AX T1 FLAIR +C")),
    ),
    protocols={
        "t2": _p("Ax T2 FRFSE", "frfse", "SE", "SK", "FAST_GEMS\\FR_GEMS", "2D", "se", 5000, 100, echo_train=16, snr=45),
        "flair": _p("Ax T2 FLAIR", "fse-ir", "SE\\IR", "SK\\OSP", "FAST_GEMS\\IR_GEMS", "2D", "ir", 9500, 120, ti_ms=2400, echo_train=20, resolution=0.75, snr=30),
        "dwi": _p("Ax DWI 1000", "epi2", "EP", "NONE", "EPI_GEMS\\ACC_GEMS", "2D", "epi", 6000, 78, image_type=("ORIGINAL", "PRIMARY", "OTHER"), resolution=0.5, snr=45, fat_sat=True),
        "adc": _p("Apparent Diffusion Coefficient (mm2/s)", "epi2", "EP", "NONE", "EPI_GEMS\\ACC_GEMS", "2D", "epi", 6000, 78, image_type=("DERIVED", "SECONDARY", "ADC"), resolution=0.5, snr=45, fat_sat=True),
        "localizer": _p("3Plane Loc SSFSE", "ssfse", "SE", "SK", "FAST_GEMS", "2D", "se", 1200, 80, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), snr=20),
        "bold": _p("fMRI rest", "epi", "EP\\GR", "NONE", "EPI_GEMS", "2D", "gre", 2000, 30, flip_deg=77, snr=25),
        "fieldmap": _p("B0map", "fgre", "GR", "SS", "", "2D", "gre", 600, 4.0, flip_deg=30, image_type=("ORIGINAL", "PRIMARY", "OTHER"), snr=20),
        "fa": _p("FA (DTI)", "epi2", "EP", "NONE", "EPI_GEMS", "2D", "epi", 8000, 85, image_type=("DERIVED", "SECONDARY", "FA"), snr=20),
        "reformat": _p("Reformatted Cor T1", "se", "SE", "NONE", "", "2D", "se", 550, 10, image_type=("DERIVED", "SECONDARY", "REFORMATTED"), snr=40),
    },
    contrast_agents=("MultiHance", "Gadavist", "Omniscan"),
)

_PHILIPS = Vendor(
    manufacturer="Philips Medical Systems",
    models=("Ingenia", "Achieva", "Ingenia Elition X"),
    software="5.6.1",
    institution="SYNTHETIC SITE C",
    bits_stored=12,
    signed=False,
    white_matter_level=(150.0, 1200.0),
    rescale_slope=(0.5, 3.0),
    series_base=100,
    series_offset=1,
    private_creator="Philips Imaging DD 001",
    private_group=0x2001,
    private_element=0x03,
    private_vr="FL",
    t1_options=(
        (_p("T1W_SE", "SE", "SE", "NONE", "", "2D", "se", 500, 12, snr=40), ("T1W_SE+GD", "T1W_SE_GD", "T1W_SE")),
        (_p("T1W_3D_TFE", "T1TFE", "GR", "SK\\MTC", "", "3D", "gre", 8.1, 3.7, flip_deg=12, snr=45), ("T1W_3D_TFE+C", "T1W_3D_TFE_GD")),
    ),
    protocols={
        "t2": _p("T2W_TSE", "TSE", "SE", "SK", "", "2D", "se", 4200, 90, echo_train=15, snr=45),
        "flair": _p("FLAIR_longTR", "IR", "SE\\IR", "SK", "IR", "2D", "ir", 11000, 125, ti_ms=2800, echo_train=24, resolution=0.8, snr=30),
        "dwi": _p("DWI", "DwiSE", "SE\\EP", "SK", "FS", "2D", "epi", 3500, 75, image_type=("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"), resolution=0.55, snr=45, fat_sat=True),
        "adc": _p("dADC", "DwiSE", "SE\\EP", "SK", "FS", "2D", "epi", 3500, 75, image_type=("DERIVED", "PRIMARY", "ADC", "ADC"), resolution=0.55, snr=45, fat_sat=True),
        "localizer": _p("Survey", "FFE", "GR", "SS", "", "2D", "gre", 11, 4.6, flip_deg=15, image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"), snr=20),
        "bold": _p("fMRI_rest", "FEEPI", "GR", "SS", "FS", "2D", "gre", 2000, 30, flip_deg=90, image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"), snr=25),
        "fieldmap": _p("B0_map", "FFE", "GR", "SS", "", "2D", "gre", 20, 4.6, flip_deg=25, image_type=("ORIGINAL", "PRIMARY", "B0", "B0", "FFE"), snr=20),
        "fa": _p("DTI_FA", "DwiSE", "SE\\EP", "SK", "FS", "2D", "epi", 7000, 80, image_type=("DERIVED", "PRIMARY", "FA", "FA"), snr=20),
        "reformat": _p("MPR_T1_cor", "SE", "SE", "NONE", "", "2D", "se", 500, 12, image_type=("DERIVED", "SECONDARY", "MPR"), snr=40),
    },
    contrast_agents=("Gadovist", "Dotarem"),
)

_GENERIC = Vendor(
    manufacturer="NEURONODE SYNTH",
    models=("Generic MR 1.5T",),
    software="1.0",
    institution="SYNTHETIC SITE D",
    bits_stored=16,
    signed=False,
    white_matter_level=(1000.0, 8000.0),
    rescale_slope=None,
    series_base=1,
    series_offset=0,
    private_creator="",
    private_group=0,
    private_element=0,
    private_vr="",
    t1_options=((_p("T1 AX", "SE", "SE", "NONE", "", "2D", "se", 500, 10, snr=40), ("T1 AX POST", "T1 AX +C")),),
    protocols={
        "t2": _p("T2 AX", "TSE", "SE", "SK", "", "2D", "se", 4000, 100, echo_train=12, snr=40),
        "flair": _p("FLAIR AX", "IR", "SE\\IR", "SK", "IR", "2D", "ir", 9000, 110, ti_ms=2450, echo_train=16, resolution=0.8, snr=30),
        "dwi": _p("DWI AX", "EPI", "EP", "NONE", "FS", "2D", "epi", 5000, 80, image_type=("ORIGINAL", "PRIMARY", "DIFFUSION"), resolution=0.55, snr=45, fat_sat=True),
        "adc": _p("ADC AX", "EPI", "EP", "NONE", "FS", "2D", "epi", 5000, 80, image_type=("DERIVED", "PRIMARY", "ADC"), resolution=0.55, snr=45, fat_sat=True),
        "localizer": _p("LOCALIZER", "GRE", "GR", "SP", "", "2D", "gre", 10, 4, flip_deg=20, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), snr=20),
        "bold": _p("BOLD REST", "EPI", "EP\\GR", "NONE", "FS", "2D", "gre", 2000, 30, image_type=("ORIGINAL", "PRIMARY", "FMRI"), snr=25),
        "fieldmap": _p("FIELDMAP", "GRE", "GR", "SP", "", "2D", "gre", 500, 5, flip_deg=60, image_type=("ORIGINAL", "PRIMARY", "PHASE"), snr=20),
        "fa": _p("FA MAP", "EPI", "EP", "NONE", "FS", "2D", "epi", 7000, 90, image_type=("DERIVED", "PRIMARY", "FA"), snr=20),
        "reformat": _p("T1 COR MPR", "SE", "SE", "NONE", "", "2D", "se", 500, 10, image_type=("DERIVED", "SECONDARY", "MPR"), snr=40),
    },
    contrast_agents=("GADOLINIUM",),
)

VENDOR_TABLE: dict[str, Vendor] = {"siemens": _SIEMENS, "ge": _GE, "philips": _PHILIPS, "generic": _GENERIC}

# Descriptions a careless site gives a series instead of its own (misleading) by kind.
MISLEADING = {
    "t1": ("T2 AX", "SAG T1"),
    "t1c": ("T1 AX", "t1_se_tra"),
    "t2": ("FLAIR", "PD/T2"),
    "flair": ("T2 AX", "T1 FLAIR"),
    "dwi": ("ADC", "DIFFUSION"),
    "adc": ("DWI", "ep2d_diff"),
}
# Scanning order of the series within a study (distractors interleaved as sites do).
SCAN_ORDER = ("localizer", "t2", "flair", "dwi", "adc", "t1", "bold", "fieldmap", "t1c", "fa", "reformat")

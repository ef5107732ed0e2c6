"""Vendor conventions as data: protocol names, sequence parameters, pixel formats, private tags.

One block a vendor (Siemens, GE, Philips, generic), one row a protocol; a series the scanner
computes from another (the ADC map, a reformat) is derived from that one's row, not repeated.
Style b's site naming follows, per vendor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


def _values(text: str) -> tuple[str, ...]:
    """A multi-valued attribute written as in a DICOM header: values joined by backslashes."""
    return tuple(text.split("\\")) if text else ()


def _p(
    desc: str,
    seq: str,
    ss: str,
    sv: str,
    so: str,
    acq: str,
    eq: str,
    tr: float,
    te: float,
    *,
    image_type: str = "ORIGINAL\\PRIMARY\\M\\ND",
    **kw: object,
) -> Protocol:
    """One protocol row: the attributes every series has in the order a header shows them,
    then the ones that differ from Protocol's defaults."""
    return Protocol(
        description=desc,
        sequence_name=seq,
        scanning_sequence=_values(ss),
        sequence_variant=_values(sv),
        scan_options=_values(so),
        acquisition_type=acq,
        equation=eq,
        tr_ms=tr,
        te_ms=te,
        image_type=_values(image_type),
        **kw,  # type: ignore[arg-type]
    )


def _derived(
    acquired: Protocol,
    desc: str,
    image_type: str,
    *,
    so: str | None = None,
    snr: float | None = None,
) -> Protocol:
    """A series the scanner computes from another one's acquisition (the ADC map from the DWI,
    a reformat from a T1): the same parameters under its own name and image type."""
    return replace(
        acquired,
        description=desc,
        image_type=_values(image_type),
        scan_options=acquired.scan_options if so is None else _values(so),
        snr=acquired.snr if snr is None else snr,
    )


# One block a vendor: its T1 protocols (T1C reuses them), its DWI (the ADC is computed from it),
# its header conventions and the protocol of each other series kind. Formatting is off up to
# style b's tables so each protocol stays one row, read across like a table.
# fmt: off
_SIEMENS_T1 = (
    _p("t1_se_tra", "*se2d1", "SE", "SP", "", "2D", "se", 520, 9.1, flip_deg=90, snr=45),
    _p("t1_mprage_tra_p2_iso", "*tfl3d1_16ns", "GR\\IR", "SK\\SP\\MP", "IR", "3D", "ir", 2000, 2.3,
       ti_ms=900, flip_deg=8, snr=50),
)
_SIEMENS_DWI = _p("ep2d_diff_3scan_trace_p2_TRACEW", "*ep_b1000t", "EP", "SK\\SP", "PFP\\FS", "2D",
                  "epi", 5000, 89, image_type="ORIGINAL\\PRIMARY\\DIFFUSION\\TRACEW\\ND\\NORM",
                  resolution=0.55, snr=45, fat_sat=True)
_SIEMENS = Vendor(
    manufacturer="SIEMENS", models=("Skyra", "Prisma", "Avanto", "Vida"),
    software="syngo MR E11", institution="SYNTHETIC SITE A",
    bits_stored=12, signed=False, white_matter_level=(250.0, 700.0), rescale_slope=None,
    series_base=1, series_offset=0,
    private_creator="SIEMENS MR HEADER",
    private_group=0x0019, private_element=0x0C, private_vr="IS",
    t1_options=(
        (_SIEMENS_T1[0], ("t1_se_tra", "t1_se_tra_KM", "t1_se_tra_post")),
        (_SIEMENS_T1[1], ("t1_mprage_tra_p2_iso", "t1_mprage_tra_p2_iso_KM", "t1_mprage_tra_post")),
    ),
    protocols={
        "t2": _p("t2_tse_tra", "*tse2d1_15", "SE", "SK\\SP\\OSP", "PFP", "2D", "se", 4500, 96,
                 echo_train=15, snr=45),
        "flair": _p("t2_tirm_tra_dark-fluid", "*tir2d1_13", "SE\\IR", "SK\\SP\\MP\\OSP", "IR",
                    "2D", "ir", 9000, 85, ti_ms=2500, echo_train=13, resolution=0.8, snr=32),
        "dwi": _SIEMENS_DWI,
        "adc": _derived(_SIEMENS_DWI, "ep2d_diff_3scan_trace_p2_ADC",
                        "DERIVED\\PRIMARY\\DIFFUSION\\ADC\\ND\\NORM"),
        "localizer": _p("localizer", "*fl2d1", "GR", "SP", "", "2D", "gre", 8.6, 4.0, flip_deg=20,
                        image_type="ORIGINAL\\PRIMARY\\M\\NORM\\DIS2D", snr=20),
        "bold": _p("ep2d_bold_resting", "*epfid2d1_64", "EP", "SK", "FS", "2D", "gre", 2000, 30,
                   flip_deg=90, image_type="ORIGINAL\\PRIMARY\\M\\ND\\MOSAIC", snr=25,
                   fat_sat=True),
        "fieldmap": _p("gre_field_mapping", "*fm2d2r", "GR", "SP", "", "2D", "gre", 488, 7.38,
                       flip_deg=60, image_type="ORIGINAL\\PRIMARY\\P\\ND", snr=20),
        "fa": _p("ep2d_diff_mddw_20_p2_FA", "*ep_b0_1000", "EP", "SK\\SP", "PFP\\FS", "2D", "epi",
                 7000, 95, image_type="DERIVED\\PRIMARY\\DIFFUSION\\FA\\ND\\NORM", snr=20),
        "reformat": _derived(_SIEMENS_T1[1], "t1_MPR_cor", "DERIVED\\SECONDARY\\MPR\\ND\\NORM",
                             snr=45),
    },
    contrast_agents=("Gadovist", "Dotarem", "Gadobutrol 1.0 mmol/ml"),
)

_GE_T1 = (
    _p("Ax T1 SE", "se", "SE", "NONE", "FAST_GEMS", "2D", "se", 550, 10, snr=40),
    _p("AX T1 FLAIR", "fse-ir", "SE\\IR", "SK\\OSP", "FAST_GEMS\\IR_GEMS", "2D", "ir", 2200, 10,
       ti_ms=860, echo_train=8, snr=40),
)
_GE_DWI = _p("Ax DWI 1000", "epi2", "EP", "NONE", "EPI_GEMS\\ACC_GEMS", "2D", "epi", 6000, 78,
             image_type="ORIGINAL\\PRIMARY\\OTHER", resolution=0.5, snr=45, fat_sat=True)
_GE = Vendor(
    manufacturer="GE MEDICAL SYSTEMS", models=("DISCOVERY MR750", "SIGNA Premier", "Optima MR450w"),
    software="DV26.0_R03", institution="SYNTHETIC SITE B",
    bits_stored=16, signed=True, white_matter_level=(700.0, 3000.0), rescale_slope=None,
    series_base=1, series_offset=0,
    private_creator="GEMS_PARM_01",
    private_group=0x0043, private_element=0x39, private_vr="IS",
    t1_options=(
        (_GE_T1[0], ("Ax T1 SE +C", "AX T1 SE POST", "Ax T1 +C")),
        (_GE_T1[1], ("AX T1 FLAIR POST", "AX T1 FLAIR +C")),
    ),
    protocols={
        "t2": _p("Ax T2 FRFSE", "frfse", "SE", "SK", "FAST_GEMS\\FR_GEMS", "2D", "se", 5000, 100,
                 echo_train=16, snr=45),
        "flair": _p("Ax T2 FLAIR", "fse-ir", "SE\\IR", "SK\\OSP", "FAST_GEMS\\IR_GEMS", "2D", "ir",
                    9500, 120, ti_ms=2400, echo_train=20, resolution=0.75, snr=30),
        "dwi": _GE_DWI,
        "adc": _derived(_GE_DWI, "Apparent Diffusion Coefficient (mm2/s)",
                        "DERIVED\\SECONDARY\\ADC"),
        "localizer": _p("3Plane Loc SSFSE", "ssfse", "SE", "SK", "FAST_GEMS", "2D", "se", 1200, 80,
                        image_type="ORIGINAL\\PRIMARY\\LOCALIZER", snr=20),
        "bold": _p("fMRI rest", "epi", "EP\\GR", "NONE", "EPI_GEMS", "2D", "gre", 2000, 30,
                   flip_deg=77, snr=25, fat_sat=True),
        "fieldmap": _p("B0map", "fgre", "GR", "SS", "", "2D", "gre", 600, 4.0, flip_deg=30,
                       image_type="ORIGINAL\\PRIMARY\\OTHER", snr=20),
        "fa": _p("FA (DTI)", "epi2", "EP", "NONE", "EPI_GEMS", "2D", "epi", 8000, 85,
                 image_type="DERIVED\\SECONDARY\\FA", snr=20),
        "reformat": _derived(_GE_T1[0], "Reformatted Cor T1", "DERIVED\\SECONDARY\\REFORMATTED",
                             so=""),
    },
    contrast_agents=("MultiHance", "Gadavist", "Omniscan"),
)

_PHILIPS_T1 = (
    _p("T1W_SE", "SE", "SE", "NONE", "", "2D", "se", 500, 12, snr=40),
    _p("T1W_3D_TFE", "T1TFE", "GR", "SK\\MTC", "", "3D", "gre", 8.1, 3.7, flip_deg=12, snr=45),
)
_PHILIPS_DWI = _p("DWI", "DwiSE", "SE\\EP", "SK", "FS", "2D", "epi", 3500, 75,
                  image_type="ORIGINAL\\PRIMARY\\M_SE\\M\\SE", resolution=0.55, snr=45,
                  fat_sat=True)
_PHILIPS = Vendor(
    manufacturer="Philips Medical Systems", models=("Ingenia", "Achieva", "Ingenia Elition X"),
    software="5.6.1", institution="SYNTHETIC SITE C",
    bits_stored=12, signed=False, white_matter_level=(150.0, 1200.0), rescale_slope=(0.5, 3.0),
    series_base=100, series_offset=1,
    private_creator="Philips Imaging DD 001",
    private_group=0x2001, private_element=0x03, private_vr="FL",
    t1_options=(
        (_PHILIPS_T1[0], ("T1W_SE+GD", "T1W_SE_GD", "T1W_SE")),
        (_PHILIPS_T1[1], ("T1W_3D_TFE+C", "T1W_3D_TFE_GD")),
    ),
    protocols={
        "t2": _p("T2W_TSE", "TSE", "SE", "SK", "", "2D", "se", 4200, 90, echo_train=15, snr=45),
        "flair": _p("FLAIR_longTR", "IR", "SE\\IR", "SK", "IR", "2D", "ir", 11000, 125, ti_ms=2800,
                    echo_train=24, resolution=0.8, snr=30),
        "dwi": _PHILIPS_DWI,
        "adc": _derived(_PHILIPS_DWI, "dADC", "DERIVED\\PRIMARY\\ADC\\ADC"),
        "localizer": _p("Survey", "FFE", "GR", "SS", "", "2D", "gre", 11, 4.6, flip_deg=15,
                        image_type="ORIGINAL\\PRIMARY\\M_FFE\\M\\FFE", snr=20),
        "bold": _p("fMRI_rest", "FEEPI", "GR", "SS", "FS", "2D", "gre", 2000, 30, flip_deg=90,
                   image_type="ORIGINAL\\PRIMARY\\M_FFE\\M\\FFE", snr=25, fat_sat=True),
        "fieldmap": _p("B0_map", "FFE", "GR", "SS", "", "2D", "gre", 20, 4.6, flip_deg=25,
                       image_type="ORIGINAL\\PRIMARY\\B0\\B0\\FFE", snr=20),
        "fa": _p("DTI_FA", "DwiSE", "SE\\EP", "SK", "FS", "2D", "epi", 7000, 80,
                 image_type="DERIVED\\PRIMARY\\FA\\FA", snr=20),
        "reformat": _derived(_PHILIPS_T1[0], "MPR_T1_cor", "DERIVED\\SECONDARY\\MPR"),
    },
    contrast_agents=("Gadovist", "Dotarem"),
)

_GENERIC_T1 = (_p("T1 AX", "SE", "SE", "NONE", "", "2D", "se", 500, 10, snr=40),)
_GENERIC_DWI = _p("DWI AX", "EPI", "EP", "NONE", "FS", "2D", "epi", 5000, 80,
                  image_type="ORIGINAL\\PRIMARY\\DIFFUSION", resolution=0.55, snr=45, fat_sat=True)
_GENERIC = Vendor(
    manufacturer="NEURONODE SYNTH", models=("Generic MR 1.5T",),
    software="1.0", institution="SYNTHETIC SITE D",
    bits_stored=16, signed=False, white_matter_level=(1000.0, 8000.0), rescale_slope=None,
    series_base=1, series_offset=0,
    private_creator="",
    private_group=0x0000, private_element=0x00, private_vr="",
    t1_options=((_GENERIC_T1[0], ("T1 AX POST", "T1 AX +C")),),
    protocols={
        "t2": _p("T2 AX", "TSE", "SE", "SK", "", "2D", "se", 4000, 100, echo_train=12, snr=40),
        "flair": _p("FLAIR AX", "IR", "SE\\IR", "SK", "IR", "2D", "ir", 9000, 110, ti_ms=2450,
                    echo_train=16, resolution=0.8, snr=30),
        "dwi": _GENERIC_DWI,
        "adc": _derived(_GENERIC_DWI, "ADC AX", "DERIVED\\PRIMARY\\ADC"),
        "localizer": _p("LOCALIZER", "GRE", "GR", "SP", "", "2D", "gre", 10, 4, flip_deg=20,
                        image_type="ORIGINAL\\PRIMARY\\LOCALIZER", snr=20),
        "bold": _p("BOLD REST", "EPI", "EP\\GR", "NONE", "FS", "2D", "gre", 2000, 30,
                   image_type="ORIGINAL\\PRIMARY\\FMRI", snr=25, fat_sat=True),
        "fieldmap": _p("FIELDMAP", "GRE", "GR", "SP", "", "2D", "gre", 500, 5, flip_deg=60,
                       image_type="ORIGINAL\\PRIMARY\\PHASE", snr=20),
        "fa": _p("FA MAP", "EPI", "EP", "NONE", "FS", "2D", "epi", 7000, 90,
                 image_type="DERIVED\\PRIMARY\\FA", snr=20),
        "reformat": _derived(_GENERIC_T1[0], "T1 COR MPR", "DERIVED\\SECONDARY\\MPR"),
    },
    contrast_agents=("GADOLINIUM",),
)

VENDOR_TABLE: dict[str, Vendor] = {
    "siemens": _SIEMENS,
    "ge": _GE,
    "philips": _PHILIPS,
    "generic": _GENERIC,
}

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
SCAN_ORDER = (
    "localizer",
    "t2",
    "flair",
    "dwi",
    "adc",
    "t1",
    "bold",
    "fieldmap",
    "t1c",
    "fa",
    "reformat",
)

# 3D protocols by vendor and acquisition group (T1 also with its T1C descriptions), used when a
# randomised study draws a 3D acquisition. Descriptions name the axial plane; randomise.plane_name
# rewrites them for the plane drawn.
VOLUME_PROTOCOLS: dict[str, dict[str, tuple[Protocol, tuple[str, ...]]]] = {
    "siemens": {
        "t1": _SIEMENS.t1_options[1],
        "t2": (_p("t2_spc_tra_p2_iso", "*spc_313ns", "SE", "SK\\SP\\OSP", "", "3D", "se", 3200,
                  110, echo_train=141, snr=40), ()),
        "flair": (_p("t2_spc_da-fl_tra_p2_iso", "*spcir_278ns", "SE\\IR", "SK\\SP\\MP\\OSP", "IR",
                     "3D", "ir", 5000, 120, ti_ms=1800, echo_train=251, snr=32), ()),
    },
    "ge": {
        "t1": (_p("Ax T1 3D BRAVO", "efgre3d", "GR\\IR", "SS\\SK", "FAST_GEMS\\EDR_GEMS", "3D",
                  "ir", 2000, 3.2, ti_ms=900, flip_deg=12, snr=45),
               ("Ax T1 3D BRAVO +C", "AX BRAVO POST")),
        "t2": (_p("Ax CUBE T2", "3dfse", "SE", "SK", "FAST_GEMS", "3D", "se", 3000, 100,
                  echo_train=120, snr=40), ()),
        "flair": (_p("Ax CUBE T2 FLAIR", "3dfse-ir", "SE\\IR", "SK\\OSP", "FAST_GEMS\\IR_GEMS",
                     "3D", "ir", 6000, 120, ti_ms=1900, echo_train=180, snr=32), ()),
    },
    "philips": {
        "t1": _PHILIPS.t1_options[1],
        "t2": (_p("T2W_3D_TSE", "TSE", "SE", "SK", "", "3D", "se", 2500, 100, echo_train=90,
                  snr=40), ()),
        "flair": (_p("3D_Brain_VIEW_FLAIR", "IR", "SE\\IR", "SK", "IR", "3D", "ir", 4800, 130,
                     ti_ms=1650, echo_train=160, snr=30), ()),
    },
    "generic": {
        "t1": (_p("T1 3D AX", "GRE3D", "GR\\IR", "SP\\MP", "IR", "3D", "ir", 2000, 2.5, ti_ms=900,
                  flip_deg=9, snr=45), ("T1 3D AX POST", "T1 3D AX +C")),
        "t2": (_p("T2 3D AX", "TSE3D", "SE", "SK", "", "3D", "se", 3000, 100, echo_train=100,
                  snr=40), ()),
        "flair": (_p("FLAIR 3D AX", "IR3D", "SE\\IR", "SK", "IR", "3D", "ir", 5000, 120,
                     ti_ms=1800, echo_train=150, snr=30), ()),
    },
}
# fmt: on


# Rendering style b's header conventions: a site naming scheme ({P}: the plane abbreviation),
# per vendor and (kind, 2D/3D); T1C names are chosen from a tuple.
STYLE_B_PLANES = {
    "siemens": {"axial": "AX", "sagittal": "SAG", "coronal": "COR"},
    "ge": {"axial": "AXIAL", "sagittal": "SAGITTAL", "coronal": "CORONAL"},
    "philips": {"axial": "TRA", "sagittal": "SAG", "coronal": "COR"},
    "generic": {"axial": "ax", "sagittal": "sag", "coronal": "cor"},
}
STYLE_B_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "siemens": {
        "t1/2D": ("{P} T1 SE",),
        "t1/3D": ("{P} T1 MPRAGE", "{P} MPRAGE 1mm"),
        "t1c/2D": ("{P} T1 SE +C", "{P} T1 SE POST GAD"),
        "t1c/3D": ("{P} T1 MPRAGE +C", "{P} MPRAGE 1mm POST"),
        "t2/2D": ("{P} T2 TSE",),
        "t2/3D": ("{P} T2 SPACE",),
        "flair/2D": ("{P} T2 FLAIR",),
        "flair/3D": ("{P} 3D FLAIR SPACE",),
        "dwi/2D": ("{P} DWI b1000 TRACE",),
        "adc/2D": ("{P} DWI b1000 ADC",),
    },
    "ge": {
        "t1/2D": ("{P} T1 FSE",),
        "t1/3D": ("{P} 3D T1 BRAVO",),
        "t1c/2D": ("{P} T1 FSE +C", "{P} T1 FSE GAD"),
        "t1c/3D": ("{P} 3D T1 BRAVO +C", "{P} BRAVO POST"),
        "t2/2D": ("{P} T2 PROPELLER",),
        "t2/3D": ("{P} CUBE T2",),
        "flair/2D": ("{P} T2 FLAIR PROPELLER",),
        "flair/3D": ("{P} CUBE FLAIR",),
        "dwi/2D": ("{P} DIFFUSION 1000",),
        "adc/2D": ("ADC (10^-6 mm2/s)",),
    },
    "philips": {
        "t1/2D": ("T1W_SE_{P}",),
        "t1/3D": ("T1W_3D_{P}",),
        "t1c/2D": ("T1W_SE_{P}_GD", "T1W_SE_{P}+C"),
        "t1c/3D": ("T1W_3D_{P}_GD", "T1W_3D_{P}+C"),
        "t2/2D": ("T2W_TSE_{P}",),
        "t2/3D": ("VISTA_T2_{P}",),
        "flair/2D": ("FLAIR_{P}",),
        "flair/3D": ("VISTA_FLAIR_{P}",),
        "dwi/2D": ("DWI_{P}_b1000",),
        "adc/2D": ("DWI_{P}_b1000_ADC",),
    },
    "generic": {
        "t1/2D": ("brain t1 {P}",),
        "t1/3D": ("brain t1 3d {P}",),
        "t1c/2D": ("brain t1 {P} post",),
        "t1c/3D": ("brain t1 3d {P} post",),
        "t2/2D": ("brain t2 {P}",),
        "t2/3D": ("brain t2 3d {P}",),
        "flair/2D": ("brain flair {P}",),
        "flair/3D": ("brain flair 3d {P}",),
        "dwi/2D": ("brain dwi {P}",),
        "adc/2D": ("brain adc {P}",),
    },
}
# Style b's study-level conventions per vendor: study description, model names, software.
STYLE_B_STUDY = {
    "siemens": ("MRI BRAIN W/WO CONTRAST", ("MAGNETOM Vida", "MAGNETOM Aera"), "syngo MR XA31"),
    "ge": ("MR HEAD WITHOUT AND WITH IV CONTRAST", ("SIGNA Architect", "SIGNA Explorer"), "MR30.1"),
    "philips": ("MRI Hersenen", ("Ingenia CX", "Achieva dStream"), "5.7.1"),
    "generic": ("BRAIN^TUMOUR PROTOCOL", ("Generic MR 3T",), "2.0"),
}

# Rendering style c's header conventions: one site's normalised naming for every vendor
# ("MR BRAIN" + plane + contrast + the vendor's sequence family), a study-level ProtocolName,
# series numbered in hundreds, and pixels stored as full-range unsigned 16 bits.
STYLE_C_PLANES = {"axial": "TRANS", "sagittal": "SAGIT", "coronal": "CORON"}
STYLE_C_FAMILY = {
    "siemens": {"se": "TSE", "t1_3d": "MPRAGE", "t2_3d": "SPACE", "flair_3d": "SPACE-FLAIR"},
    "ge": {"se": "FSE", "t1_3d": "BRAVO", "t2_3d": "CUBE", "flair_3d": "CUBE-FLAIR"},
    "philips": {"se": "TSE", "t1_3d": "TFE", "t2_3d": "VISTA", "flair_3d": "VISTA-FLAIR"},
    "generic": {"se": "SE", "t1_3d": "GRE", "t2_3d": "3D-SE", "flair_3d": "3D-FLAIR"},
}
STYLE_C_NAMES: dict[str, tuple[str, ...]] = {
    "t1/2D": ("MR BRAIN {P} T1 {se}",),
    "t1/3D": ("MR BRAIN {P} T1 {t1_3d}", "MR BRAIN VOL T1 {t1_3d} {P}"),
    "t1c/2D": ("MR BRAIN {P} T1 {se} POST", "MR BRAIN {P} T1 {se} C+"),
    "t1c/3D": ("MR BRAIN {P} T1 {t1_3d} POST", "MR BRAIN VOL T1 {t1_3d} {P} C+"),
    "t2/2D": ("MR BRAIN {P} T2 {se}",),
    "t2/3D": ("MR BRAIN {P} T2 {t2_3d}",),
    "flair/2D": ("MR BRAIN {P} FLAIR", "MR BRAIN {P} T2 DARK FLUID"),
    "flair/3D": ("MR BRAIN {P} {flair_3d}",),
    "dwi/2D": ("MR BRAIN {P} DIFFUSION TRACE", "MR BRAIN {P} DWI B0 B1000"),
    "adc/2D": ("MR BRAIN {P} ADC MAP", "MR BRAIN {P} DIFFUSION ADC"),
}
# Style c's study-level conventions per vendor: study description, model names, software,
# and the white-matter level of its full-range 16-bit storage (Philips keeps its scaling).
STYLE_C_STUDY = {
    "siemens": (
        "NEURO^BRAIN TUMOUR",
        ("MAGNETOM Skyra", "MAGNETOM Sola"),
        "syngo MR E11C",
        (1500.0, 6000.0),
    ),
    "ge": (
        "NEURO^BRAIN TUMOUR",
        ("DISCOVERY MR750w", "SIGNA Premier"),
        "DV29.1_R02",
        (1500.0, 6000.0),
    ),
    "philips": ("NEURO^BRAIN TUMOUR", ("Ingenia Elition X",), "5.9.0", (150.0, 1200.0)),
    "generic": ("NEURO^BRAIN TUMOUR", ("Generic MR 1.5T",), "3.1", (1500.0, 6000.0)),
}

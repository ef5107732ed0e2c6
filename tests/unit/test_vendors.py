"""The vendor tables say what docs/synth.md says each scanner writes.

The expected values are copied from docs/synth.md (Headers), not from vendors.py, so a change to
the tables that alters what the synthetic studies carry in their headers fails here.
"""

from __future__ import annotations

import dataclasses

import pytest

from node.lab.synth.vendors import VENDOR_TABLE, VOLUME_PROTOCOLS, Protocol

# vendor -> (T1 descriptions, T2, FLAIR, DWI, ADC, DWI/ADC ImageType starts, private b-value tag)
DOCUMENTED = {
    "siemens": (
        ("t1_se_tra", "t1_mprage_tra_p2_iso"),
        "t2_tse_tra",
        "t2_tirm_tra_dark-fluid",
        "ep2d_diff_3scan_trace_p2_TRACEW",
        "ep2d_diff_3scan_trace_p2_ADC",
        (
            ("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"),
            ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"),
        ),
        ("SIEMENS MR HEADER", 0x0019, 0x0C, "IS"),
    ),
    "ge": (
        ("Ax T1 SE", "AX T1 FLAIR"),
        "Ax T2 FRFSE",
        "Ax T2 FLAIR",
        "Ax DWI 1000",
        "Apparent Diffusion Coefficient (mm2/s)",
        None,
        ("GEMS_PARM_01", 0x0043, 0x39, "IS"),
    ),
    "philips": (
        ("T1W_SE", "T1W_3D_TFE"),
        "T2W_TSE",
        "FLAIR_longTR",
        "DWI",
        "dADC",
        None,
        ("Philips Imaging DD 001", 0x2001, 0x03, "FL"),
    ),
}
# What a scanner changes when it computes the ADC map from the DWI, or reformats a T1.
DERIVED_FIELDS = {"description", "image_type"}


@pytest.mark.parametrize("vendor", sorted(DOCUMENTED))
def test_headers_are_the_documented_ones(vendor: str) -> None:
    t1, t2, flair, dwi, adc, image_types, private = DOCUMENTED[vendor]
    v = VENDOR_TABLE[vendor]
    assert tuple(p.description for p, _ in v.t1_options) == t1
    got = tuple(v.protocols[k].description for k in ("t2", "flair", "dwi", "adc"))
    assert got == (t2, flair, dwi, adc)
    if image_types is not None:
        for kind, start in zip(("dwi", "adc"), image_types, strict=True):
            assert v.protocols[kind].image_type[: len(start)] == start
    assert (v.private_creator, v.private_group, v.private_element, v.private_vr) == private
    if vendor == "ge":
        assert all(o.endswith("_GEMS") for o in v.protocols["t2"].scan_options)
    if vendor == "philips":
        assert (v.series_base, v.series_offset) == (100, 1)  # series 101, 201, ...


def differing(a: Protocol, b: Protocol) -> set[str]:
    return {
        f.name for f in dataclasses.fields(Protocol) if getattr(a, f.name) != getattr(b, f.name)
    }


@pytest.mark.parametrize("vendor", sorted(VENDOR_TABLE))
def test_the_adc_map_is_computed_from_the_dwi_acquisition(vendor: str) -> None:
    p = VENDOR_TABLE[vendor].protocols
    assert differing(p["dwi"], p["adc"]) == DERIVED_FIELDS
    assert p["dwi"].image_type[0] == "ORIGINAL" and p["adc"].image_type[0] == "DERIVED"
    assert p["reformat"].image_type[:2] == ("DERIVED", "SECONDARY")


def test_protocol_values_keep_their_types() -> None:
    """Integers stay integers: a header writes TR 4500 as '4500', not '4500.0'."""
    siemens = VENDOR_TABLE["siemens"].protocols
    assert type(siemens["t2"].tr_ms) is int and type(siemens["localizer"].tr_ms) is float
    assert type(VENDOR_TABLE["siemens"].t1_options[0][0].flip_deg) is int  # written as 90
    assert type(VENDOR_TABLE["ge"].t1_options[0][0].flip_deg) is float  # the default, 90.0
    for groups in VOLUME_PROTOCOLS.values():
        assert {p.acquisition_type for p, _ in groups.values()} == {"3D"}

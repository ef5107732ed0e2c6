"""Synthetic multi-contrast brain MRI DICOM studies with ground truth (tests, demo, training)."""

from node.synth.phenotypes import PHENOTYPES, study_labels
from node.synth.study import (
    Manifest,
    SynthSeries,
    SynthStudy,
    generate_study,
    study_plan,
    write_studies,
)
from node.synth.vendors import VENDORS

__all__ = [
    "PHENOTYPES",
    "VENDORS",
    "Manifest",
    "SynthSeries",
    "SynthStudy",
    "generate_study",
    "study_labels",
    "study_plan",
    "write_studies",
]

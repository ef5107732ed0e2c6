"""Synthetic multi-contrast brain MRI DICOM studies with ground truth (tests, demo, training)."""

from node.lab.synth.phenotypes import PHENOTYPES, study_labels
from node.lab.synth.study import (
    Manifest,
    SynthSeries,
    SynthStudy,
    generate_study,
    study_plan,
    write_studies,
)
from node.lab.synth.vendors import VENDORS

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

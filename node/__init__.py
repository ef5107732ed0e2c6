"""neuronode: a DICOM AI node for brain MRI beside the PACS. NOT FOR CLINICAL USE."""

__version__ = "0.1.0"

NOT_FOR_CLINICAL_USE = (
    "NOT FOR CLINICAL USE: research software; shipped models are trained on synthetic data."
)

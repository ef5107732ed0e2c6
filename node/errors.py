"""One exception tree for the node, and the DICOM status codes it answers with, by name."""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 Annex B.2.3 / PS3.7 Annex C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122


class EchoStatus(IntEnum):
    """C-ECHO response statuses."""

    SUCCESS = 0x0000


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The settings or rule file is invalid; the message names the file, key path and line."""


class InvalidInstance(NodeError):
    """A received or loaded DICOM instance cannot be used (unparseable, missing UIDs, bad UID)."""


class SpoolFull(NodeError):
    """Free disk is below the configured floor; nothing was written."""


class SpoolError(NodeError):
    """The spool or its index could not record an instance."""


class JobError(NodeError):
    """The job queue refused an operation (unknown job, lost lease)."""


class LoadError(NodeError):
    """A series could not be assembled into slices (geometry or pixel decoding)."""


class StageFailed(NodeError):
    """A pipeline stage failed with an error that was not already a NodeError; `stage` names it."""

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class ModelUnavailable(NodeError):
    """A model bundle cannot be served (missing weights, failed checksum, bad metadata)."""


class InferenceError(NodeError):
    """A model failed while running on a series."""


class ReportError(NodeError):
    """The SR or Secondary Capture objects could not be built."""


class SendError(NodeError):
    """Delivery to a destination failed; `retryable` says whether to try again later."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable

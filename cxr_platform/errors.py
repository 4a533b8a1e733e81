"""Typed errors raised at the platform's edges.

Every error a user can trigger with bad input is a subclass of :class:`CxrError`, so the CLI,
the HTTP service and the DICOM node can turn it into an exit code, a 4xx response or a DICOM
failure status with the message intact.
"""

from __future__ import annotations


class CxrError(Exception):
    """Base class of every error the platform raises on purpose."""


class ImageReadError(CxrError):
    """An image could not be turned into pixels. ``reason`` is a short machine-readable code."""

    reason = "unreadable"

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)
        self.detail = message


class EmptyImageError(ImageReadError):
    reason = "empty"


class UnrecognizedImageFormatError(ImageReadError):
    reason = "unrecognized_format"


class TruncatedImageError(ImageReadError):
    reason = "truncated"


class ImageTooLargeError(ImageReadError):
    reason = "too_large"


class DicomWithoutPixelDataError(ImageReadError):
    reason = "dicom_no_pixel_data"


class NonImageDicomError(ImageReadError):
    reason = "dicom_not_an_image"


class MultiFrameDicomError(ImageReadError):
    reason = "dicom_multi_frame"


class UnsupportedTransferSyntaxError(ImageReadError):
    reason = "dicom_unsupported_transfer_syntax"


class DatasetLayoutError(CxrError):
    """A data folder does not match any layout the platform accepts."""


class LabelsFileError(CxrError):
    """A labels CSV is missing columns, has unknown labels or names files that do not exist."""


class SplitError(CxrError):
    """A patient-level split cannot be made as asked (bad ratios, too few patients)."""

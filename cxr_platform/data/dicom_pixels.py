"""DICOM pixels: modality and VOI LUTs, windowing, photometric interpretation, transfer syntax.

Called by :func:`cxr_platform.data.imaging.read_image`, the one decoder, when the content is
DICOM; kept apart so that importing the decoder does not import pydicom.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxr_platform.data.decoded import DecodedImage, luma, min_max_scale
from cxr_platform.errors import (
    DicomWithoutPixelDataError,
    ImageReadError,
    ImageTooLargeError,
    MultiFrameDicomError,
    NonImageDicomError,
    UnrecognizedImageFormatError,
    UnsupportedTransferSyntaxError,
)

# SOP classes that can carry pixel data yet are not radiographs to classify. Results the platform
# itself sends to PACS (SEG, SC overlays are handled by the node's filters) must never loop back.
_NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # Structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # Presentation states
    "1.2.840.10008.5.1.4.1.1.66.",  # Segmentation, registration, fiducials
    "1.2.840.10008.5.1.4.1.1.104.",  # Encapsulated documents (PDF, CDA)
    "1.2.840.10008.5.1.4.1.1.9.",  # Waveforms (ECG etc.)
)


def read_dicom_header(source: str | Path | bytes) -> Dataset:
    """The DICOM header without pixel data (for PatientID / SOPInstanceUID look-ups)."""
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return pydicom.dcmread(fileobj, stop_before_pixels=True, force=True)
    except Exception as exc:
        raise ImageReadError(f"unreadable DICOM header: {exc}") from exc


def read_dicom(
    data: bytes,
    label: str | None,
    max_pixels: int,
    window_index: int,
    *,
    legacy: bool = False,
) -> DecodedImage:
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=legacy)
    except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
        if legacy:
            raise UnrecognizedImageFormatError(str(exc), source=label) from exc
        raise ImageReadError(f"invalid DICOM: {exc}", source=label) from exc
    except Exception as exc:
        raise ImageReadError(f"invalid DICOM: {exc}", source=label) from exc

    if legacy and not _is_plausible_dicom(dataset):
        raise UnrecognizedImageFormatError("no DICOM elements found", source=label)

    sop_class = str(dataset.get("SOPClassUID", ""))
    if sop_class.startswith(_NON_IMAGE_SOP_CLASS_PREFIXES):
        raise NonImageDicomError(
            f"DICOM object is not an image to classify ({_sop_class_name(sop_class)})",
            source=label,
        )
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        what = _sop_class_name(sop_class) if sop_class else "unknown SOP class"
        raise DicomWithoutPixelDataError(f"DICOM has no pixel data ({what})", source=label)

    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MultiFrameDicomError(
            f"multi-frame DICOM ({frames} frames) is not a single radiograph", source=label
        )
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"{columns}x{rows} pixels exceeds the limit of {max_pixels}", source=label
        )

    _ensure_transfer_syntax(dataset)
    transfer_syntax = dataset.file_meta.TransferSyntaxUID
    try:
        stored = dataset.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        raise UnsupportedTransferSyntaxError(
            f"cannot decode transfer syntax {transfer_syntax.name} ({transfer_syntax}): {exc}",
            source=label,
        ) from exc
    except Exception as exc:
        raise ImageReadError(f"cannot decode DICOM pixel data: {exc}", source=label) from exc

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if stored.ndim == 3 and stored.shape[-1] in (3, 4):
        # Colour secondary captures: pydicom has already converted YBR to RGB.
        bit_depth = int(dataset.get("BitsStored", 8))
        # Scale by the stored range, as for 8-bit PNG/JPEG, not by this image's own min/max.
        top = float(2**bit_depth - 1)
        pixels = np.clip(luma(stored[..., :3].astype(np.float32)) / top, 0.0, 1.0)
    elif stored.ndim == 2:
        pixels = _monochrome_to_unit(dataset, stored, window_index)
        if photometric == "MONOCHROME1":
            # MONOCHROME1 shows low values as white; flip so bone is bright everywhere.
            pixels = 1.0 - pixels
        bit_depth = int(dataset.get("BitsStored", dataset.get("BitsAllocated", 16)))
    else:
        raise ImageReadError(
            f"unexpected DICOM pixel array shape {tuple(stored.shape)}", source=label
        )

    return DecodedImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        source_format="DICOM",
        width=columns or int(pixels.shape[1]),
        height=rows or int(pixels.shape[0]),
        mode=photometric,
        bit_depth=bit_depth,
        photometric_interpretation=photometric,
        transfer_syntax=str(transfer_syntax),
    )


def _is_plausible_dicom(dataset: Dataset) -> bool:
    return any(tag in dataset for tag in ("SOPClassUID", "PixelData", "Rows", "Modality"))


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return f"{name} [{uid}]" if name and name != uid else uid or "unknown"


def _ensure_transfer_syntax(dataset: Dataset) -> None:
    """Legacy files have no file meta: record how the body was actually encoded."""
    meta = getattr(dataset, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if meta is None:
        dataset.file_meta = FileMetaDataset()
    implicit, little = getattr(dataset, "original_encoding", (True, True))
    if implicit:
        dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        dataset.file_meta.TransferSyntaxUID = (
            ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )


def _monochrome_to_unit(dataset: Dataset, stored: np.ndarray, window_index: int) -> np.ndarray:
    """Modality LUT (rescale), then VOI (LUT or window), then map to [0, 1]."""
    values = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float64)

    voi_lut_sequence = dataset.get("VOILUTSequence")
    if voi_lut_sequence:
        return _apply_voi_lut_item(
            values, voi_lut_sequence[min(window_index, len(voi_lut_sequence) - 1)]
        )

    centers = _as_list(dataset.get("WindowCenter"))
    widths = _as_list(dataset.get("WindowWidth"))
    if centers and widths:
        index = min(window_index, len(centers) - 1, len(widths) - 1)
        center, width = float(centers[index]), float(widths[index])
        if width > 0:
            function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
            return window_to_unit(values, center, width, function)
    # No VOI in the header: use the image's own full dynamic range.
    return min_max_scale(values)


def window_to_unit(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, written to output [0, 1] instead of a display range.

    pydicom's ``apply_windowing`` maps to the stored-value range, whose bounds depend on header
    fields we would then have to re-derive; the standard's three formulas are short enough to
    apply directly with the output range we need.
    """
    values = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        out = (values - center) / width + 0.5
    else:
        if width < 1:
            width = 1.0
        out = (
            (values - (center - 0.5)) / (width - 1.0) + 0.5
            if width > 1
            else (values >= center) * 1.0
        )
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _apply_voi_lut_item(values: np.ndarray, item: Dataset) -> np.ndarray:
    descriptor = [int(v) for v in item.LUTDescriptor]
    entries, first_mapped, bits = descriptor
    entries = entries or 65536
    lut_data = item.LUTData
    if isinstance(lut_data, bytes):
        dtype = np.uint16 if bits > 8 else np.uint8
        lut = np.frombuffer(lut_data, dtype=dtype)
    else:
        lut = np.asarray(lut_data)
    lut = lut[:entries].astype(np.float64)
    index = np.clip(np.round(values) - first_mapped, 0, len(lut) - 1).astype(np.int64)
    top = float(2**bits - 1) if bits > 0 else float(lut.max() or 1.0)
    return np.clip(lut[index] / top, 0.0, 1.0).astype(np.float32)


def _as_list(value: object) -> list:
    if value is None:
        return []
    if isinstance(value, list | tuple) or hasattr(value, "__iter__") and not isinstance(value, str):
        return list(value)
    return [value]


pydicom.config.settings.reading_validation_mode = pydicom.config.WARN

"""Read any supported X-ray file into float32 grayscale pixels in [0, 1].

This is the only place that decodes pixels: the profile, the cache, the service and the DICOM
node all call :func:`read_image`, so the same file always gives the same array.

Formats are recognised by content, never by file extension: a JPEG named ``.png`` or a DICOM
without the Part-10 preamble is read correctly.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxr_platform.data.decoded import DEFAULT_MAX_PIXELS, DecodedImage, ImageSource
from cxr_platform.errors import (
    DicomWithoutPixelDataError,
    EmptyImageError,
    ImageReadError,
    ImageTooLargeError,
    MultiFrameDicomError,
    NonImageDicomError,
    TruncatedImageError,
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

_PIL_BIT_DEPTH = {
    "1": 1,
    "L": 8,
    "P": 8,
    "LA": 8,
    "PA": 8,
    "RGB": 8,
    "RGBA": 8,
    "CMYK": 8,
    "YCbCr": 8,
    "LAB": 8,
    "HSV": 8,
    "I;16": 16,
    "I;16L": 16,
    "I;16B": 16,
    "I;16N": 16,
    "I": 32,
    "F": 32,
}


def read_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    dicom_window_index: int = 0,
) -> DecodedImage:
    """Decode ``source`` (a path, bytes or a binary file object) to grayscale float32 in [0, 1].

    ``draft_size`` lets JPEG decoding scale down in the DCT domain when the caller only needs an
    image at least that large on its shorter side (the cache does); the reported width/height are
    always the original's. Raises a subclass of :class:`ImageReadError` with a reason otherwise.
    """
    label = str(source) if isinstance(source, str | Path) else None
    data = _read_bytes(source, label)
    if not data:
        raise EmptyImageError("file is empty (0 bytes)", source=label)
    if _looks_like_dicom(data):
        return _read_dicom(data, label, max_pixels, dicom_window_index)
    try:
        return _read_pillow(data, label, max_pixels, draft_size)
    except UnrecognizedImageFormatError:
        # Legacy DICOM files have no preamble and no "DICM" marker: try them before giving up.
        try:
            return _read_dicom(data, label, max_pixels, dicom_window_index, legacy=True)
        except UnrecognizedImageFormatError:
            raise UnrecognizedImageFormatError(
                "not a recognised image (expected PNG, JPEG, BMP, TIFF or DICOM)", source=label
            ) from None


def _read_bytes(source: ImageSource, label: str | None) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, str | Path):
        try:
            return Path(source).read_bytes()
        except OSError as exc:
            raise ImageReadError(f"cannot read file: {exc.strerror or exc}", source=label) from exc
    return source.read()


def _looks_like_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


# --------------------------------------------------------------------------------------------
# Pillow: PNG, JPEG, BMP, TIFF, ...
# --------------------------------------------------------------------------------------------


def _read_pillow(
    data: bytes, label: str | None, max_pixels: int, draft_size: int | None
) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            # Our own size limit below replaces Pillow's global bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnrecognizedImageFormatError(str(exc), source=label) from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"decompression bomb refused: {exc}", source=label) from exc
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise ImageReadError(f"invalid image header: {exc}", source=label) from exc

    with image:
        fmt = image.format or "UNKNOWN"
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
                source=label,
            )
        mode = image.mode
        if draft_size is not None and fmt == "JPEG":
            image.draft("L", (draft_size, draft_size))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
        except OSError as exc:
            message = str(exc)
            if "truncated" in message.lower() or "broken data stream" in message.lower():
                raise TruncatedImageError(f"truncated {fmt}: {message}", source=label) from exc
            raise ImageReadError(f"cannot decode {fmt}: {message}", source=label) from exc
        except Exception as exc:
            raise ImageReadError(f"cannot decode {fmt}: {exc}", source=label) from exc
        # Phones and some exporters store rotated pixels plus an EXIF orientation tag.
        image = ImageOps.exif_transpose(image)
        pixels = _pillow_to_gray_float(image)
    return DecodedImage(
        pixels=pixels,
        source_format=fmt,
        width=width,
        height=height,
        mode=mode,
        bit_depth=_PIL_BIT_DEPTH.get(mode, 8),
    )


def _pillow_to_gray_float(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return (np.asarray(image, dtype=np.float32) / 65535.0).clip(0.0, 1.0)
    if mode == "I":
        values = np.asarray(image, dtype=np.float32)
        # 16-bit PNGs open as mode "I" on older Pillow; scale by the 16-bit range when it fits.
        top = 65535.0 if values.max(initial=0) <= 65535 else float(values.max())
        return (values / top).clip(0.0, 1.0)
    if mode == "F":
        return _min_max(np.asarray(image, dtype=np.float32))
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode in ("LA", "PA", "RGBA"):
        # Transparent pixels carry no signal: composite onto black rather than dropping alpha.
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        gray = _luma(rgba[..., :3])
        return (gray * rgba[..., 3]).astype(np.float32)
    if mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return _luma(rgb)


def _luma(rgb: np.ndarray) -> np.ndarray:
    # ITU-R BT.601 weights, the same as Pillow's convert("L"), but without rounding to 8 bits.
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)


def _min_max(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32, copy=False)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def read_dicom_header(source: str | Path | bytes) -> Dataset:
    """The DICOM header without pixel data (for PatientID / SOPInstanceUID look-ups)."""
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return pydicom.dcmread(fileobj, stop_before_pixels=True, force=True)
    except Exception as exc:
        raise ImageReadError(f"unreadable DICOM header: {exc}") from exc


def _read_dicom(
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
        pixels = np.clip(_luma(stored[..., :3].astype(np.float32)) / top, 0.0, 1.0)
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
    return _min_max(values)


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


# Truncated files must fail loudly rather than decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False
pydicom.config.settings.reading_validation_mode = pydicom.config.WARN

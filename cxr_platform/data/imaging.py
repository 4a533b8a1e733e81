"""Read any supported X-ray file into float32 grayscale pixels in [0, 1].

This is the only place that decodes pixels: the profile, the cache, the service and the DICOM
node all call :func:`read_image`, so the same file always gives the same array. DICOM pixels are
decoded in :mod:`cxr_platform.data.dicom_pixels`, imported when the first DICOM file arrives, so
code that reads only PNG and JPEG (training on the accelerator machine) needs no pydicom.

Formats are recognised by content, never by file extension: a JPEG named ``.png`` or a DICOM
without the Part-10 preamble is read correctly.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cxr_platform.data.decoded import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageSource,
    luma,
    min_max_scale,
)
from cxr_platform.errors import (
    EmptyImageError,
    ImageReadError,
    ImageTooLargeError,
    TruncatedImageError,
    UnrecognizedImageFormatError,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

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
        bit_depth=bit_depth_of_mode(mode),
    )


def bit_depth_of_mode(mode: str) -> int:
    """Bits per sample of a Pillow mode, as the inference log records them."""
    return _PIL_BIT_DEPTH.get(mode, 8)


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
        return min_max_scale(np.asarray(image, dtype=np.float32))
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode in ("LA", "PA", "RGBA"):
        # Transparent pixels carry no signal: composite onto black rather than dropping alpha.
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        gray = luma(rgba[..., :3])
        return (gray * rgba[..., 3]).astype(np.float32)
    if mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return luma(rgb)


# --------------------------------------------------------------------------------------------
# DICOM: decoded in dicom_pixels, imported on first use
# --------------------------------------------------------------------------------------------


def _read_dicom(
    data: bytes,
    label: str | None,
    max_pixels: int,
    window_index: int,
    *,
    legacy: bool = False,
) -> DecodedImage:
    try:
        from cxr_platform.data import dicom_pixels
    except ImportError as exc:
        if legacy:  # not DICOM by its marker, and no DICOM reader here to try harder
            raise UnrecognizedImageFormatError(str(exc), source=label) from exc
        raise ImageReadError(f"cannot decode DICOM here: {exc}", source=label) from exc
    return dicom_pixels.read_dicom(data, label, max_pixels, window_index, legacy=legacy)


def read_dicom_header(source: str | Path | bytes) -> Dataset:
    """The DICOM header without pixel data (for PatientID / SOPInstanceUID look-ups)."""
    from cxr_platform.data.dicom_pixels import read_dicom_header as read_header

    return read_header(source)


# Truncated files must fail loudly rather than decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False

"""Pillow path of read_image: modes, orientation, truncation, bombs, format by content."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxr_platform.data.imaging import read_image
from cxr_platform.errors import (
    EmptyImageError,
    ImageTooLargeError,
    TruncatedImageError,
    UnrecognizedImageFormatError,
)


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _gradient(height: int = 40, width: int = 60) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width, dtype=np.float32), (height, 1)).astype(np.uint8)


def test_grayscale_png_maps_to_unit_range():
    decoded = read_image(_encode(Image.fromarray(_gradient()), "PNG"))
    assert decoded.pixels.dtype == np.float32
    assert decoded.pixels.shape == (40, 60)
    assert decoded.pixels.min() == 0.0 and decoded.pixels.max() == 1.0
    assert (decoded.source_format, decoded.mode, decoded.bit_depth) == ("PNG", "L", 8)


def test_rgb_rgba_palette_and_16bit_become_the_same_grayscale():
    gray = _gradient()
    expected = gray.astype(np.float32) / 255.0
    rgb = Image.fromarray(np.stack([gray] * 3, axis=-1))
    rgba = Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)]))
    palette = rgb.quantize(colors=256)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    for image, mode, tolerance in [
        (rgb, "RGB", 1e-5),
        (rgba, "RGBA", 1e-5),
        (palette, "P", 2 / 255),
        (sixteen, None, 1e-5),
    ]:
        decoded = read_image(_encode(image, "PNG"))
        if mode:
            assert decoded.mode == mode
        np.testing.assert_allclose(decoded.pixels, expected, atol=tolerance)
    assert read_image(_encode(sixteen, "PNG")).bit_depth == 16


def test_transparent_pixels_are_black():
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, :5, 3] = 255  # left half opaque, right half transparent
    decoded = read_image(_encode(Image.fromarray(rgba), "PNG"))
    assert decoded.pixels[:, :5].min() > 0.7
    assert decoded.pixels[:, 5:].max() == 0.0


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, :10] = 255  # bright band on the left of a landscape image
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    decoded = read_image(_encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.pixels.shape == (40, 20)  # portrait after transposition
    assert decoded.pixels[:10].mean() > 0.8  # the bright band is now on top


def test_truncated_png_and_jpeg_are_detected():
    image = Image.fromarray((np.random.default_rng(0).random((200, 200)) * 255).astype(np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = _encode(image, fmt)
        with pytest.raises(TruncatedImageError, match="truncated"):
            read_image(data[: len(data) // 2])


def test_empty_and_garbage_bytes_are_rejected_with_reasons():
    with pytest.raises(EmptyImageError) as empty:
        read_image(b"")
    assert empty.value.reason == "empty"
    with pytest.raises(UnrecognizedImageFormatError, match="PNG, JPEG"):
        read_image(b"this is not an image at all" * 10)


def test_decompression_bomb_is_refused_before_decoding():
    data = _encode(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(ImageTooLargeError, match="exceeds"):
        read_image(data, max_pixels=1_000_000)


def test_format_is_detected_from_content_not_extension(tmp_path):
    path = tmp_path / "really_a_jpeg.png"
    path.write_bytes(_encode(Image.fromarray(_gradient()), "JPEG", quality=95))
    decoded = read_image(path)
    assert decoded.source_format == "JPEG"
    assert decoded.width == 60 and decoded.height == 40

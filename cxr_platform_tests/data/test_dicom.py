"""DICOM path of read_image, on files built with pydicom."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    BasicTextSRStorage,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from cxr_platform.data.dicom_pixels import window_to_unit
from cxr_platform.data.imaging import read_image
from cxr_platform.errors import (
    DicomWithoutPixelDataError,
    MultiFrameDicomError,
    NonImageDicomError,
)
from cxr_platform_tests.data.dicom_factory import make_dicom, to_bytes

RAMP12 = np.tile(np.linspace(0, 4095, 64), (32, 1)).astype(np.uint16)


def test_monochrome2_16bit_full_range():
    decoded = read_image(to_bytes(make_dicom(RAMP12, bits_stored=12)))
    assert decoded.source_format == "DICOM" and decoded.bit_depth == 12
    assert decoded.pixels.min() == 0.0 and decoded.pixels.max() == 1.0
    assert np.all(np.diff(decoded.pixels[0]) >= 0)  # still increasing left to right


def test_monochrome1_is_inverted():
    m2 = read_image(to_bytes(make_dicom(RAMP12, bits_stored=12)))
    m1 = read_image(to_bytes(make_dicom(RAMP12, bits_stored=12, photometric="MONOCHROME1")))
    np.testing.assert_allclose(m1.pixels, 1.0 - m2.pixels, atol=1e-6)
    assert m1.photometric_interpretation == "MONOCHROME1"


def test_rescale_then_window_are_applied():
    # Stored 0..4095 with slope 2, intercept -1000 -> values -1000..7190.
    # Window centre 1000, width 2000 -> everything below 0 black, above 2000 white.
    ds = make_dicom(RAMP12, bits_stored=12, rescale=(2.0, -1000.0), window=(1000.0, 2000.0))
    decoded = read_image(to_bytes(ds))
    values = RAMP12.astype(np.float64) * 2 - 1000
    expected = np.clip((values - 999.5) / 1999.0 + 0.5, 0, 1)
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-5)
    assert (decoded.pixels[values <= 0] == 0).all() and (decoded.pixels[values >= 2000] == 1).all()


def test_first_window_is_the_default_and_index_selects_another():
    ds = make_dicom(RAMP12, bits_stored=12)
    ds.WindowCenter = [500, 3000]
    ds.WindowWidth = [1000, 2000]
    first = read_image(to_bytes(ds))
    second = read_image(to_bytes(ds), dicom_window_index=1)
    np.testing.assert_allclose(first.pixels, window_to_unit(RAMP12, 500, 1000), atol=1e-6)
    np.testing.assert_allclose(second.pixels, window_to_unit(RAMP12, 3000, 2000), atol=1e-6)


def test_sixteen_bit_signed_pixels():
    signed = (RAMP12.astype(np.int32) - 2048).astype(np.int16)
    decoded = read_image(to_bytes(make_dicom(signed, signed=True)))
    assert decoded.bit_depth == 16
    assert decoded.pixels.min() == 0.0 and decoded.pixels.max() == 1.0


def test_jpeg_baseline_compressed_dicom():
    gray = np.tile(np.linspace(0, 255, 64), (48, 1)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=95)
    ds = make_dicom(gray)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    decoded = read_image(to_bytes(ds))
    assert decoded.transfer_syntax == JPEGBaseline8Bit
    np.testing.assert_allclose(decoded.pixels, gray / 255.0, atol=0.03)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_lossless_compressed_dicom_round_trips(syntax):
    ds = make_dicom(RAMP12, bits_stored=12)
    ds.compress(syntax)  # encoders from pydicom / pylibjpeg-openjpeg / pyjpegls
    decoded = read_image(to_bytes(ds))
    reference = read_image(to_bytes(make_dicom(RAMP12, bits_stored=12)))
    assert decoded.transfer_syntax == syntax
    np.testing.assert_allclose(decoded.pixels, reference.pixels, atol=1e-6)


def test_legacy_file_without_part10_header():
    data = to_bytes(make_dicom(RAMP12, bits_stored=12), legacy=True)
    assert data[128:132] != b"DICM"
    decoded = read_image(data)
    assert decoded.source_format == "DICOM" and decoded.pixels.shape == (32, 64)


def test_zero_pixel_spacing_is_tolerated():
    ds = make_dicom(
        RAMP12, bits_stored=12, extra={"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0, 0]}
    )
    assert read_image(to_bytes(ds)).pixels.shape == (32, 64)


def test_dicom_without_pixel_data_is_rejected():
    ds = make_dicom(None)
    with pytest.raises(DicomWithoutPixelDataError, match="no pixel data"):
        read_image(to_bytes(ds))


def test_structured_report_is_rejected_as_non_image():
    ds = make_dicom(None, sop_class=BasicTextSRStorage)
    ds.Modality = "SR"
    with pytest.raises(NonImageDicomError, match="not an image"):
        read_image(to_bytes(ds))


def test_multi_frame_is_rejected():
    frames = np.stack([RAMP12, RAMP12])
    ds = make_dicom(frames, bits_stored=12, frames=2)
    with pytest.raises(MultiFrameDicomError, match="2 frames"):
        read_image(to_bytes(ds))


def test_sop_instance_uid_is_unique_per_file():
    assert make_dicom(RAMP12).SOPInstanceUID != make_dicom(RAMP12).SOPInstanceUID != generate_uid()


def test_rgb_secondary_capture_matches_the_same_png():
    from pydicom.uid import SecondaryCaptureImageStorage

    gray = np.tile(np.linspace(40, 200, 64), (16, 1)).astype(np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    ds = make_dicom(gray, sop_class=SecondaryCaptureImageStorage)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    decoded = read_image(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, gray / 255.0, atol=1e-5)  # not stretched to 0..1

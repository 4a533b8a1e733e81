"""Each simulated acquisition shift moves the model input the way its name says."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxr_platform.data.features import intensity_features
from cxr_platform.data.imaging import read_image
from cxr_platform.data.preprocessing import PreprocessingConfig, to_square_uint8
from cxr_platform.data.shifts import SHIFT_NAMES, UnknownShiftError, apply_shift, encode_png


@pytest.fixture(scope="module")
def xray(tiny_synthetic) -> np.ndarray:
    path = next((tiny_synthetic / "PNEUMONIA").glob("*.png"))
    return read_image(path).pixels


def _features(pixels: np.ndarray) -> dict[str, float]:
    return intensity_features(to_square_uint8(pixels, PreprocessingConfig()))


def test_each_shift_moves_its_feature(xray):
    rng = np.random.default_rng(0)
    base = _features(xray)
    shifted = {name: apply_shift(xray, name, rng=rng) for name in SHIFT_NAMES}
    assert np.array_equal(shifted["none"], np.clip(xray, 0, 1))
    assert _features(shifted["contrast"])["intensity_std"] < 0.6 * base["intensity_std"]
    assert _features(shifted["noise"])["sharpness"] > 2 * base["sharpness"]
    assert _features(shifted["blur"])["sharpness"] < 0.5 * base["sharpness"]
    assert _features(shifted["exposure"])["intensity_mean"] > base["intensity_mean"] + 0.1
    inverted = _features(shifted["invert"])["intensity_mean"]
    assert inverted == pytest.approx(1 - base["intensity_mean"], abs=0.01)
    small = shifted["resolution"]
    assert small.shape[0] * 5 < xray.shape[0] and small.shape[1] * 5 < xray.shape[1]
    for pixels in shifted.values():
        assert pixels.dtype == np.float32 and pixels.min() >= 0 and pixels.max() <= 1


def test_field_shifts_take_part_of_the_picture_away(xray):
    height, width = xray.shape
    for seed in range(8):
        cropped = apply_shift(xray, "crop", rng=np.random.default_rng(seed))
        kept = cropped.shape[0] * cropped.shape[1] / (height * width)
        assert kept == pytest.approx(0.55, abs=0.01)  # one side, 45% of it, gone
    shuttered = apply_shift(xray, "collimation", rng=np.random.default_rng(0))
    assert shuttered.shape == xray.shape
    assert (shuttered[0] == 1).all() and (shuttered[-1] == 1).all()
    assert (shuttered[:, 0] == 1).all() and (shuttered[:, -1] == 1).all()
    centre = (slice(height // 3, 2 * height // 3), slice(width // 3, 2 * width // 3))
    assert np.array_equal(shuttered[centre], np.clip(xray, 0, 1)[centre])
    white = (shuttered == 1).mean()
    assert 0.5 < white < 0.85  # 15-30% from each of four sides
    mild = apply_shift(xray, "collimation", severity=0.3, rng=np.random.default_rng(0))
    assert (mild == 1).mean() < white / 2


def test_severity_scales_the_shift(xray):
    rng = np.random.default_rng(0)
    mild = _features(apply_shift(xray, "contrast", severity=0.25, rng=rng))["intensity_std"]
    strong = _features(apply_shift(xray, "contrast", severity=1.0, rng=rng))["intensity_std"]
    assert strong < mild < _features(xray)["intensity_std"]


def test_bad_shift_arguments_are_refused(xray):
    rng = np.random.default_rng(0)
    with pytest.raises(UnknownShiftError, match="unknown shift 'fog'"):
        apply_shift(xray, "fog", rng=rng)
    with pytest.raises(UnknownShiftError, match="severity"):
        apply_shift(xray, "noise", severity=0.0, rng=rng)


def test_encoded_png_round_trips(xray, tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(xray))
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (xray.shape[1], xray.shape[0])
    assert np.abs(read_image(path).pixels - xray).max() <= 0.5 / 255 + 1e-6

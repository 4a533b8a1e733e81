from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cxr_platform.data import pipeline
from cxr_platform.data.cache import CacheInputChangedError, build_cache
from cxr_platform.data.imaging import read_image
from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8, preprocess
from cxr_platform.data.sources import discover_images
from cxr_platform.data.transforms import (
    NO_AUGMENTATION,
    AugmentationConfig,
    TensorBatches,
    affine_matrices,
    augment,
    balanced_indices,
    gaussian_blur,
)
from cxr_platform.settings import load_settings


@pytest.fixture()
def manifest(tiny_synthetic, tmp_path):
    settings = load_settings(home=tmp_path / "home", data_dir=tiny_synthetic, workers=1)
    profiled = pipeline.profile(discover_images(tiny_synthetic), settings.data, progress=False)
    manifest, _ = pipeline.split(profiled, ratios=(0.7, 0.15, 0.15), seed=1)
    return manifest


def test_cache_matches_preprocess_and_is_reused(manifest, tmp_path):
    config = PreprocessingConfig(image_size=64)
    cache = build_cache(manifest, tmp_path / "cache", config, progress=False)
    train = cache.images("train")
    assert train.dtype == np.uint8 and train.shape[1:] == (64, 64)
    assert isinstance(train, np.memmap)
    first = cache.index("train").iloc[0]
    np.testing.assert_array_equal(train[0], preprocess(first["path"], config))
    assert not any(s.reused for s in cache.splits.values())

    again = build_cache(manifest, tmp_path / "cache", config, progress=False)
    assert all(s.reused for s in again.splits.values())
    assert again.splits["train"].images_path == cache.splits["train"].images_path


def test_changed_split_reuses_rows_without_decoding(manifest, tmp_path, monkeypatch):
    config = PreprocessingConfig(image_size=32)
    build_cache(manifest, tmp_path / "cache", config, progress=False)
    # Move one validation image into train: both splits get new keys, but every row exists.
    moved = manifest.copy()
    moved.loc[moved.index[moved["split"] == "val"][0], "split"] = "train"
    import cxr_platform.data.cache as cache_module

    monkeypatch.setattr(
        cache_module,
        "_decode_verified",
        lambda *a, **k: pytest.fail("decoded an image that was already cached"),
    )
    rebuilt = build_cache(moved, tmp_path / "cache", config, progress=False)
    assert not rebuilt.splits["train"].reused
    assert len(rebuilt.images("train")) == (moved["split"] == "train").sum()


def test_cache_refuses_a_file_changed_after_profiling(manifest, tmp_path):
    changed = manifest.copy()
    changed.loc[0, "content_hash"] = "0" * 64
    with pytest.raises(CacheInputChangedError, match="changed after it was profiled"):
        build_cache(
            changed, tmp_path / "cache2", PreprocessingConfig(image_size=32), progress=False
        )


def test_letterbox_keeps_aspect():
    wide = np.ones((10, 40), dtype=np.float32)
    square = preprocess_from_pixels(
        wide, PreprocessingConfig(image_size=40, resize_mode="letterbox")
    )
    assert square[:10].max() == 0 and square[20].min() == 255


def preprocess_from_pixels(pixels, config):
    from cxr_platform.data.preprocessing import to_square_uint8

    return to_square_uint8(pixels, config)


def test_batches_normalize_augment_and_balance(manifest, tmp_path):
    config = PreprocessingConfig(image_size=64)
    cache = build_cache(manifest, tmp_path / "cache", config, progress=False)
    val = TensorBatches.from_cache(cache, "val")
    images, labels = next(val.evaluation_batches(4))
    assert images.shape == (4, 1, 64, 64) and images.dtype == torch.float32
    expected = normalize_uint8(cache.images("val")[:4], config)  # the serving formula
    np.testing.assert_allclose(images[:, 0].numpy(), expected, atol=1e-6)
    assert set(labels.tolist()) <= {0.0, 1.0}

    train = TensorBatches.from_cache(cache, "train")
    augmentation = AugmentationConfig()
    epoch_a = list(train.training_epoch(8, augmentation=augmentation, seed=0))
    epoch_b = list(train.training_epoch(8, augmentation=augmentation, seed=0))
    epoch_c = list(train.training_epoch(8, augmentation=augmentation, seed=1))
    assert sum(len(batch) for batch, _ in epoch_a) == len(train)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(epoch_a, epoch_b, strict=True))
    assert not torch.equal(epoch_a[0][0], epoch_c[0][0])

    labels_np = cache.labels("train")
    drawn = balanced_indices(labels_np, torch.Generator().manual_seed(0)).numpy()
    positive_share = labels_np[drawn].mean()
    assert 0.35 < positive_share < 0.65  # balanced, although the data is ~74% positive


def test_identity_augmentation_is_the_identity():
    images = torch.rand(3, 1, 32, 32)
    generator = torch.Generator().manual_seed(0)
    matrices = affine_matrices(3, NO_AUGMENTATION, generator, torch.device("cpu"))
    torch.testing.assert_close(matrices, torch.eye(2, 3).expand(3, 2, 3))
    torch.testing.assert_close(
        augment(images, NO_AUGMENTATION, generator), images, atol=1e-5, rtol=0
    )


def test_augmentation_draws_per_sample_parameters_within_bounds():
    config = AugmentationConfig(brightness=0.0, contrast=0.0)
    generator = torch.Generator().manual_seed(0)
    matrices = affine_matrices(4000, config, generator, torch.device("cpu"))
    linear = matrices[:, :, :2]
    # Columns are rotation x half-extent: their norms give the crop's half-width and half-height.
    half_w, half_h = linear[:, :, 0].norm(dim=1), linear[:, :, 1].norm(dim=1)
    area = half_w * half_h  # share of the image area; below 0.8 only where an edge clipped
    assert area.min() >= 0.6 and area.max() <= 1.0 + 1e-5 and area.median() > 0.85
    determinant = torch.linalg.det(linear)
    flipped = (determinant < 0).float().mean()
    assert 0.45 < flipped < 0.55  # horizontal flips in about half the samples
    rotation = torch.rad2deg(torch.atan2(-linear[:, 0, 1], linear[:, 1, 1]))
    assert rotation.abs().max() <= 15.0 + 1e-3 and rotation.abs().max() > 12.0
    # Crops stay inside the image: centre +- half-extent within [-1, 1] (before rotation).
    assert (matrices[:, 0, 2].abs() <= 1 - half_w + 1e-5).all()
    assert (matrices[:, 1, 2].abs() <= 1 - half_h + 1e-5).all()
    # Brightness and contrast keep pixels in [0, 1].
    out = augment(torch.rand(64, 1, 16, 16), AugmentationConfig(), generator)
    assert out.min() >= 0 and out.max() <= 1


def test_jpeg_draft_decoding_matches_full_decoding(tiny_synthetic):
    """The cache decodes JPEGs in DCT-draft mode; it must give (almost) the full-decode result."""
    from cxr_platform.data.preprocessing import to_square_uint8

    jpeg = next(tiny_synthetic.rglob("*.jpeg"), None)
    if jpeg is None:
        pytest.skip("no JPEG in this synthetic sample")
    config = PreprocessingConfig(image_size=64)
    drafted = preprocess(jpeg, config).astype(np.int16)
    full = to_square_uint8(read_image(jpeg).pixels, config).astype(np.int16)
    assert drafted.shape == (64, 64)
    assert np.abs(drafted - full).mean() < 2.0  # grey levels out of 255


def test_batched_blur_matches_scipy_per_image_and_leaves_zero_sigma_alone():
    images = torch.rand(3, 1, 40, 48, dtype=torch.float64)
    sigmas = torch.tensor([1.2, 1e-6, 0.7], dtype=torch.float64)
    blurred = gaussian_blur(images, sigmas, max_sigma=1.2)
    # The batch shares one radius, ceil(3 x the largest sigma) = 4; replicated edges.
    for i in (0, 2):
        sigma = float(sigmas[i])
        expected = gaussian_filter(images[i, 0].numpy(), sigma, mode="nearest", truncate=4 / sigma)
        np.testing.assert_allclose(blurred[i, 0].numpy(), expected, atol=1e-9)
    torch.testing.assert_close(blurred[1], images[1])


def test_acquisition_augmentations_change_images_and_spare_other_draws():
    images = torch.rand(16, 1, 32, 32)
    plain = AugmentationConfig()
    acquisition = AugmentationConfig(gamma=1.4, blur_sigma=1.5, noise_std=0.03)
    out_plain = augment(images, plain, torch.Generator().manual_seed(3))
    out_acq = augment(images, acquisition, torch.Generator().manual_seed(3))
    assert out_acq.min() >= 0 and out_acq.max() <= 1
    assert (out_acq - out_plain).abs().mean() > 0.01

    # Blur lowers high-frequency energy: neighbouring pixels agree more than before.
    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean()

    blurred = augment(images, replace(NO_AUGMENTATION, blur_sigma=1.5), torch.Generator())
    assert roughness(blurred) < 0.8 * roughness(images)
    # Enabled or not, the acquisition steps leave the geometric draws where they were.
    generator_a, generator_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(
        affine_matrices(8, plain, generator_a, torch.device("cpu")),
        affine_matrices(8, acquisition, generator_b, torch.device("cpu")),
    )

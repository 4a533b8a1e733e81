from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_platform.data import pipeline
from cxr_platform.data.cache import CacheInputChangedError, build_cache
from cxr_platform.data.imaging import read_image
from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8, preprocess
from cxr_platform.data.sources import discover_images
from cxr_platform.data.transforms import (
    AugmentationConfig,
    build_dataloader,
    class_balanced_sampler,
)
from cxr_platform.settings import load_settings


@pytest.fixture()
def manifest(tiny_synthetic, tmp_path):
    settings = load_settings(home=tmp_path / "home", data_dir=tiny_synthetic, workers=1)
    profiled = pipeline.profile(discover_images(tiny_synthetic), settings, progress=False)
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


def test_loaders_normalize_augment_and_balance(manifest, tmp_path):
    config = PreprocessingConfig(image_size=64)
    cache = build_cache(manifest, tmp_path / "cache", config, progress=False)
    val = build_dataloader(cache, "val", preprocessing=config, batch_size=4)
    images, labels = next(iter(val))
    assert images.shape == (4, 1, 64, 64) and images.dtype == torch.float32
    expected = normalize_uint8(cache.images("val")[:4], config)
    np.testing.assert_allclose(images[:, 0].numpy(), expected, atol=1e-5)
    assert set(labels.tolist()) <= {0.0, 1.0}

    train = build_dataloader(
        cache,
        "train",
        preprocessing=config,
        batch_size=8,
        seed=0,
        augmentation=AugmentationConfig(),
    )
    batch_a, _ = next(iter(train))
    batch_b, _ = next(iter(train))
    assert not torch.equal(batch_a, batch_b)  # random augmentation and shuffling

    labels_np = cache.labels("train")
    drawn = np.array(list(iter(class_balanced_sampler(labels_np, seed=0))))
    positive_share = labels_np[drawn].mean()
    assert 0.35 < positive_share < 0.65  # balanced, although the data is ~74% positive


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

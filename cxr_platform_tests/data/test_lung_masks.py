"""Lung-field masks: found beside their images, aligned with them, on the model's square."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_platform.data.lung_masks import LungMaskError, build_mask_cache, mask_to_square
from cxr_platform.data.preprocessing import PreprocessingConfig, to_square_uint8
from cxr_platform.data.sources import discover_images
from cxr_platform.data.synthetic import LUNG_MASK_FOLDER


def test_the_synthetic_lung_fields_are_the_dark_fields_of_their_image(tiny_synthetic):
    """The generator's masks outline what it drew: inside them the film is darker than in a
    band around them, for every image (the check the shared masks' README makes)."""
    index = discover_images(tiny_synthetic).records
    for path, relative in zip(index["path"], index["relative_path"], strict=True):
        stem = relative.rsplit(".", 1)[0]
        mask = np.asarray(Image.open(tiny_synthetic / LUNG_MASK_FOLDER / f"{stem}.png")) > 127
        image = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        assert mask.shape == image.shape
        assert 0.08 < mask.mean() < 0.45, relative
        rows, columns = np.nonzero(mask)
        band = np.zeros_like(mask)
        band[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1] = True
        band &= ~mask
        assert image[mask].mean() < image[band].mean() - 10, relative


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
def test_a_mask_goes_where_its_image_goes(mode):
    """A bright rectangle and its mask, through the two resize modes: the mask covers the
    resized rectangle and nothing else (up to the one-pixel border of resampling)."""
    config = PreprocessingConfig(image_size=64, resize_mode=mode)
    pixels = np.zeros((300, 180), np.float32)
    pixels[60:200, 30:120] = 1.0
    square = to_square_uint8(pixels, config) > 127
    mask = mask_to_square(pixels > 0.5, config)
    assert mask.shape == (64, 64)
    disagree = (square ^ mask).sum()
    assert disagree <= 0.1 * mask.sum()
    assert (square & mask).sum() >= 0.9 * mask.sum()


def _index(root, names):
    return pd.DataFrame(
        {
            "path": [str(root / "images" / n) for n in names],
            "relative_path": list(names),
        }
    )


def _cache(tmp_path, names, masks_folder="masks"):
    return build_mask_cache(
        {"train": _index(tmp_path, names)},
        tmp_path / masks_folder,
        tmp_path / "cache",
        PreprocessingConfig(image_size=32),
        progress=False,
    )


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_masks_join_by_folder_and_stem_and_images_without_one_are_counted(tmp_path):
    for name in ("NORMAL/a.jpeg", "NORMAL/b.png", "PNEUMONIA/c.png"):
        _write(tmp_path / "images" / name, np.full((40, 50), 90, np.uint8))
    lungs = np.zeros((40, 50), np.uint8)
    lungs[10:30, 5:20] = 255
    _write(tmp_path / "masks" / "NORMAL" / "a.png", lungs)
    _write(tmp_path / "masks" / "PNEUMONIA" / "c.png", lungs)
    masks = _cache(tmp_path, ["NORMAL/a.jpeg", "NORMAL/b.png", "PNEUMONIA/c.png"])
    assert masks.coverage() == {"train": (2, 3)}
    assert masks.rows("train").tolist() == [0, 2]
    stored = masks.masks("train")
    assert stored.shape == (2, 32, 32) and stored.dtype == bool
    assert 0.1 < stored.mean() < 0.2  # 300 of 2000 pixels are lung


def test_a_mask_of_another_size_than_its_image_is_refused_by_name(tmp_path):
    _write(tmp_path / "images" / "NORMAL" / "a.png", np.zeros((40, 50), np.uint8))
    _write(tmp_path / "masks" / "NORMAL" / "a.png", np.zeros((50, 40), np.uint8))
    with pytest.raises(LungMaskError, match=r"a\.png: mask is 40x50 but its image is 50x40"):
        _cache(tmp_path, ["NORMAL/a.png"])


def test_a_folder_that_holds_no_mask_of_these_images_is_an_error(tmp_path):
    _write(tmp_path / "images" / "NORMAL" / "a.png", np.zeros((40, 50), np.uint8))
    (tmp_path / "masks").mkdir()
    with pytest.raises(LungMaskError, match="no image of the data folder has a mask"):
        _cache(tmp_path, ["NORMAL/a.png"])
    with pytest.raises(LungMaskError, match="does not exist"):
        _cache(tmp_path, ["NORMAL/a.png"], masks_folder="missing")


@pytest.mark.real_data
def test_the_shared_masks_join_the_shared_images(kaggle_dir, tmp_path):
    """Every shared mask finds its image and has its size (the README's 5,195)."""
    masks_root = kaggle_dir.parent / "kaggle-lung-masks-224"
    if not (masks_root / "train").is_dir():
        pytest.skip(f"shared lung masks not present at {masks_root}")
    index = discover_images(kaggle_dir).records
    normal = index[index["label"] == "NORMAL"].head(200).reset_index(drop=True)
    masks = build_mask_cache(
        {"train": normal}, masks_root, tmp_path, PreprocessingConfig(), progress=False
    )
    with_mask, total = masks.coverage()["train"]
    assert total == 200 and with_mask >= 195
    share = masks.masks("train").reshape(with_mask, -1).mean(1)
    assert 0.1 < np.median(share) < 0.45

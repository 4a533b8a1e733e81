"""The lung segmentation version: its metrics mean what the field means, it learns lungs, and
its checkpoint and report are what the platform reads back."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cxr_platform.data.lung_masks import build_mask_cache
from cxr_platform.data.preprocessing import PreprocessingConfig, preprocess
from cxr_platform.data.sources import discover_images
from cxr_platform.data.synthetic import LUNG_MASK_FOLDER
from cxr_platform.models.segmentation import (
    LUNG_GEOMETRY,
    SegmentationConfig,
    SegmentationError,
    dice_scores,
    evaluate_masks,
    hd95_pixels,
    lung_field_geometry,
    predict_lung_logits,
    train_segmenter,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _square(top: int, left: int, side: int = 20, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_dice_and_hd95_on_masks_with_known_answers():
    truth = np.stack([_square(10, 10), _square(10, 10), _square(10, 10), np.zeros((64, 64), bool)])
    predicted = np.stack(
        [
            _square(10, 10),  # the same
            _square(10, 14),  # moved 4 px sideways: overlap 16 of 20 columns
            np.zeros((64, 64), bool),  # nothing found
            np.zeros((64, 64), bool),  # nothing there, nothing found
        ]
    )
    dice = dice_scores(predicted, truth)
    assert dice[0] == pytest.approx(1.0)
    assert dice[1] == pytest.approx(2 * 16 * 20 / (2 * 400))
    assert dice[2] == pytest.approx(0.0)
    assert dice[3] == pytest.approx(1.0)
    hd95 = hd95_pixels(predicted, truth)
    assert hd95[0] == pytest.approx(0.0)
    assert hd95[1] == pytest.approx(4.0)
    assert hd95[2] == pytest.approx(math.hypot(64, 64))  # the worst, not NaN
    assert hd95[3] == pytest.approx(0.0)


def test_summaries_resample_patients_and_split_by_class():
    truth = np.stack([_square(10, 10)] * 6)
    predicted = np.stack([_square(10, 10 + k) for k in range(6)])
    index = pd.DataFrame(
        {
            "relative_path": [f"{c}/p{k}.png" for k, c in enumerate("NNNPPP")],
            "patient_id": ["a", "a", "b", "c", "c", "d"],
            "label": ["NORMAL"] * 3 + ["PNEUMONIA"] * 3,
        }
    )
    report = evaluate_masks(predicted, truth, index, n_bootstrap=200)
    assert report.summary["images"] == 6 and report.summary["patients"] == 4
    low, high = report.summary["dice_mean_ci"]
    assert low <= report.summary["dice_mean"] <= high
    assert set(report.by_group["label"]) == {"NORMAL", "PNEUMONIA"}
    # The worst is the prediction moved furthest.
    assert report.worst(1)["relative_path"].item() == "P/p5.png"
    with pytest.raises(SegmentationError, match="one row per image"):
        evaluate_masks(predicted[:5], truth, index)


def test_lung_geometry_of_two_drawn_fields():
    """Two fields, 40 rows by 20 and 10 columns, 20 columns apart, in a 100-pixel image."""
    masks = np.zeros((2, 100, 100), bool)
    masks[0, 30:70, 20:40] = True  # right lung
    masks[0, 30:70, 60:70] = True  # left lung, half as wide
    masks[0, 57:70, 60:65] = False  # its lower third cut: the mediastinum wider there
    shape = dict(zip(LUNG_GEOMETRY, lung_field_geometry(masks)[0], strict=True))
    assert shape["area"] == pytest.approx((800 + 400 - 65) / 10_000)
    assert shape["height"] == pytest.approx(0.40)
    assert shape["width"] == pytest.approx(0.50)
    assert shape["aspect"] == pytest.approx(0.80)
    assert (shape["top"], shape["bottom"]) == pytest.approx((0.30, 0.70))
    assert shape["centre_x"] == pytest.approx(0.45)
    assert shape["smaller_to_larger"] == pytest.approx(335 / 800)
    # Lower third (rows 56-69): columns 40-64 hold no lung in row 57 onwards, but 60-64 do in
    # row 56, so the gap is columns 40-59 of the span 20-69.
    assert shape["lower_gap"] == pytest.approx(20 / 50)
    assert not lung_field_geometry(masks)[1].any()  # no field found: zeros, not an error


def test_a_config_that_cannot_be_built_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        SegmentationConfig(working_size=100, channels=(8, 16, 32, 64))
    with pytest.raises(ValueError, match="two levels"):
        SegmentationConfig(channels=(8,))


@pytest.fixture(scope="module")
def synthetic_lungs(tiny_synthetic, tmp_path_factory):
    """The tiny synthetic set at 64 px with its lung masks, split by patient."""
    config = PreprocessingConfig(image_size=64)
    index = discover_images(tiny_synthetic).records
    patients = sorted(index["patient_id"].unique())
    held_out = set(patients[::5])
    index["split"] = ["test" if p in held_out else "train" for p in index["patient_id"]]
    parts = {s: index[index["split"] == s].reset_index(drop=True) for s in ("train", "test")}
    masks = build_mask_cache(
        parts,
        tiny_synthetic / LUNG_MASK_FOLDER,
        tmp_path_factory.mktemp("masks"),
        config,
        progress=False,
    )
    images = {s: np.stack([preprocess(p, config) for p in parts[s]["path"]]) for s in parts}
    return config, parts, images, masks


def test_the_unet_learns_lung_fields_and_keeps_its_best_epoch(synthetic_lungs):
    config, parts, images, masks = synthetic_lungs
    recipe = SegmentationConfig(
        working_size=32, channels=(8, 16, 32), epochs=8, batch_size=8, patience=8
    )
    seen = []
    result = train_segmenter(
        recipe,
        config,
        images["train"],
        masks.masks("train"),
        images["test"],
        masks.masks("test"),
        on_epoch=lambda epoch, improved: seen.append((epoch.epoch, improved)),
    )
    assert [epoch for epoch, _ in seen] == list(range(1, 9))
    best = max(result.history, key=lambda e: e.val_dice)
    assert result.best_epoch == best.epoch
    # The kept weights are the best epoch's: scoring them again gives its Dice.
    predicted = predict_lung_logits(result.model, images["test"], config) > 0
    again = dice_scores(predicted, np.asarray(masks.masks("test"))).mean()
    assert again == pytest.approx(best.val_dice, abs=1e-6)
    # Synthetic lungs are two ellipses: eight short epochs outline them well.
    assert again > 0.85
    # Predictions come back on the input's own square.
    assert predicted.shape == (len(images["test"]), 64, 64)


def test_too_few_images_to_train_is_a_clear_error(synthetic_lungs):
    config, _, images, masks = synthetic_lungs
    with pytest.raises(SegmentationError, match="fewer than one batch"):
        train_segmenter(
            SegmentationConfig(working_size=32, channels=(8, 16)),
            config,
            images["train"][:3],
            masks.masks("train")[:3],
            images["test"],
            masks.masks("test"),
        )

"""Grad-CAM: works on every architecture, localizes synthetic lesions, depends on the weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_platform.data.preprocessing import normalize_uint8
from cxr_platform.explain.checks import pointing_game, randomization_check
from cxr_platform.explain.gradcam import gradcam_heatmaps, gradcam_method, overlay
from cxr_platform.explain.report import explain_checkpoint, lesion_masks
from cxr_platform.model_version.lung_fields import relevance_inside
from cxr_platform.models.training import load_checkpoint, model_from_checkpoint, set_phase
from cxr_platform.models.zoo import ARCHITECTURES, build_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_heatmaps_for_every_architecture_even_with_a_frozen_backbone(arch):
    model = build_model(arch, pretrained="none").model
    set_phase(model, arch, "frozen")  # phase-1 models have no trainable backbone parameter
    images = torch.randn(3, 1, 64, 64)
    maps = gradcam_heatmaps(model, arch, images, batch_size=2)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    signed = gradcam_heatmaps(model, arch, images, relu=False)
    assert signed.min() >= -1 and np.abs(signed).max() == pytest.approx(1.0)


def test_overlay_keeps_the_xray_where_there_is_no_evidence():
    gray = np.tile(np.arange(64, dtype=np.uint8)[None] * 4, (32, 1))
    heatmap = np.zeros((8, 16), dtype=np.float32)
    untouched = overlay(gray, heatmap)
    assert untouched.shape == (32, 64, 3)
    assert (untouched == gray[..., None]).all()
    heatmap[2:4, 4:8] = 1.0
    marked = overlay(gray, heatmap)
    assert (marked != untouched).any(axis=2).sum() > 0
    with pytest.raises(ValueError):
        overlay(gray.astype(np.float32), heatmap)


def test_pointing_game_counts_hits_and_the_random_point_baseline():
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[:, 5:10, 5:10] = True  # 25 of 400 pixels
    heatmaps = np.zeros((3, 20, 20), dtype=np.float32)
    heatmaps[0, 7, 7] = 1.0  # inside
    heatmaps[1, 18, 18] = 1.0  # far outside
    # heatmaps[2] stays all zero: no maximum, a miss
    result = pointing_game(heatmaps, masks, tolerance_px=0)
    assert (result.n, result.hits) == (3, 1)
    assert result.random_point_hit_rate == pytest.approx(25 / 400)
    widened = pointing_game(heatmaps, masks, tolerance_px=2)
    # Euclidean: the 9x9 square loses the 3 pixels per corner farther than 2 px (sqrt 5, sqrt 8).
    assert widened.random_point_hit_rate == pytest.approx((9 * 9 - 4 * 3) / 400)
    with pytest.raises(ValueError):
        pointing_game(heatmaps, np.zeros_like(masks))


def _trained(trained_checkpoint):
    checkpoint = load_checkpoint(trained_checkpoint.path)
    return model_from_checkpoint(checkpoint), checkpoint.preprocessing_config


def test_relevance_inside_is_the_share_of_positive_mass_on_the_region():
    heatmaps = np.zeros((3, 8, 8), np.float32)
    heatmaps[0, :4] = 1.0  # half the rows
    heatmaps[1, :2] = 3.0
    heatmaps[1, 6:] = 1.0
    heatmaps[1, 4] = -5.0  # negative evidence is not relevance for pneumonia
    regions = np.zeros((3, 8, 8), bool)
    regions[:, :2] = True
    shares = relevance_inside(heatmaps, regions)
    assert shares[0] == pytest.approx(0.5)
    assert shares[1] == pytest.approx(48 / 64)
    assert np.isnan(shares[2])  # a map that points nowhere is neither inside nor outside
    with pytest.raises(ValueError, match="differ in shape"):
        relevance_inside(heatmaps, regions[:, :4])


def test_gradcam_points_at_synthetic_lesions_better_than_a_random_point(
    trained_checkpoint, learnable_cache
):
    model, preprocessing = _trained(trained_checkpoint)
    rows, masks = lesion_masks(learnable_cache.index("test"), preprocessing)
    assert len(rows) >= 30
    images = learnable_cache.images("test", mmap=False)[rows]
    normalized = torch.from_numpy(normalize_uint8(images, preprocessing))[:, None]
    result = pointing_game(gradcam_heatmaps(model, "baseline_cnn", normalized), masks)
    assert result.hit_rate > result.random_point_hit_rate, result
    assert result.p_value < 0.05, result.to_dict()


def test_randomization_check_passes_gradcam_and_flags_a_method_that_ignores_the_weights(
    trained_checkpoint, learnable_cache
):
    model, preprocessing = _trained(trained_checkpoint)
    images = learnable_cache.images("test", mmap=False)[:12]
    normalized = torch.from_numpy(normalize_uint8(images, preprocessing))[:, None]

    gradcam = randomization_check(gradcam_method("baseline_cnn", relu=False), model, normalized)
    assert gradcam.passed, gradcam.to_dict()

    def brightness(_model, batch):  # "explains" the image, whatever the weights
        maps = batch[:, 0].numpy()
        return (maps - maps.min()) / (maps.max() - maps.min())

    blind = randomization_check(brightness, model, normalized)
    assert not blind.passed
    assert blind.mean_abs_rank_correlation > 0.99


def test_explain_checkpoint_writes_the_gallery_and_the_checks(
    trained_checkpoint, learnable_cache, tmp_path
):
    report = explain_checkpoint(
        trained_checkpoint.path,
        trained_checkpoint.operating_point,
        learnable_cache,
        tmp_path,
        per_group=3,
    )
    gallery = Image.open(report.gallery)
    assert gallery.format == "PNG" and gallery.size[0] > 300
    written = json.loads((tmp_path / "explanations.json").read_text())
    assert written["pointing_game"]["hit_rate"] == report.pointing_game.hit_rate
    assert written["randomization"]["passed"] == report.randomization.passed
    groups = {case["group"] for case in report.gallery_cases}
    assert "true positive" in groups
    for case in report.gallery_cases:
        positive = case["label"] == "PNEUMONIA"
        assert case["group"].endswith("positive") == (positive == case["group"].startswith("true"))

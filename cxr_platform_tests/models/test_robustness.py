"""Shifted held-out scoring: the shifts really happen, and the scores match the evaluation's."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_platform.data.transforms import TensorBatches
from cxr_platform.models.evaluation import evaluate_split
from cxr_platform.models.robustness import (
    ROBUSTNESS_SHIFTS,
    robustness_scores,
    score_split,
    shifted_split,
)
from cxr_platform.models.training import load_checkpoint, predict_logits, scoring_model


@pytest.fixture(scope="module")
def scored(trained_checkpoint, learnable_cache):
    checkpoint = load_checkpoint(trained_checkpoint.path)
    return (
        scoring_model(checkpoint),
        learnable_cache.images("test", mmap=False),
        learnable_cache.labels("test"),
        checkpoint.preprocessing_config,
        trained_checkpoint.operating_point,
    )


@pytest.mark.parametrize("shift", sorted(ROBUSTNESS_SHIFTS))
def test_every_shift_changes_the_images_and_keeps_the_model_input_shape(scored, shift):
    images = scored[1][:6]
    shifted = shifted_split(images, shift, ROBUSTNESS_SHIFTS[shift])
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    assert np.abs(shifted.astype(int) - images).mean() > 1.0


def test_contrast_shift_shrinks_the_spread_by_its_documented_factor(scored):
    images = scored[1][:6]
    shifted = shifted_split(images, "contrast", 0.5)
    ratio = shifted.astype(float).std(axis=(1, 2)) / images.astype(float).std(axis=(1, 2))
    assert np.allclose(ratio, 1 - 0.6 * 0.5, atol=0.02)


def test_clean_scores_agree_with_the_evaluation_report(scored, learnable_cache):
    model, images, labels, preprocessing, operating_point = scored
    auc, sensitivity, specificity = score_split(
        model, images, labels, preprocessing, operating_point
    )
    logits = predict_logits(model, TensorBatches.from_cache(learnable_cache, "test"))
    reference = evaluate_split("test", labels, logits, operating_point, n_bootstrap=10)
    assert auc == pytest.approx(reference.auc)
    assert sensitivity == pytest.approx(reference.sensitivity)
    assert specificity == pytest.approx(reference.specificity)


def test_robustness_scores_cover_each_shift_and_move_with_it(scored):
    model, images, labels, preprocessing, operating_point = scored
    clean_auc = score_split(model, images, labels, preprocessing, operating_point)[0]
    scores = robustness_scores(model, images, labels, preprocessing, operating_point)
    assert [s.shift for s in scores] == list(ROBUSTNESS_SHIFTS)
    assert all(0.0 <= s.sensitivity <= 1.0 and 0.0 <= s.specificity <= 1.0 for s in scores)
    assert any(abs(s.auc - clean_auc) > 1e-3 for s in scores)

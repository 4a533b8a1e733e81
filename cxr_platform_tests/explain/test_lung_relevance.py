"""Where a classifier looks against the lung fields: the learnable set's trained baseline and a
U-Net trained on the same set's lung masks, on the test split both were judged on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_platform.data.transforms import TensorBatches
from cxr_platform.explain.gradcam import heatmaps_for_uint8
from cxr_platform.explain.lung_relevance import measure_lung_relevance
from cxr_platform.explain.report import GALLERY_PER_GROUP, select_gallery_cases
from cxr_platform.model_version.lung_fields import relevance_inside
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.segmentation import predict_lung_logits
from cxr_platform.models.training import predict_logits

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_the_share_of_relevance_in_the_lungs_on_every_test_image(
    trained_checkpoint, lung_fields_export, learnable_cache, tmp_path
):
    classifier = Checkpoint.load(trained_checkpoint.path)
    report = measure_lung_relevance(
        classifier,
        lung_fields_export.model,
        lung_fields_export.preprocessing,
        learnable_cache,
        tmp_path / "relevance",
        model_name="baseline",
        operating_point=trained_checkpoint.operating_point,
    )
    images = np.asarray(learnable_cache.images("test"))
    assert report.summary["images"] == len(images)
    assert set(report.by_class) == {"NORMAL", "PNEUMONIA"}

    # One image by hand: its Grad-CAM and its fields, as the report measured them.
    first = images[:1]
    heatmap = heatmaps_for_uint8(
        classifier.bare_model(), classifier.arch, first, classifier.preprocessing_config
    )
    fields = predict_lung_logits(lung_fields_export.model, first, lung_fields_export.preprocessing)
    expected = relevance_inside(heatmap, fields > 0)[0]
    assert report.per_image["relevance_in_lungs"].iloc[0] == pytest.approx(expected, abs=1e-5)

    shares = report.per_image["relevance_in_lungs"].dropna()
    assert ((shares >= 0) & (shares <= 1)).all()
    assert report.summary["mostly_outside"] == int((shares < 0.5).sum())
    assert report.summary["median"] == pytest.approx(float(np.median(shares)))
    saved = json.loads((tmp_path / "relevance" / "test.json").read_text())
    assert saved["summary"] == report.summary
    assert "| all (" in report.markdown()
    with Image.open(report.picture) as picture:
        assert picture.format == "PNG" and picture.width > 200

    # The Grad-CAM gallery's own cases (the same selection, at the evaluation's threshold), each
    # with the share the per-image table gives it.
    point = trained_checkpoint.operating_point
    batches = TensorBatches.from_cache(learnable_cache, "test")
    probabilities = point.probabilities(predict_logits(classifier.scoring_model(), batches))
    cases = select_gallery_cases(
        batches.labels_np, probabilities, point.threshold, GALLERY_PER_GROUP
    )
    names = [Path(str(p)).name for p in report.per_image["relative_path"]]
    assert [(c["group"], c["file"]) for c in report.gallery_cases] == [
        (group, names[int(i)]) for group, indices in cases.items() for i in indices
    ]
    share_of = dict(zip(names, report.per_image["relevance_in_lungs"], strict=True))
    for case in report.gallery_cases:
        expected_share = share_of[case["file"]]
        if np.isnan(expected_share):
            assert case["relevance_in_lungs"] is None
        else:
            assert case["relevance_in_lungs"] == pytest.approx(expected_share)
    assert saved["gallery_cases"] == report.gallery_cases
    assert "The Grad-CAM gallery's cases, on the lungs" in report.markdown()
    with Image.open(report.gallery) as gallery:
        assert gallery.format == "PNG" and gallery.width > 200


def test_maps_and_fields_from_different_squares_are_refused(
    trained_checkpoint, lung_fields_export, learnable_cache, tmp_path
):
    other = replace(lung_fields_export.preprocessing, resize_mode="letterbox")
    with pytest.raises(ValueError, match="would not line up"):
        measure_lung_relevance(
            Checkpoint.load(trained_checkpoint.path),
            lung_fields_export.model,
            other,
            learnable_cache,
            tmp_path,
            model_name="baseline",
        )

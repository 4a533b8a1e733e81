"""INT8 static quantization keeps the model's metadata and (nearly) its ranking."""

from __future__ import annotations

import pytest
from sklearn.metrics import roc_auc_score

from cxr_platform.deployment.quantize import quantize_int8
from cxr_platform.model_version.files import read_onnx_metadata
from cxr_platform.model_version.predictor import Predictor

from .conftest import export_untracked


def test_int8_model_serves_alone_with_nearly_the_same_predictions(
    trained_checkpoint, learnable_cache, tmp_path
):
    exported = export_untracked(trained_checkpoint, learnable_cache, tmp_path)
    int8_path = quantize_int8(
        exported.onnx_path, learnable_cache.images("val", mmap=False), tmp_path / "int8.onnx"
    )
    fp32_meta, int8_meta = read_onnx_metadata(exported.onnx_path), read_onnx_metadata(int8_path)
    assert (fp32_meta.precision, int8_meta.precision) == ("fp32", "int8")
    assert int8_meta.operating_point == fp32_meta.operating_point
    assert int8_path.stat().st_size < exported.onnx_path.stat().st_size / 2

    images = learnable_cache.images("test", mmap=False)
    labels = learnable_cache.labels("test")
    fp32 = Predictor(exported.onnx_path).predict_prepared(images)
    int8 = Predictor(int8_path).predict_prepared(images)
    auc32 = roc_auc_score(labels, [p.probability for p in fp32])
    auc8 = roc_auc_score(labels, [p.probability for p in int8])
    assert abs(auc32 - auc8) <= 0.02, (auc32, auc8)
    agreement = sum(a.label == b.label for a, b in zip(fp32, int8, strict=True)) / len(fp32)
    assert agreement >= 0.9


def test_the_int8_variant_ships_only_when_validation_auc_holds(
    trained_checkpoint, learnable_cache, tmp_path
):
    from cxr_platform.deployment.quantize import add_int8_variant
    from cxr_platform.model_version.files import ExportError

    exported = export_untracked(trained_checkpoint, learnable_cache, tmp_path)
    val_images, val_labels = (
        learnable_cache.images("val", mmap=False),
        learnable_cache.labels("val"),
    )
    kept = add_int8_variant(tmp_path, val_images, val_labels, max_auc_drop=0.02)
    assert kept.kept and (tmp_path / "model.int8.onnx").exists()
    assert Predictor(tmp_path, precision="int8").metadata.precision == "int8"
    assert Predictor(tmp_path).metadata.precision == "fp32"

    # An impossible bar (AUC must rise by 1): the variant is judged, then not shipped.
    refused = add_int8_variant(tmp_path, val_images, val_labels, max_auc_drop=-1.0)
    assert not refused.kept and not (tmp_path / "model.int8.onnx").exists()
    with pytest.raises(ExportError, match="no int8 model"):
        Predictor(exported.directory, precision="int8")

"""Exported files: parity with PyTorch, and a model file alone reproduces the predictions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8
from cxr_platform.deployment.export import (
    export_onnx,
    export_torchscript,
    load_torchscript,
    parity_check,
)
from cxr_platform.deployment.pipeline import export_trained, parity_inputs
from cxr_platform.model_version.files import ExportError, ModelMetadata, read_onnx_metadata
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.models.checkpoint import file_sha256
from cxr_platform.models.evaluation import EvaluationReport
from cxr_platform.models.pipeline import CheckpointChangedError, TrainedModel
from cxr_platform.models.training import load_checkpoint, model_from_checkpoint
from cxr_platform.models.zoo import ARCHITECTURES, build_model
from cxr_platform.settings import load_settings
from cxr_platform_tests.conftest import EvaluatedCheckpoint

from .conftest import export_untracked

OPERATING_POINT = OperatingPoint(0.4, 1.5, "sensitivity_target", 0.95, 0.95, 0.5, bias=-0.2)


def _metadata(arch: str, size: int) -> ModelMetadata:
    return ModelMetadata(
        model_name=f"{arch}-test",
        arch=arch,
        preprocessing=PreprocessingConfig(image_size=size).to_dict(),
        operating_point=OPERATING_POINT.to_dict(),
        mlflow_run_id="run-123",
        manifest_hash="abc",
        git_commit=None,
    )


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_onnx_and_torchscript_match_pytorch_for_every_architecture(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, pretrained="none").model.eval()
    metadata = _metadata(arch, 64)
    onnx_path = export_onnx(model, metadata, tmp_path / "m.onnx")
    script_path = export_torchscript(model, metadata, tmp_path / "m.pt")
    # A batch size the export never saw: the batch axis is dynamic.
    parity = parity_check(model, onnx_path, script_path, torch.randn(32, 1, 64, 64))
    assert parity.passed, parity.to_dict()
    assert read_onnx_metadata(onnx_path) == metadata
    assert load_torchscript(script_path)[1] == metadata


def test_a_model_file_alone_reproduces_the_platforms_predictions(
    trained_checkpoint, learnable_cache, tmp_path
):
    exported = export_untracked(trained_checkpoint, learnable_cache, tmp_path / "export")
    assert exported.parity.passed and exported.parity.n_images == 32

    # Reference: the checkpoint, its preprocessing and operating point, on cached pixels.
    checkpoint = load_checkpoint(trained_checkpoint.path)
    preprocessing = checkpoint.preprocessing_config
    operating_point = trained_checkpoint.operating_point
    images = learnable_cache.images("test", mmap=False)[:20]
    with torch.no_grad():
        logits = model_from_checkpoint(checkpoint)(
            torch.from_numpy(normalize_uint8(images, preprocessing))[:, None]
        )
    expected = operating_point.probabilities(logits.numpy().ravel())

    # ONNX file alone, from the original image files on disk.
    only_onnx = tmp_path / "elsewhere" / "model.onnx"
    only_onnx.parent.mkdir()
    only_onnx.write_bytes(exported.onnx_path.read_bytes())
    predictor = Predictor(only_onnx)
    paths = learnable_cache.index("test")["path"].tolist()[:20]
    predictions = [predictor.predict(path) for path in paths]
    assert np.allclose([p.probability for p in predictions], expected, atol=1e-5)
    assert all(
        p.label == ("PNEUMONIA" if p.probability >= operating_point.threshold else "NORMAL")
        for p in predictions
    )

    # TorchScript file alone: its metadata brings preprocessing and calibration with it.
    module, metadata = load_torchscript(exported.torchscript_path)
    config = metadata.preprocessing_config
    pixels = np.stack([predictor.prepare(path).pixels for path in paths])
    with torch.no_grad():
        scripted = module(torch.from_numpy(normalize_uint8(pixels, config))[:, None])
    assert np.allclose(
        metadata.calibration.probabilities(scripted.numpy().ravel()), expected, atol=1e-5
    )


def test_parity_check_catches_an_exported_model_that_drifted(
    trained_checkpoint, learnable_cache, tmp_path
):
    exported = export_untracked(trained_checkpoint, learnable_cache, tmp_path)
    proto = onnx.load(str(exported.onnx_path))
    largest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(largest).copy()
    weights *= 1.01  # a 1% error, e.g. a wrong weight conversion
    largest.CopyFrom(numpy_helper.from_array(weights, largest.name))
    onnx.save(proto, str(exported.onnx_path))
    model = model_from_checkpoint(load_checkpoint(trained_checkpoint.path))
    parity = parity_check(
        model, exported.onnx_path, exported.torchscript_path, parity_inputs(learnable_cache)
    )
    assert not parity.passed
    assert parity.torchscript_max_abs_diff <= 1e-4 < parity.onnx_max_abs_diff


def test_files_without_platform_metadata_are_refused(tmp_path):
    model = build_model("baseline_cnn", pretrained="none").model.eval()
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 64, 64),), str(plain), dynamo=True)
    with pytest.raises(ExportError, match="cxr_metadata"):
        Predictor(plain)
    not_onnx = tmp_path / "junk.onnx"
    not_onnx.write_bytes(b"not a model")
    with pytest.raises(ExportError):
        read_onnx_metadata(not_onnx)


def _trained_model(checkpoint: Path) -> TrainedModel:
    return TrainedModel(
        model_name="baseline_cnn",
        arch="baseline_cnn",
        checkpoint=checkpoint,
        mlflow_run_id="run-1",
        profile="demo",
        best_epoch=1,
        best_val_auc=0.8,
        epochs_run=1,
        stopped_early=False,
        pretrained=False,
        weights_source=None,
        device="cpu",
        wall_seconds=1.0,
        train_images_per_s=1.0,
        manifest_hash="m",
        checkpoint_sha256=file_sha256(checkpoint),
    )


def _report_about(checkpoint: EvaluatedCheckpoint) -> EvaluationReport:
    return EvaluationReport(
        arch="baseline_cnn",
        model_name="baseline_cnn",
        operating_point=checkpoint.operating_point,
        splits={},
        checkpoint_sha256=file_sha256(checkpoint.path),
    )


def test_export_takes_the_operating_point_of_a_report_about_this_very_checkpoint(
    trained_checkpoint, untrained_checkpoint, learnable_cache, tmp_path
):
    registry = load_settings(home=tmp_path / "home").registry
    copy = tmp_path / "run" / "best.pt"
    copy.parent.mkdir()
    shutil.copyfile(trained_checkpoint.path, copy)
    trained = _trained_model(copy)
    with pytest.raises(ExportError, match="another checkpoint"):
        export_trained(registry, learnable_cache, trained, _report_about(untrained_checkpoint))

    exported = export_trained(registry, learnable_cache, trained, _report_about(trained_checkpoint))
    assert exported.metadata.operating_point == trained_checkpoint.operating_point.to_dict()
    assert file_sha256(copy) == trained.checkpoint_sha256  # read, never rewritten

    # A checkpoint altered after training is refused, not exported under the old report.
    payload = torch.load(copy, weights_only=True)
    payload["epoch"] += 1
    torch.save(payload, copy)
    with pytest.raises(CheckpointChangedError, match="changed after training"):
        export_trained(registry, learnable_cache, trained, _report_about(trained_checkpoint))

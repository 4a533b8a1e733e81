"""The segmentation group in a real Dagster instance: masks joined to the classifier's own
patient split, a tracked U-Net, its report and its Dice floor; skipped, not failed, without
masks."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cxr_platform.data.splits import manifest_hash
from cxr_platform.data.synthetic import LUNG_MASK_FOLDER
from cxr_platform.defs.definitions import TRAINING_JOB, build_definitions
from cxr_platform.deployment.registry import lung_registry_for
from cxr_platform.model_version.lung_fields import segmenter_metadata
from cxr_platform.settings import load_settings

pytestmark = pytest.mark.usefixtures("single_torch_thread")

UP_TO_SEGMENTATION = [
    dg.AssetKey(name)
    for name in (
        "source_images",
        "data_profile",
        "patient_splits",
        "preprocessed_cache",
        "lung_field_masks",
        "lung_segmenter",
        "lung_segmentation_evaluation",
        "lung_segmenter_onnx",
        "lung_fields_version",
    )
]


def _settings(data_dir, home, **overrides):
    return load_settings(
        home=home,
        data_dir=data_dir,
        image_size=64,
        workers=1,
        training_profile="demo",
        device="cpu",
        **overrides,
    )


def _run(settings):
    job = build_definitions(settings).resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        asset_selection=UP_TO_SEGMENTATION,
        raise_on_error=False,
    )


def _metadata(result, name):
    event = next(
        e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == name
    )
    return event.materialization.metadata


def test_masks_train_and_evaluate_a_segmentation_version_on_the_patient_split(
    tiny_synthetic, tmp_path
):
    settings = _settings(
        tiny_synthetic,
        tmp_path / "home",
        lung_mask_dir=tiny_synthetic / LUNG_MASK_FOLDER,
        lung_segmentation_epochs=2,
        min_test_dice=0.0,
    )
    result = _run(settings)
    assert result.success
    coverage = _metadata(result, "lung_field_masks")
    assert coverage["images_without_mask"].value == 0

    manifest = result.output_for_node("patient_splits")
    trained = result.output_for_node("lung_segmenter")
    assert trained.epochs_run == 2 and len(trained.history) == 2
    split_of = dict(zip(manifest["relative_path"], manifest["split"], strict=True))
    n_train = sum(split == "train" for split in split_of.values())
    assert trained.train_images == n_train

    # Judged only on the test split's patients, which training never saw.
    report = json.loads(
        (
            settings.training.reports_dir / "segmentation" / trained.mlflow_run_id / "test.json"
        ).read_text()
    )
    judged = pd.DataFrame(report["per_image"])
    assert {split_of[path] for path in judged["relative_path"]} == {"test"}
    train_patients = set(manifest.loc[manifest["split"] == "train", "patient_id"])
    assert not set(judged["patient_id"]) & train_patients

    metadata = _metadata(result, "lung_segmentation_evaluation")
    assert "data:image/png;base64," in metadata["worst_cases"].value
    assert "Dice" in metadata["report"].value
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["dice_floor"] is True

    run = MlflowClient(settings.training.tracking_uri).get_run(trained.mlflow_run_id)
    assert run.data.tags["cxr.kind"] == "lung_segmentation"
    assert run.data.tags["dagster.run_id"] == result.run_id
    assert run.data.metrics["test_dice_mean"] == report["summary"]["dice_mean"]

    # The export draws the same lung fields as PyTorch and says what it is.
    exported = result.output_for_node("lung_segmenter_onnx")
    assert exported["parity"]["passed"] is True
    carried = segmenter_metadata(exported["onnx"])
    assert carried["mlflow_run_id"] == trained.mlflow_run_id
    assert carried["test_dice_mean"] == report["summary"]["dice_mean"]
    assert carried["preprocessing"]["image_size"] == 64

    # Written once: materialized again for the same checkpoint, the export is left as it was.
    before = Path(exported["onnx"]).stat()
    again = (
        build_definitions(settings)
        .resolve_implicit_global_asset_job_def()
        .execute_in_process(
            instance=dg.DagsterInstance.ephemeral(),
            asset_selection=[dg.AssetKey("lung_segmenter_onnx")],
        )
    )
    assert again.output_for_node("lung_segmenter_onnx")["onnx"] == exported["onnx"]
    after = Path(exported["onnx"]).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # Registered as its own model, judged by the same floor, promoted, with its card.
    registered = _metadata(result, "lung_fields_version")
    assert registered["registered_model"].value == "cxr-lung-fields"
    assert registered["aliases"].value == "production"
    card = registered["model_card"].value
    assert f"`{tiny_synthetic.name}` with the lung-field masks of `{LUNG_MASK_FOLDER}`" in card
    assert f"**Dice {report['summary']['dice_mean']:.4f}**" in card
    version = lung_registry_for(settings.registry).get("production")
    assert version.run_id == trained.mlflow_run_id
    assert version.release.data_version == manifest_hash(manifest)


def test_a_version_under_the_dice_floor_fails_its_check(tiny_synthetic, tmp_path):
    settings = _settings(
        tiny_synthetic,
        tmp_path / "home",
        lung_mask_dir=tiny_synthetic / LUNG_MASK_FOLDER,
        lung_segmentation_epochs=1,
        min_test_dice=1.0,
    )
    result = _run(settings)
    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["dice_floor"].passed is False
    assert "against the floor 1.00" in checks["dice_floor"].description
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "lung_segmenter_onnx" not in materialized  # nothing under the floor is exported


def test_without_masks_the_group_is_skipped_and_the_training_job_still_succeeds(
    tiny_synthetic, tmp_path
):
    """Real data without CXR_LUNG_MASK_DIR: no masks, no segmentation version, no failure."""
    settings = _settings(
        tiny_synthetic,
        tmp_path / "home",
        models=("baseline_cnn",),
        min_test_auc=0.0,
        min_test_sensitivity=0.0,
    )
    job = build_definitions(settings).resolve_job_def(TRAINING_JOB)
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "baseline_cnn/trained_model" in materialized
    assert not {"lung_field_masks", "lung_segmenter"} & materialized

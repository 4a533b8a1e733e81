"""The training group in a real Dagster instance: lineage per model, UI metadata, floors."""

from __future__ import annotations

import dagster as dg
from mlflow.tracking import MlflowClient

from cxr_platform.defs.definitions import TRAINING_JOB, build_definitions
from cxr_platform.settings import load_settings


def _settings(data_dir, home, **overrides):
    """Small and CPU-only: 64 px images and the demo profile."""
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
    return (
        build_definitions(settings)
        .resolve_job_def(TRAINING_JOB)
        .execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    )


def test_training_job_trains_evaluates_and_compares(tiny_synthetic, tmp_path):
    settings = _settings(
        tiny_synthetic, tmp_path / "home", min_test_auc=0.0, min_test_sensitivity=0.0
    )
    result = _run(settings)
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {
        "baseline_cnn/trained_model",
        "baseline_cnn/evaluation_report",
        "resnet18/trained_model",
        "resnet18/evaluation_report",
        "model_comparison",
    } <= materialized
    checks = {
        (e.asset_key.to_user_string(), e.check_name): e.passed
        for e in result.get_asset_check_evaluations()
    }
    assert checks[("resnet18/evaluation_report", "test_auc_floor")] is True
    assert checks[("baseline_cnn/evaluation_report", "test_sensitivity_floor")] is True

    report_event = next(
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == "resnet18/evaluation_report"
    )
    metadata = report_event.materialization.metadata
    assert {"test_auc", "test_sensitivity", "test_specificity", "threshold", "plots"} <= set(
        metadata
    )
    assert "data:image/png;base64," in metadata["plots"].value

    trained = result.output_for_node("resnet18__trained_model")
    run = MlflowClient(settings.training.tracking_uri).get_run(trained.mlflow_run_id)
    assert run.data.tags["dagster.run_id"] == result.run_id
    comparison = result.output_for_node("model_comparison")
    assert set(comparison) == {"baseline_cnn", "resnet18"}
    assert (settings.training.reports_dir / "model_comparison.md").exists()


def test_a_failed_floor_blocks_what_depends_on_the_model(tiny_synthetic, tmp_path):
    settings = _settings(
        tiny_synthetic, tmp_path / "home", models=("baseline_cnn",), min_test_auc=1.0
    )
    result = _run(settings)
    assert not result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["test_auc_floor"] is False
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "baseline_cnn/evaluation_report" in materialized
    assert "model_comparison" not in materialized

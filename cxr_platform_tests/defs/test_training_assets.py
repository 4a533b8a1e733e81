"""The training group in a real Dagster instance: lineage per model, UI metadata, floors."""

from __future__ import annotations

from pathlib import Path

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


def test_the_training_asset_launches_cxr_train_in_two_processes_through_pipes(
    tiny_synthetic, tmp_path
):
    """training_launcher=subprocess: the asset runs `cxr train --nproc-per-node 2` as a Pipes
    process; its epochs reach the run log and its trained model the asset's output."""
    settings = _settings(
        tiny_synthetic,
        tmp_path / "home",
        models=("baseline_cnn",),
        min_test_auc=0.0,
        min_test_sensitivity=0.0,
        training_launcher="subprocess",
        training_nproc_per_node=2,
    )
    instance = dg.DagsterInstance.ephemeral()
    result = (
        build_definitions(settings)
        .resolve_job_def(TRAINING_JOB)
        .execute_in_process(instance=instance, raise_on_error=False)
    )
    assert result.success
    trained = result.asset_value(dg.AssetKey(["baseline_cnn", "trained_model"]))
    event = next(
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == "baseline_cnn/trained_model"
    )
    metadata = event.materialization.metadata
    assert metadata["world_size"].value == 2
    assert metadata["launcher"].value == "subprocess"
    assert metadata["mlflow_run"].value == trained.mlflow_run_id  # no MLflow UI: the id
    assert metadata["epochs_run"].value == len(trained.history) >= 1
    assert trained.checkpoint.exists()

    # The launched process logged each epoch through Pipes into this run's log.
    logged = [
        record.user_message
        for record in instance.all_logs(result.run_id)
        if record.user_message.startswith("baseline_cnn epoch ")
    ]
    assert len(logged) == trained.epochs_run, logged
    run = MlflowClient(settings.training.tracking_uri).get_run(trained.mlflow_run_id)
    assert run.data.tags["cxr.world_size"] == "2"
    assert run.data.tags["dagster.run_id"] == result.run_id
    # The evaluation downstream scored the checkpoint the launched process wrote.
    report = result.asset_value(dg.AssetKey(["baseline_cnn", "evaluation_report"]))
    assert report.checkpoint_sha256 == trained.checkpoint_sha256


def test_the_kubernetes_training_pod_is_a_valid_pod(tmp_path):
    """training_launcher=kubernetes is configured here, not run: the pod Dagster's Pipes client
    would submit validates against the Kubernetes API schema, keeps secrets out of its
    manifest and asks for one GPU per process."""
    import json
    import subprocess
    import sys

    import yaml
    from dagster_k8s.pipes import build_pod_body
    from kubernetes.client import ApiClient

    from cxr_platform.defs.training_launch import (
        IMAGE_CXR,
        pod_environment,
        train_arguments,
        training_pod_spec,
    )

    settings = load_settings(
        home="/var/lib/cxr",
        device="cuda",
        training_launcher="kubernetes",
        training_nproc_per_node=4,
        service_api_key="not-in-the-manifest",
    )
    arguments = train_arguments("resnet18", nproc_per_node=4, epochs=None, batch_size=None)
    body = build_pod_body(
        pod_name="cxr-train-test",
        image=settings.dagster.training_k8s_image,
        command=[*IMAGE_CXR, *arguments],
        env_vars=pod_environment(settings),
        base_pod_meta=None,
        base_pod_spec=training_pod_spec(settings),
    )
    manifest = ApiClient().sanitize_for_serialization(body)
    text = json.dumps(manifest)
    assert "not-in-the-manifest" not in text
    (container,) = manifest["spec"]["containers"]
    assert container["command"] == ["cxr", "train", "--arch", "resnet18", "--nproc-per-node", "4"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert manifest["spec"]["securityContext"] == {
        "fsGroup": 10001,
        "runAsNonRoot": True,
        "runAsUser": 10001,
    }  # the image's user can write the shared home
    assert {"name": "CXR_TRAINING_NPROC_PER_NODE", "value": "4"} in container["env"]
    assert manifest["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "cxr-home"
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", **manifest}))
    checked = subprocess.run(
        [
            *(str(Path(sys.executable).parent / "kubernetes-validate"), "--strict"),
            *("-k", "1.34.0", str(path)),
        ],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

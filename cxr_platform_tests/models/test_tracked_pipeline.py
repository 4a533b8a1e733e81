"""Training and evaluation as the platform runs them, checked in a real MLflow SQLite store."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from cxr_platform.models import pipeline as model_pipeline
from cxr_platform.models.checkpoint import file_sha256
from cxr_platform.models.evaluation import EvaluationReport
from cxr_platform.models.training import load_checkpoint
from cxr_platform.provenance import git_commit
from cxr_platform.settings import load_settings


@pytest.fixture()
def settings(tmp_path):
    return load_settings(home=tmp_path / "home", device="cpu")


def test_train_and_evaluate_record_everything_in_mlflow(settings, learnable_cache):
    config = model_pipeline.train_config_for(
        settings.training, "resnet18", profile="demo", pretrained="none", epochs=2
    )
    trained = model_pipeline.train_tracked(
        settings.training,
        learnable_cache,
        config,
        profile="demo",
        manifest_hash="m123",
        progress=False,
    )
    report, files = model_pipeline.evaluate_trained(
        settings.training, learnable_cache, trained, n_bootstrap=200
    )

    client = MlflowClient(tracking_uri=settings.training.tracking_uri)
    assert settings.training.tracking_uri.startswith("sqlite:///")
    run = client.get_run(trained.mlflow_run_id)
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert params["arch"] == "resnet18" and params["frozen_lr"] == "0.001"
    assert params["augmentation.rotation_degrees"] == "15.0"
    assert params["pretrained"] == "none" and params["pretrained_loaded"] == "false"
    assert tags["cxr.pretrained"] == "false"
    assert tags["cxr.split_manifest_hash"] == "m123"
    assert tags.get("mlflow.source.git.commit") == git_commit()
    history = client.get_metric_history(run.info.run_id, "val_auc")
    assert [m.step for m in history] == [1, 2]
    assert metrics["test_auc"] == pytest.approx(report.splits["test"].auc)
    assert metrics["threshold"] == pytest.approx(report.operating_point.threshold)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best.pt", "learning_curves.png", "preprocessing.json", "evaluation"} <= artifacts
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/roc.png", "evaluation/evaluation.json"} <= evaluation

    # The checkpoint is left as training wrote it; the report names it and is complete.
    assert file_sha256(trained.checkpoint) == trained.checkpoint_sha256 == report.checkpoint_sha256
    assert "operating_point" not in load_checkpoint(trained.checkpoint)
    assert EvaluationReport.read_json(files["json"]).to_dict() == report.to_dict()
    assert (
        model_pipeline.latest_evaluation(settings.training, trained).to_dict() == report.to_dict()
    )
    for name in ("json", "markdown", "roc", "confusion", "reliability", "learning_curves"):
        assert files[name].stat().st_size > 0
    assert files["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads(files["json"].read_text())
    assert written["splits"]["test"]["n"] == len(learnable_cache.index("test"))
    assert model_pipeline.latest_trained(settings.training).mlflow_run_id == trained.mlflow_run_id


def test_resume_continues_the_same_mlflow_run(settings, learnable_cache):
    short = model_pipeline.train_config_for(
        settings.training, "baseline_cnn", profile="demo", epochs=1
    )
    first = model_pipeline.train_tracked(
        settings.training, learnable_cache, short, profile="demo", progress=False
    )
    longer = model_pipeline.train_config_for(
        settings.training, "baseline_cnn", profile="demo", epochs=2
    )
    with pytest.raises(Exception, match="Changing param values"):
        # A different epoch budget is a different experiment: MLflow refuses to rewrite it.
        model_pipeline.train_tracked(
            settings.training, learnable_cache, longer, profile="demo", progress=False, resume=True
        )
    resumed = model_pipeline.train_tracked(
        settings.training, learnable_cache, short, profile="demo", progress=False, resume=True
    )
    assert resumed.mlflow_run_id == first.mlflow_run_id
    assert torch.load(resumed.checkpoint, weights_only=False)["epoch"] == 1


def test_compile_setting_reaches_the_training_config(tmp_path, monkeypatch):
    # `cxr train --compile` and the Dagster assets both go through the settings.
    assert not model_pipeline.train_config_for(
        load_settings(home=tmp_path).training, "resnet18"
    ).compile
    monkeypatch.setenv("CXR_TORCH_COMPILE", "true")
    assert model_pipeline.train_config_for(
        load_settings(home=tmp_path).training, "resnet18"
    ).compile

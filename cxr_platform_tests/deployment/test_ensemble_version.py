"""An ensemble is a version like any other: built by the release job from the trained models,
then evaluated, explained, exported, registered, shadowed, gated, served over HTTP and by the
DICOM node; and what it scores is each member's calibrated logit, averaged."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from cxr_platform.data.sources import discover_images
from cxr_platform.defs.definitions import RELEASE_JOB, build_definitions
from cxr_platform.deployment.pipeline import parity_inputs, promote_with_gate
from cxr_platform.deployment.registry import PRODUCTION, SHADOW, registry_for
from cxr_platform.explain.gradcam import gradcam_heatmaps
from cxr_platform.model_version.files import METADATA_FILE, ONNX_FILE, onnx_session
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.ensemble import EnsembleError, combine
from cxr_platform.models.zoo import architecture, ensemble_arch
from cxr_platform.monitoring.finetune import finetune_production, register_finetuned
from cxr_platform.pacs import build_node
from cxr_platform.ports import free_port
from cxr_platform.serving.process import ServiceProcess
from cxr_platform.settings import load_settings
from cxr_platform_tests.pacs.conftest import radiograph, wait_for
from cxr_platform_tests.pacs.scu import send
from cxr_platform_tests.synthetic_dicom import RadiographSpec

API_KEY = "ensemble-test-key"


def _members(trained_checkpoint, untrained_checkpoint):
    paths = (trained_checkpoint.path, untrained_checkpoint.path)
    points = (trained_checkpoint.operating_point, untrained_checkpoint.operating_point)
    return [Checkpoint.load(path) for path in paths], list(points)


def test_the_ensemble_averages_its_members_calibrated_logits(
    trained_checkpoint, untrained_checkpoint, learnable_cache
):
    checkpoints, points = _members(trained_checkpoint, untrained_checkpoint)
    combined = combine(checkpoints, points)
    assert combined.arch == "ensemble:baseline_cnn+baseline_cnn"
    images = parity_inputs(learnable_cache)[:8]
    with torch.no_grad():
        ensemble_logits = combined.bare_model()(images).numpy()[:, 0]
        member_logits = [c.bare_model()(images).numpy()[:, 0] for c in checkpoints]
    expected = np.mean(
        [logits / p.temperature + p.bias for logits, p in zip(member_logits, points, strict=True)],
        axis=0,
    )
    np.testing.assert_allclose(ensemble_logits, expected, rtol=1e-4, atol=1e-5)
    # A checkpoint like a trained one: it round-trips through the file.
    restored = Checkpoint.from_payload(combined.to_payload())
    with torch.no_grad():
        np.testing.assert_allclose(
            restored.bare_model()(images).numpy()[:, 0], ensemble_logits, rtol=1e-6
        )

    # Grad-CAM reads the first member: the ensemble's map is that member's map.
    ensemble_map = gradcam_heatmaps(combined.bare_model(), combined.arch, images[:2])
    member_map = gradcam_heatmaps(checkpoints[0].bare_model(), "baseline_cnn", images[:2])
    np.testing.assert_allclose(ensemble_map, member_map, atol=1e-4)

    flipped = combine(checkpoints, points, test_time_augmentation="flip")
    assert flipped.flip_averaged
    with torch.no_grad():
        mirrored = combined.bare_model()(torch.flip(images, dims=(3,))).numpy()[:, 0]
        np.testing.assert_allclose(
            flipped.scoring_model()(images).numpy()[:, 0],
            (ensemble_logits + mirrored) / 2,
            rtol=1e-4,
            atol=1e-5,
        )


def test_members_whose_split_is_not_recorded_or_differs_are_refused(
    trained_checkpoint, untrained_checkpoint, learnable_cache, tmp_path
):
    """An ensemble is judged on the members' common validation and test splits: a member that
    does not record its patient split (the guard used to pass on that) or records another one
    may have trained on the images the others are judged on."""
    from types import SimpleNamespace

    from cxr_platform.models.ensemble import Member, build_ensemble
    from cxr_platform.models.pipeline import TrainedModel

    def member(evaluated, run_id: str, manifest: str | None) -> Member:
        trained = TrainedModel(
            model_name="baseline_cnn",
            arch="baseline_cnn",
            checkpoint=evaluated.path,
            mlflow_run_id=run_id,
            profile="demo",
            best_epoch=1,
            best_val_auc=0.5,
            epochs_run=1,
            stopped_early=False,
            pretrained=False,
            weights_source=None,
            device="cpu",
            wall_seconds=1.0,
            train_images_per_s=1.0,
            manifest_hash=manifest,
        )
        evaluation = SimpleNamespace(
            checkpoint_sha256=None, operating_point=evaluated.operating_point
        )
        return Member(trained, evaluation)

    training = load_settings(home=tmp_path).training
    for manifests, said in (
        (("m1", None), "is not recorded"),
        ((None, None), "is not recorded"),
        (("m1", "m2"), "different patient splits"),
    ):
        members = [
            member(trained_checkpoint, "run1", manifests[0]),
            member(untrained_checkpoint, "run2", manifests[1]),
        ]
        with pytest.raises(EnsembleError, match=said):
            build_ensemble(training, learnable_cache, members)


def test_what_cannot_be_combined_is_refused_with_a_reason(trained_checkpoint, untrained_checkpoint):
    checkpoints, points = _members(trained_checkpoint, untrained_checkpoint)
    with pytest.raises(EnsembleError, match="at least two"):
        combine(checkpoints[:1], points[:1])
    with pytest.raises(EnsembleError, match="test-time augmentation"):
        combine(checkpoints, points, test_time_augmentation="rotate")
    other = dataclasses.replace(
        checkpoints[1], preprocessing={**checkpoints[1].preprocessing, "image_size": 128}
    )
    with pytest.raises(EnsembleError, match="different preprocessing"):
        combine([checkpoints[0], other], points)
    nested = combine(checkpoints, points)
    with pytest.raises(EnsembleError, match="cannot itself be an ensemble"):
        combine([nested, checkpoints[0]], points)
    with pytest.raises(Exception, match="unknown ensemble"):
        architecture("ensemble:baseline_cnn+vgg11")
    assert architecture(ensemble_arch(["resnet18", "baseline_cnn"])).gradcam_layer == (
        "members.0.layer4"
    )


@pytest.fixture(scope="module")
def chest_pngs(tiny_synthetic) -> list[Path]:
    return [Path(p) for p in discover_images(tiny_synthetic).records["path"].tolist()]


@pytest.fixture(scope="module")
def released(tiny_synthetic, tmp_path_factory):
    """The release job with two architectures and their ensemble (64 px, the demo profile)."""
    settings = load_settings(
        home=tmp_path_factory.mktemp("ensemble") / "home",
        data_dir=tiny_synthetic,
        image_size=64,
        workers=1,
        training_profile="demo",
        device="cpu",
        models=("baseline_cnn", "resnet18"),
        ensemble=True,
        # The mechanics are under test here, not how well 64 px models trained for seconds do.
        min_test_auc=0.0,
        min_test_sensitivity=0.0,
        min_test_specificity=0.0,
        gate_max_auc_drop=1.0,
    )
    result = (
        build_definitions(settings)
        .resolve_job_def(RELEASE_JOB)
        .execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    )
    assert result.success
    return settings, result


def test_the_release_job_builds_evaluates_explains_exports_and_registers_the_ensemble(released):
    settings, result = released
    materialized = {
        e.asset_key.to_user_string(): e.materialization
        for e in result.get_asset_materialization_events()
    }
    for name in ("trained_model", "evaluation_report", "gradcam_gallery", "exported_model"):
        assert f"ensemble/{name}" in materialized, name
    checks = {
        f"{e.asset_key.to_user_string()}:{e.check_name}": e
        for e in result.get_asset_check_evaluations()
    }
    assert checks["ensemble/exported_model:parity"].passed
    assert "ensemble/gradcam_gallery:randomization_sanity" in checks

    members = {
        arch: result.asset_value(dg.AssetKey([arch, "trained_model"]))
        for arch in ("baseline_cnn", "resnet18")
    }
    ensemble = result.asset_value(dg.AssetKey(["ensemble", "trained_model"]))
    assert ensemble.arch == "ensemble:baseline_cnn+resnet18"
    assert [m["mlflow_run_id"] for m in ensemble.members] == [
        members["baseline_cnn"].mlflow_run_id,
        members["resnet18"].mlflow_run_id,
    ]
    report = result.asset_value(dg.AssetKey(["ensemble", "evaluation_report"]))
    assert report.checkpoint_sha256 == ensemble.checkpoint_sha256
    assert len(report.training["members"]) == 2  # the card reads them from here

    registered = result.asset_value(dg.AssetKey("registered_model_version"))
    version = registered["versions"]["ensemble"]
    registry = registry_for(settings.registry)
    card = registry.card(version)
    assert "## Ensemble members" in card
    for member in members.values():
        assert member.mlflow_run_id in card
    files = registry.download(version)
    metadata = json.loads((files / METADATA_FILE).read_text())
    assert metadata["arch"] == ensemble.arch
    assert metadata["input_gate"] is not None  # fitted on the ensemble's own training images
    # One graph: the logit and the population check's features from a single session.
    outputs = [o.name for o in onnx_session(files / ONNX_FILE).get_outputs()]
    assert outputs == [metadata["output_name"], metadata["features_name"]]


def test_the_ensemble_is_shadowed_gated_and_served_over_http_and_by_the_node(released, chest_pngs):
    settings, result = released
    registry = registry_for(settings.registry)
    version = result.asset_value(dg.AssetKey("registered_model_version"))["versions"]["ensemble"]
    registry.set_shadow(version, triggered_by="test")
    assert registry.aliases()[SHADOW] == version
    outcome = promote_with_gate(
        settings.registry,
        result.asset_value(dg.AssetKey("preprocessed_cache")),
        version,
        triggered_by="test",
    )
    assert outcome.decision.passed and registry.aliases()[PRODUCTION] == version

    png = io.BytesIO()
    Image.open(chest_pngs[3]).save(png, format="PNG")
    env = {"CXR_HOME": str(settings.home), "CXR_SERVICE_API_KEY": API_KEY}
    with ServiceProcess(env=env) as service:
        import httpx

        with httpx.Client(
            base_url=service.url, headers={"X-API-Key": API_KEY}, timeout=60
        ) as client:
            model = client.get("/model").json()
            answer = client.post("/predict", files={"file": ("chest.png", png.getvalue())})
            overlay = client.post("/explain", files={"file": ("chest.png", png.getvalue())})
    assert model["production"]["arch"] == "ensemble:baseline_cnn+resnet18", model
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == version
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"

    node = build_node(
        dataclasses.replace(
            settings.dicom,
            dicom_port=free_port(),
            dicom_host="127.0.0.1",
            dicom_allowed_aets=("MODALITY",),
        ),
        settings.registry,
        state_dir=settings.home / "node",
    )
    node.start()
    try:
        source = radiograph(chest_pngs[5], RadiographSpec())
        assert send(node.port, [source]).statuses == [0x0000]
        wait_for(
            lambda: node.storage.status(source.SOPInstanceUID) in ("processed", "refused"),
            timeout=120,
            what="the node to score the image",
        )
        assert node.storage.status(source.SOPInstanceUID) == "processed", node.storage.detail(
            source.SOPInstanceUID
        )
        (study,) = node.storage.outbox()
        assert len(study.files) == 4  # SR, heatmap overlay, parametric map, segmentation
        sr = next(pydicom.dcmread(p) for p in study.files if pydicom.dcmread(p).Modality == "SR")
        assert version in str(sr)
    finally:
        node.stop()


def test_an_ensemble_in_production_is_fine_tuned_member_by_member(released):
    """The monitoring loop's fine-tune: each member from its own production weights, evaluated
    alone, then combined again into a new ensemble that becomes the shadow candidate."""
    settings, result = released
    registry = registry_for(settings.registry)
    version = result.asset_value(dg.AssetKey("registered_model_version"))["versions"]["ensemble"]
    if registry.aliases().get(PRODUCTION) != version:
        registry.promote(version, triggered_by="test")
    cache = result.asset_value(dg.AssetKey("preprocessed_cache"))
    tuned = finetune_production(settings.training, settings.monitoring, registry, cache)
    assert tuned.trained.arch == "ensemble:baseline_cnn+resnet18"
    assert [m["arch"] for m in tuned.trained.members] == ["baseline_cnn", "resnet18"]
    production = result.asset_value(dg.AssetKey(["ensemble", "trained_model"]))
    # New members, trained from the production version's members.
    assert {m["mlflow_run_id"] for m in tuned.trained.members}.isdisjoint(
        m["mlflow_run_id"] for m in production.members
    )
    _, info = register_finetuned(settings.registry, cache, tuned, triggered_by="test")
    assert registry.aliases()[SHADOW] == info.version
    assert registry.get(info.version).tags["cxr.finetuned_from"] == version

"""The lung segmentation version in a real MLflow registry (SQLite): its own registered model,
a card written with the version, the gate's three rules, promotion and refusal, and a download
that the scoring side loads and draws fields with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.deployment.model_card import CARD_MARKDOWN
from cxr_platform.deployment.registry import lung_registry_for, registry_for
from cxr_platform.deployment.segmentation_export import export_segmenter_onnx
from cxr_platform.deployment.segmentation_release import release_segmenter
from cxr_platform.model_version.aliases import PREVIOUS_PRODUCTION, PRODUCTION
from cxr_platform.model_version.lung_fields import SEGMENTER_REPORT_FILE, LungFieldModel
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.models.segmentation import LungSegmenter, SegmentationConfig
from cxr_platform.settings import load_settings
from cxr_platform.tracking import ExperimentTracker

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small untrained U-Net's export: the registry's mechanics, not its Dice, are tested."""
    torch.manual_seed(0)
    model = LungSegmenter(SegmentationConfig(working_size=32, channels=(4, 8, 16), epochs=1))
    preprocessing = PreprocessingConfig(image_size=SIZE)
    path = tmp_path_factory.mktemp("segmenter") / "lung_segmenter.onnx"
    return export_segmenter_onnx(model, preprocessing, path, metadata={"kind": "test"})


def _release(registry, exported, run_id, *, dice, data_version="manifest-a", floor=0.8):
    tags = VersionTags(
        model_name="lung_unet",
        arch="monai-unet",
        preprocessing={"image_size": SIZE, "resize_mode": "stretch"},
        data_version=data_version,
        data_dir=None,
        metrics={"test_dice_mean": dice, "test_dice_p5": dice - 0.05, "test_hd95_px_mean": 6.0},
    )
    report = {"split": "test", "summary": {"dice_mean": dice}, "by_group": {}}
    return release_segmenter(
        registry,
        exported,
        report,
        f"## Lung segmentation on the test split\n\n- **Dice {dice:.4f}**",
        run_id=run_id,
        tags=tags,
        floor=floor,
        parity={"passed": True, "max_abs_logit_diff": 1e-6},
        masks_dir="/somewhere/lung_masks",
        triggered_by="test",
    )


def test_a_segmenter_is_its_own_registered_model_gated_promoted_and_loadable(exported, tmp_path):
    settings = load_settings(home=tmp_path / "home")
    tracker = ExperimentTracker(
        settings.registry.tracking_uri,
        experiment="segmentation",
        artifact_root=settings.registry.mlflow_dir / "artifacts",  # not the working directory
    )
    run_id = tracker.start_run("segmenter", {}).run_id
    registry = lung_registry_for(settings.registry)
    assert registry.name == "cxr-lung-fields" != registry_for(settings.registry).name

    first = _release(registry, exported, run_id, dice=0.96)
    assert first.decision.passed and first.version.version == "1"
    assert registry.aliases() == {PRODUCTION: "1"}
    assert "synthetic demo set" in first.card and "**Dice 0.9600**" in first.card
    assert "Passed: promoted to production" in first.card
    assert "No production version judged on the same patients" in first.card
    assert registry.get("1").metrics["test_dice_mean"] == pytest.approx(0.96)
    # The classifier's registered model is untouched.
    assert registry_for(settings.registry).versions() == []

    # Worse on the same patients: refused, production stays; the card says why.
    worse = _release(registry, exported, run_id, dice=0.95)
    assert not worse.decision.passed and worse.decision.compared
    assert "below production's 0.9600 (version 1)" in worse.decision.reasons[0]
    assert "Refused, never served" in worse.card
    assert registry.aliases()[PRODUCTION] == "1"
    assert registry.get("2").release.refused_at is not None

    # Judged on other patients: no comparison is fair, the floor alone decides.
    other = _release(registry, exported, run_id, dice=0.90, data_version="manifest-b")
    assert other.decision.passed and not other.decision.compared
    assert registry.aliases() == {PRODUCTION: "3", PREVIOUS_PRODUCTION: "1"}

    under = _release(registry, exported, run_id, dice=0.79, data_version="manifest-c")
    assert under.decision.reasons == ("test Dice 0.7900 is below the floor 0.80",)
    assert registry.aliases()[PRODUCTION] == "3"

    # What the service and the node load: the files, the card beside them, fields that fit.
    folder = registry.download(PRODUCTION)
    assert (folder / SEGMENTER_REPORT_FILE).exists() and (folder / CARD_MARKDOWN).exists()
    model = LungFieldModel(folder, model_version="3")
    assert model.fits(PreprocessingConfig(image_size=SIZE))
    assert not model.fits(PreprocessingConfig(image_size=SIZE, resize_mode="letterbox"))
    squares = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    fields = model.fields(squares)
    assert len(fields) == 3 and fields[0].mask.shape == (SIZE, SIZE)
    assert fields[0].mask.dtype == bool and fields[0].version == "3"
    with pytest.raises(ValueError, match="64x64 squares"):
        model.fields(squares[:, :32, :32])

"""Shared fixtures: a tiny synthetic dataset, the shared Kaggle folder (skipped when absent)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageFilter

from cxr_platform.data.cache import PreprocessedCache, build_cache
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.profile import profile_dataset
from cxr_platform.data.sources import discover_images
from cxr_platform.data.splits import make_manifest
from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset
from cxr_platform.model_version.operating_point import OperatingPoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_kaggle_dir() -> Path:
    """``../shared/data/kaggle-chest-xray-224`` beside the checkout.

    Override with CXR_SHARED_KAGGLE."""
    override = os.environ.get("CXR_SHARED_KAGGLE")
    if override:
        return Path(override)
    return REPO_ROOT.parent / "shared" / "data" / "kaggle-chest-xray-224"


def shared_adults_dir() -> Path:
    """``../shared/data/adult-cxr-figure1``: adults' chest radiographs, the population the
    paediatric model is not for. Override with CXR_SHARED_ADULTS."""
    override = os.environ.get("CXR_SHARED_ADULTS")
    if override:
        return Path(override)
    return REPO_ROOT.parent / "shared" / "data" / "adult-cxr-figure1"


@pytest.fixture(scope="session")
def adults_dir() -> Path:
    path = shared_adults_dir()
    if not (path / "images").is_dir():
        pytest.skip(f"shared adult radiographs not present at {path}")
    return path


@pytest.fixture(scope="session")
def case_report_adults_dir() -> Path:
    """``../shared/data/adult-cxr-ieee8023-subset``: a second adult collection, from other
    hospitals and image pipelines (its ``metadata.csv`` names each file's patient)."""
    path = REPO_ROOT.parent / "shared" / "data" / "adult-cxr-ieee8023-subset"
    if not (path / "metadata.csv").is_file():
        pytest.skip(f"shared adult case-report radiographs not present at {path}")
    return path


@pytest.fixture(scope="session")
def kaggle_dir() -> Path:
    path = shared_kaggle_dir()
    if not (path / "train").is_dir():
        pytest.skip(f"shared Kaggle data not present at {path}")
    return path


@pytest.fixture()
def single_torch_thread():
    """torch on one thread for the test, as each of two xdist workers on two cores should be:
    a small U-Net's training step took 0.26 s with two workers of two threads each, 0.03 s with
    one. Opt-in per module (new torch-heavy tests): with one thread set for the whole suite
    (OMP_NUM_THREADS in every worker), an older test failed in a clean run (an averaged run's
    validation AUC came out equal to the live weights'), and the suite was no faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """40 patients (~95 images): the smallest size where a +-5 point class-share rule is
    reliably feasible per split (each image of a 10-image split moves its share 10 points)."""
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    return generate_synthetic_dataset(root, SyntheticSpec(n_patients=40, seed=7), progress=False)


@pytest.fixture(scope="session")
def learnable_cache(tmp_path_factory) -> PreprocessedCache:
    """A learnable synthetic set cached at 96 px: big enough for AUC to mean something, small
    enough that a baseline CNN trains for 30 epochs in ~15 s on two CPU cores."""
    base = tmp_path_factory.mktemp("learnable")
    root = generate_synthetic_dataset(
        base / "data", SyntheticSpec(n_patients=160, seed=11), workers=2, progress=False
    )
    _, inspected = profile_dataset(discover_images(root), workers=2, progress=False)
    manifest = make_manifest(inspected, ratios=(0.6, 0.2, 0.2), seed=11)
    return build_cache(
        manifest, base / "cache", PreprocessingConfig(image_size=96), workers=2, progress=False
    )


# The test population a synthetic-trained version is not for: the same rendered chests with every
# edge sharpened (an unsharp mask), as bone and lung markings look different in another kind of
# patient. The input gate takes them for the radiographs it knows; the check by pixels, fitted
# against some of them, must refuse the rest. A population for the tests, not a claim about
# adults (those are measured on real images: benchmarks/population_check.py).
OTHER_POPULATION_SHARPENING = ImageFilter.UnsharpMask(radius=4, percent=250, threshold=0)


def other_population_images(source: Path, out_dir: Path, limit: int = 40) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    # Radiographs of both classes (not the lesion or lung masks beside them), spread over the
    # list: only the class folders at the root hold radiographs.
    files = [
        p
        for p in sorted(source.rglob("*.png"))
        if p.parent.name in ("NORMAL", "PNEUMONIA") and p.parent.parent == source
    ]
    for path in files[:: max(1, len(files) // limit)][:limit]:
        image = Image.open(path).convert("L").filter(OTHER_POPULATION_SHARPENING)
        image.save(out_dir / f"{path.parent.name}-{path.name}")
    return out_dir


@pytest.fixture(scope="session")
def other_population(tmp_path_factory) -> Path:
    """Images of the test population the synthetic test models are not for (another seed)."""
    base = tmp_path_factory.mktemp("other-population")
    root = generate_synthetic_dataset(
        base / "source", SyntheticSpec(n_patients=24, seed=23), progress=False
    )
    return other_population_images(root, base / "images")


@dataclass(frozen=True)
class EvaluatedCheckpoint:
    """A checkpoint as training wrote it, and the operating point its evaluation fitted."""

    path: Path
    operating_point: OperatingPoint


def _trained_and_evaluated(
    cache: PreprocessedCache, out_dir: Path, **overrides
) -> EvaluatedCheckpoint:
    """Train the baseline on ``cache`` and fit its operating point on validation."""
    from cxr_platform.data.transforms import TensorBatches
    from cxr_platform.models.checkpoint import Checkpoint
    from cxr_platform.models.evaluation import evaluate_predictions
    from cxr_platform.models.training import (
        TrainingData,
        predict_logits,
        train,
        training_profile,
    )

    config = training_profile("demo", "baseline_cnn", batch_size=16, **overrides)
    result = train(config, TrainingData.from_cache(cache, "cpu"), out_dir, progress=False)
    model = Checkpoint.load(result.best_checkpoint).scoring_model()
    val = TensorBatches.from_cache(cache, "val")
    report = evaluate_predictions(
        arch="baseline_cnn",
        model_name="baseline_cnn",
        val=(val.labels_np, predict_logits(model, val)),
        test=None,
        n_bootstrap=10,
    )
    return EvaluatedCheckpoint(result.best_checkpoint, report.operating_point)


@pytest.fixture(scope="session")
def trained_checkpoint(learnable_cache, tmp_path_factory) -> EvaluatedCheckpoint:
    """A baseline that learned the synthetic task (val AUC ~0.8), with its operating point."""
    return _trained_and_evaluated(
        learnable_cache,
        tmp_path_factory.mktemp("trained"),
        finetune_epochs=30,
        patience=30,
        finetune_lr=3e-3,
    )


@pytest.fixture(scope="session")
def untrained_checkpoint(learnable_cache, tmp_path_factory) -> EvaluatedCheckpoint:
    """Same architecture after one epoch at a negligible learning rate: near chance."""
    return _trained_and_evaluated(
        learnable_cache,
        tmp_path_factory.mktemp("untrained"),
        finetune_epochs=1,
        patience=1,
        finetune_lr=1e-9,
    )


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A real PostgreSQL server on 127.0.0.1 for the whole session."""
    from cxr_platform_tests.postgres import throwaway_postgres

    with throwaway_postgres() as url:
        yield url


@pytest.fixture()
def postgres_database(postgres_url) -> str:
    """A database of its own on the session's server, for tests that count ids from 1."""
    from cxr_platform_tests.postgres import create_database

    return create_database(postgres_url, f"test_{uuid.uuid4().hex[:12]}")


# `cxr demo` small and fast: the tests that use it check plumbing, what a person sees and the
# README's commands; model quality has its own tests. The floors are off because 6 test images
# per class cannot support a meaningful AUC floor, nor a handful of lungs a Dice floor.
DEMO_SETTINGS = {
    "CXR_SYNTHETIC_PATIENTS": "40",
    "CXR_IMAGE_SIZE": "64",
    "CXR_MIN_TEST_AUC": "0",
    "CXR_MIN_TEST_SENSITIVITY": "0",
    "CXR_MIN_TEST_DICE": "0",
}
CXR = [sys.executable, "-m", "cxr_platform.cli"]


@dataclass(frozen=True)
class Demo:
    home: Path
    env: dict[str, str]
    result: subprocess.CompletedProcess

    @property
    def instance_dir(self) -> Path:
        return self.home / "dagster"

    def settings(self):
        from cxr_platform.settings import load_settings

        overrides = {name.removeprefix("CXR_").lower(): v for name, v in DEMO_SETTINGS.items()}
        return load_settings(home=self.home, **overrides)

    def cxr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CXR, *args], capture_output=True, text=True, env=self.env, timeout=300
        )

    def home_file(self, shown: str) -> Path:
        """A path as the Dagster UI shows it (from ``$CXR_HOME``) as a file on this machine."""
        return Path(shown.replace("$CXR_HOME", str(self.home), 1))


def run_demo(folder: Path) -> Demo:
    """`cxr demo` into a new home under ``folder`` (about two minutes on two cores)."""
    home = folder / "home"
    env = {**os.environ, "CXR_HOME": str(home), **DEMO_SETTINGS}
    env.pop("CXR_DATA_DIR", None)
    result = subprocess.run([*CXR, "demo"], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return Demo(home, env, result)


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Demo:
    """A home exactly as `cxr demo` left it, for tests that only look at it. Tests that change
    a home (register, promote, train) make their own: these may run in any order."""
    return run_demo(tmp_path_factory.mktemp("demo"))


@dataclass(frozen=True)
class LungFieldsExport:
    onnx: Path
    preprocessing: PreprocessingConfig
    test_dice: float
    model: Any  # the LungSegmenter the file was exported from


@pytest.fixture(scope="session")
def lung_fields_export(learnable_cache, tmp_path_factory) -> LungFieldsExport:
    """A small U-Net trained on the learnable set's own lung masks at its 96 px, on its patient
    split, and exported: the lung fields version the service and node tests load."""
    import torch

    from cxr_platform.data.lung_masks import build_mask_cache
    from cxr_platform.data.synthetic import LUNG_MASK_FOLDER
    from cxr_platform.deployment.segmentation_export import export_segmenter_onnx
    from cxr_platform.model_version.lung_fields import field_measures, fit_field_limits
    from cxr_platform.models.segmentation import (
        SegmentationConfig,
        dice_scores,
        predict_lung_logits,
        train_segmenter,
    )

    base = tmp_path_factory.mktemp("lung_fields")
    indexes = {split: learnable_cache.index(split) for split in learnable_cache.splits}
    first = indexes["train"].iloc[0]
    data_root = Path(str(first["path"])[: -len(str(first["relative_path"]))])
    config = PreprocessingConfig.from_dict(learnable_cache.preprocessing)
    masks = build_mask_cache(indexes, data_root / LUNG_MASK_FOLDER, base, config, progress=False)

    def part(split: str):
        return learnable_cache.images(split)[masks.rows(split)], masks.masks(split)

    recipe = SegmentationConfig(
        working_size=48, channels=(8, 16, 32), epochs=6, batch_size=16, patience=6
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one per xdist worker: two workers on two cores
    try:
        trained = train_segmenter(recipe, config, *part("train"), *part("val")).model
        images, truth = part("test")
        dice = float(dice_scores(predict_lung_logits(trained, images, config) > 0, truth).mean())
        val_fields = predict_lung_logits(trained, learnable_cache.images("val"), config) > 0
        onnx = export_segmenter_onnx(
            trained,
            config,
            base / "lung_segmenter.onnx",
            metadata={
                "kind": "lung_segmentation",
                "test_dice_mean": dice,
                "field_limits": fit_field_limits(field_measures(val_fields)).to_dict(),
            },
        )
    finally:
        torch.set_num_threads(threads)
    return LungFieldsExport(onnx, config, dice, trained)


def release_lung_fields(registry_settings, export: LungFieldsExport) -> str:
    """``export`` registered and promoted as the lung fields version of these registry
    settings, the way the release job does it; its version number."""
    from cxr_platform.deployment.registry import lung_registry_for
    from cxr_platform.deployment.segmentation_release import release_segmenter
    from cxr_platform.model_version.tags import VersionTags
    from cxr_platform.tracking import ExperimentTracker

    tracker = ExperimentTracker(
        registry_settings.tracking_uri,
        experiment="lung-fields-test",
        artifact_root=registry_settings.mlflow_dir / "artifacts",  # not the working directory
    )
    run_id = tracker.start_run("lung fields", {}).run_id
    dice = export.test_dice
    released = release_segmenter(
        lung_registry_for(registry_settings),
        export.onnx,
        {"split": "test", "summary": {"dice_mean": dice}, "by_group": {}},
        f"- **Dice {dice:.4f}** on the learnable set's test split",
        run_id=run_id,
        tags=VersionTags(
            model_name="lung_unet",
            preprocessing=export.preprocessing.to_dict(),
            data_version="learnable",
            metrics={"test_dice_mean": dice},
        ),
        floor=0.8,
        parity={"passed": True},
        masks_dir="lung_masks",
        triggered_by="test",
    )
    assert released.decision.passed, released.decision.reasons
    return released.version.version

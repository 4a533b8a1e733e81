"""Set up a benchmark home: a lung segmentation checkpoint trained elsewhere, exported and
registered as the home's lung fields version the way the release job does it.

The serving benchmarks (``pacs_roundtrip.py --lung-fields``, ``explain_cost.py``) measure the
home's production lung fields version. A real-data home's main job trains the U-Net only when it
is given the masks (hours on two cores); this puts a U-Net trained by an earlier run (such as
``lung_segmentation.py``'s) beside the home's classifier instead: its field limits fitted on the
home's validation split, exported to ONNX with parity checked on test images (the export
asset's own ``export_lung_fields``), judged by the
Dice floor (with its test Dice as measured by that run) and promoted.

    CXR_HOME=<home> CXR_DATA_DIR=<its data folder> \\
        .venv/bin/python benchmarks/register_lung_fields.py \\
        --segmenter <run>/best.pt --test-dice 0.952 [--floor 0.9]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

from cxr_platform.data.pipeline import prepare
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.deployment.registry import lung_registry_for
from cxr_platform.deployment.segmentation_export import export_lung_fields
from cxr_platform.deployment.segmentation_release import (
    SEGMENTER_ARCH,
    SEGMENTER_MODEL_NAME,
    release_segmenter,
)
from cxr_platform.model_version.lung_fields import SEGMENTER_ONNX_FILE
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.models import segmentation_pipeline as seg
from cxr_platform.provenance import git_commit
from cxr_platform.settings import load_settings
from cxr_platform.tracking import ExperimentTracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segmenter", type=Path, required=True)
    parser.add_argument("--test-dice", type=float, required=True)
    parser.add_argument("--floor", type=float, default=0.9)
    args = parser.parse_args()

    settings = load_settings()
    _, cache = prepare(settings.data, progress=False)
    model, preprocessing = seg.load_segmenter(args.segmenter)
    if preprocessing != PreprocessingConfig.from_dict(cache.preprocessing):
        raise SystemExit("the segmenter prepares images differently from this home's cache")
    registry_settings = settings.registry
    tracker = ExperimentTracker(
        registry_settings.tracking_uri,
        experiment="lung-fields-benchmark",
        artifact_root=registry_settings.mlflow_dir / "artifacts",
    )
    run_id = tracker.start_run("lung fields (benchmark setup)", {}).run_id
    with tempfile.TemporaryDirectory() as work:
        exported = export_lung_fields(
            model,
            preprocessing,
            cache,
            Path(work) / SEGMENTER_ONNX_FILE,
            metadata={
                "kind": seg.CHECKPOINT_KIND,
                "mlflow_run_id": run_id,
                "checkpoint_sha256": hashlib.sha256(args.segmenter.read_bytes()).hexdigest(),
                "test_dice_mean": args.test_dice,
            },
        )
        if not exported.parity.passed:
            raise SystemExit(f"the export differs from PyTorch: {exported.parity.to_dict()}")
        released = release_segmenter(
            lung_registry_for(registry_settings),
            exported.onnx,
            {"split": "test", "summary": {"dice_mean": args.test_dice}, "by_group": {}},
            f"- **Dice {args.test_dice:.4f}** on the test split, as measured by the run that "
            "trained it",
            run_id=run_id,
            tags=VersionTags(
                model_name=SEGMENTER_MODEL_NAME,
                arch=SEGMENTER_ARCH,
                preprocessing=preprocessing.to_dict(),
                data_version=None,
                metrics={"test_dice_mean": args.test_dice},
                git_commit=git_commit(),
            ),
            floor=args.floor,
            parity=exported.parity.to_dict(),
            masks_dir="(an earlier run's)",
            triggered_by="benchmarks/register_lung_fields.py",
        )
    verdict = (
        "promoted"
        if released.decision.passed
        else "refused: " + "; ".join(released.decision.reasons)
    )
    print(f"lung fields version {released.version.version}: {verdict}")


if __name__ == "__main__":
    main()

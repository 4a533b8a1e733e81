"""Group "segmentation": lung_field_masks -> lung_segmenter -> lung_segmentation_evaluation ->
lung_segmenter_onnx.

The masks are joined to the preprocessed cache row for row, so the segmentation version trains,
stops and is judged on the classifier's own patient split: no patient crosses between the two.
Without a mask folder (real data and no ``CXR_LUNG_MASK_DIR``) the masks asset materializes
nothing and the rest of the group is skipped, not failed.
"""
# No `from __future__ import annotations`: Dagster inspects these annotations at runtime.

import json
from pathlib import Path

import dagster as dg
import pandas as pd

from cxr_platform.data import pipeline as data_pipeline
from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.lung_masks import LungMaskCache
from cxr_platform.data.splits import manifest_hash
from cxr_platform.defs.deployment_assets import DEPLOY_GROUP
from cxr_platform.defs.metadata import home_path, mlflow_run_link, readable
from cxr_platform.defs.resources import PlatformSettings
from cxr_platform.defs.training_assets import (
    evaluation_report_key,
    png_markdown,
    trained_model_key,
)
from cxr_platform.deployment.registry import lung_registry_for
from cxr_platform.deployment.segmentation_export import export_lung_fields
from cxr_platform.deployment.segmentation_release import (
    SEGMENTER_ARCH,
    SEGMENTER_MODEL_NAME,
    release_segmenter,
)
from cxr_platform.explain.lung_relevance import measure_lung_relevance
from cxr_platform.model_version.lung_fields import (
    SEGMENTER_ONNX_FILE,
    segmenter_metadata,
)
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.models import segmentation_pipeline as seg
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.evaluation import EvaluationReport
from cxr_platform.models.pipeline import TrainedModel
from cxr_platform.provenance import git_commit
from cxr_platform.terminal import interactive

GROUP = "segmentation"


@dg.asset(group_name=GROUP, kinds={"numpy"}, output_required=False)
def lung_field_masks(
    context: dg.AssetExecutionContext,
    platform: PlatformSettings,
    preprocessed_cache: PreprocessedCache,
):
    """Lung-field masks of the cached images, on the model's square, row for row per split."""
    data = platform.settings().data
    masks = data_pipeline.lung_masks(preprocessed_cache, data, progress=interactive())
    if masks is None:
        context.log.info(
            "no lung mask folder for this data (CXR_LUNG_MASK_DIR): no segmentation version"
        )
        return
    coverage = masks.coverage()
    rows = "\n".join(
        f"| {split} | {with_mask} | {n} |" for split, (with_mask, n) in coverage.items()
    )
    yield dg.Output(
        masks,
        metadata={
            "masks_dir": home_path(masks.masks_root, data.home),
            "coverage": dg.MetadataValue.md(
                "| split | images with a mask | images |\n| --- | ---: | ---: |\n" + rows
            ),
            "images_without_mask": sum(n - with_mask for with_mask, n in coverage.values()),
        },
    )


@dg.asset(group_name=GROUP, kinds={"pytorch", "mlflow"})
def lung_segmenter(
    context: dg.AssetExecutionContext,
    platform: PlatformSettings,
    preprocessed_cache: PreprocessedCache,
    patient_splits: pd.DataFrame,
    lung_field_masks: LungMaskCache,
) -> dg.Output[seg.TrainedSegmenter]:
    """A MONAI U-Net trained with Dice + cross-entropy on the train split's masks, stopped
    early on the validation split's Dice; the best checkpoint, tracked in MLflow."""
    settings = platform.settings()
    training = settings.training
    config = seg.segmentation_config_for(
        training, image_size=int(preprocessed_cache.preprocessing["image_size"])
    )
    trained = seg.train_segmenter_tracked(
        training,
        preprocessed_cache,
        lung_field_masks,
        config,
        manifest_hash=manifest_hash(patient_splits),
        dagster_run_id=context.run.run_id,
        on_epoch=context.log.info,
    )
    history = pd.DataFrame(trained.history)
    return dg.Output(
        trained,
        metadata=readable(
            {
                "best_val_dice": trained.best_val_dice,
                "best_epoch": trained.best_epoch,
                "epochs_run": trained.epochs_run,
                "train_images": trained.train_images,
                "train_images_per_s": trained.train_images_per_s,
                "wall_seconds": trained.wall_seconds,
                "profile": trained.profile,
                "config": dg.MetadataValue.json(config.to_dict()),
                "history": dg.MetadataValue.md(history.to_markdown(index=False, floatfmt=".4f")),
                "checkpoint": home_path(trained.checkpoint, training.home),
                "checkpoint_sha256": trained.checkpoint_sha256,
                "mlflow_run": mlflow_run_link(training, trained.mlflow_run_id),
            }
        ),
    )


@dg.asset(group_name=GROUP, kinds={"python", "mlflow"})
def lung_segmentation_evaluation(
    platform: PlatformSettings,
    preprocessed_cache: PreprocessedCache,
    lung_field_masks: LungMaskCache,
    lung_segmenter: seg.TrainedSegmenter,
) -> dg.Output[dict]:
    """Dice and HD95 on the test split's patients (intervals resample patients), by class and
    file family, and the worst ten cases as a picture."""
    training = platform.settings().training
    evaluation = seg.evaluate_segmenter_on(
        lung_segmenter, preprocessed_cache, lung_field_masks, training
    )
    summary = evaluation.report.summary
    return dg.Output(
        summary,
        metadata=readable(
            {
                "test_dice_mean": summary["dice_mean"],
                "test_dice_ci": dg.MetadataValue.json(summary.get("dice_mean_ci")),
                "test_dice_p5": summary["dice_p5"],
                "test_hd95_px_mean": summary["hd95_px_mean"],
                "n_test": summary["images"],
                "report": dg.MetadataValue.md(evaluation.markdown_path.read_text()),
                "worst_cases": dg.MetadataValue.md(
                    png_markdown(evaluation.worst_cases_path, "worst cases")
                ),
                "json": home_path(evaluation.json_path, training.home),
                "mlflow_run": mlflow_run_link(training, lung_segmenter.mlflow_run_id),
            }
        ),
    )


@dg.asset_check(
    asset=lung_segmentation_evaluation,
    name="dice_floor",
    blocking=True,
    description="Mean test Dice at or above CXR_MIN_TEST_DICE (by profile: demo 0.80, full 0.95).",
)
def dice_floor(
    platform: PlatformSettings, lung_segmentation_evaluation: dict
) -> dg.AssetCheckResult:
    training = platform.settings().training
    floor = training.dice_floor
    dice = float(lung_segmentation_evaluation["dice_mean"])
    return dg.AssetCheckResult(
        passed=dice >= floor,
        description=f"test Dice {dice:.4f} against the floor {floor:.2f} ({training.profile})",
        metadata={"dice_mean": dice, "floor": floor},
    )


@dg.asset(group_name=GROUP, kinds={"onnx"})
def lung_segmenter_onnx(
    platform: PlatformSettings,
    preprocessed_cache: PreprocessedCache,
    lung_segmenter: seg.TrainedSegmenter,
    lung_segmentation_evaluation: dict,
) -> dg.Output[dict]:
    """The segmenter as ONNX (dynamic batch, its preprocessing, recipe, run and test Dice inside),
    kept only when ONNX Runtime draws the same lung fields as PyTorch on test images. Runs after
    the Dice floor has passed."""
    training = platform.settings().training
    model, preprocessing = seg.load_segmenter(lung_segmenter.checkpoint)
    exported = export_lung_fields(
        model,
        preprocessing,
        preprocessed_cache,
        lung_segmenter.checkpoint.parent / "export" / SEGMENTER_ONNX_FILE,
        metadata={
            "kind": seg.CHECKPOINT_KIND,
            "mlflow_run_id": lung_segmenter.mlflow_run_id,
            "checkpoint_sha256": lung_segmenter.checkpoint_sha256,
            "test_dice_mean": lung_segmentation_evaluation["dice_mean"],
            "test_hd95_px_mean": lung_segmentation_evaluation["hd95_px_mean"],
        },
    )
    path, limits, parity = exported.onnx, exported.limits, exported.parity
    if not parity.passed:
        raise dg.Failure(
            description=f"the exported segmenter differs from PyTorch: {parity.to_dict()}",
            metadata=readable(parity.to_dict()),
        )
    return dg.Output(
        {"onnx": str(path), "parity": parity.to_dict()},
        metadata=readable(
            {
                "onnx": home_path(path, training.home),
                "parity_max_abs_logit_diff": parity.max_abs_logit_diff,
                "parity_pixels_flipped": parity.pixels_flipped,
                "parity_images": parity.n_images,
                "field_limits": dg.MetadataValue.json(limits.to_dict()),
                "size_kb": path.stat().st_size / 1024,
            }
        ),
    )


@dg.asset(group_name=DEPLOY_GROUP, kinds={"mlflow"})
def lung_fields_version(
    context: dg.AssetExecutionContext,
    platform: PlatformSettings,
    patient_splits: pd.DataFrame,
    lung_segmenter: seg.TrainedSegmenter,
    lung_segmentation_evaluation: dict,
    lung_segmenter_onnx: dict,
) -> dg.Output[dict]:
    """The exported segmenter as a version of its own registered model, with its card and test
    report; the gate (Dice floor, parity, no loss against production on the same patients)
    promotes it to production or records the refusal."""
    settings = platform.settings()
    training, registry_settings = settings.training, settings.registry
    json_path, markdown_path = seg.report_paths(training, lung_segmenter.mlflow_run_id)
    report = json.loads(json_path.read_text())
    onnx_path = Path(lung_segmenter_onnx["onnx"])
    summary = lung_segmentation_evaluation
    release = release_segmenter(
        lung_registry_for(registry_settings),
        onnx_path,
        {key: report[key] for key in ("split", "summary", "by_group")},
        markdown_path.read_text(),
        run_id=lung_segmenter.mlflow_run_id,
        tags=VersionTags(
            model_name=SEGMENTER_MODEL_NAME,
            arch=SEGMENTER_ARCH,
            preprocessing=segmenter_metadata(onnx_path)["preprocessing"],
            data_version=manifest_hash(patient_splits),
            data_dir=str(training.data_dir) if training.data_dir else None,
            git_commit=git_commit(),
            metrics={
                "test_dice_mean": summary["dice_mean"],
                "test_dice_p5": summary["dice_p5"],
                "test_hd95_px_mean": summary["hd95_px_mean"],
            },
        ),
        floor=training.dice_floor,
        parity=lung_segmenter_onnx["parity"],
        masks_dir=lung_segmenter.masks_dir,
        triggered_by=f"dagster run {context.run.run_id}",
    )
    decision = release.decision
    return dg.Output(
        {"version": release.version.version, "gate": decision.to_dict()},
        metadata=readable(
            {
                "registered_model": registry_settings.registry_lung_model_name,
                "version": release.version.version,
                "aliases": ", ".join(release.version.aliases) or "(none)",
                "gate_passed": decision.passed,
                "gate": dg.MetadataValue.json(decision.to_dict()),
                "model_card": dg.MetadataValue.md(release.card),
            }
        ),
    )


def relevance_in_lungs_key(arch: str) -> dg.AssetKey:
    return dg.AssetKey([arch, "relevance_in_lungs"])


def _relevance_in_lungs_asset(arch: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=relevance_in_lungs_key(arch),
        group_name=GROUP,
        kinds={"pytorch"},
        ins={
            "trained_model": dg.AssetIn(trained_model_key(arch)),
            "evaluation_report": dg.AssetIn(evaluation_report_key(arch)),
            "preprocessed_cache": dg.AssetIn(dg.AssetKey("preprocessed_cache")),
            "lung_segmenter": dg.AssetIn(dg.AssetKey("lung_segmenter")),
        },
        description=f"{arch}: the share of its Grad-CAM relevance inside the lung fields on "
        "every test image, by class, the images where the least lies on the lungs, and the "
        "Grad-CAM gallery's cases with their fields and shares.",
    )
    def relevance_in_lungs(
        platform: PlatformSettings,
        trained_model: TrainedModel,
        evaluation_report: EvaluationReport,
        preprocessed_cache: PreprocessedCache,
        lung_segmenter: seg.TrainedSegmenter,
    ) -> dg.Output[dict]:
        training = platform.settings().training
        segmenter, preprocessing = seg.load_segmenter(lung_segmenter.checkpoint)
        report = measure_lung_relevance(
            Checkpoint.load(trained_model.checkpoint),
            segmenter,
            preprocessing,
            preprocessed_cache,
            training.reports_dir / "relevance-in-lungs" / trained_model.model_name,
            model_name=trained_model.model_name,
            operating_point=evaluation_report.operating_point,
        )
        summary = report.summary
        return dg.Output(
            {
                "summary": summary,
                "by_class": report.by_class,
                "gallery_cases": report.gallery_cases,
            },
            metadata=readable(
                {
                    "median_share_in_lungs": summary.get("median"),
                    "p10_share_in_lungs": summary.get("p10"),
                    "mostly_outside": summary.get("mostly_outside"),
                    "images": summary["images"],
                    "lung_fields_run": lung_segmenter.mlflow_run_id,
                    "report": dg.MetadataValue.md(report.markdown()),
                    "least_in_lungs": dg.MetadataValue.md(
                        png_markdown(report.picture, "least relevance in the lungs")
                    ),
                    "gallery_on_lungs": dg.MetadataValue.md(
                        png_markdown(report.gallery, "the Grad-CAM gallery's cases on the lungs")
                    ),
                }
            ),
        )

    return relevance_in_lungs


def build_segmentation_definitions(archs: tuple[str, ...] = ()) -> dg.Definitions:
    """``archs``: the classifiers whose heatmaps are measured against the lung fields."""
    return dg.Definitions(
        assets=[
            lung_field_masks,
            lung_segmenter,
            lung_segmentation_evaluation,
            lung_segmenter_onnx,
            lung_fields_version,
            *(_relevance_in_lungs_asset(arch) for arch in archs),
        ],
        asset_checks=[dice_floor],
    )

"""The lung segmentation version as the platform runs it: trained on the classifier's own
patient split, tracked in MLflow, evaluated on patients it never saw, stored under the home.

Shared by the Dagster assets and the benchmark so both produce the same runs and files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.lung_masks import LungMaskCache
from cxr_platform.data.patients import file_name_family
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.models.checkpoint import file_sha256
from cxr_platform.models.reporting import image_grid, save_figure
from cxr_platform.models.segmentation import (
    LungSegmenter,
    SegmentationConfig,
    SegmentationEpoch,
    SegmentationError,
    SegmentationReport,
    evaluate_masks,
    predict_lung_logits,
    train_segmenter,
)
from cxr_platform.models.training import select_device
from cxr_platform.provenance import git_commit
from cxr_platform.sections import TrackedSection, TrainingSection
from cxr_platform.tracking import ExperimentTracker

SEGMENTER_NAME = "lung_unet"
CHECKPOINT_KIND = "lung_segmentation"
# The demo's synthetic lungs are two smooth ellipses: a narrow U-Net learns them in a few epochs.
# Real lung fields (the heart border, the costophrenic angles) take the wider one and longer.
_PROFILES: dict[str, dict[str, Any]] = {
    "demo": {"channels": (8, 16, 32, 64), "working_size": 64, "epochs": 5, "patience": 2},
    "full": {"channels": (16, 32, 64, 128), "working_size": 112, "epochs": 10, "patience": 3},
}


def segmentation_config_for(
    training: TrainingSection, *, image_size: int, **overrides: Any
) -> SegmentationConfig:
    """The profile's recipe, working no finer than the images it is given."""
    values: dict[str, Any] = {**_PROFILES.get(training.profile, _PROFILES["full"])}
    values["seed"] = training.seed
    if training.lung_segmentation_epochs is not None:
        values["epochs"] = training.lung_segmentation_epochs
    values.update({k: v for k, v in overrides.items() if v is not None})
    step = 2 ** (len(values["channels"]) - 1)
    values["working_size"] = max(step, min(values["working_size"], image_size) // step * step)
    return SegmentationConfig(**values)


@dataclass(frozen=True)
class TrainedSegmenter:
    """A finished segmentation training run: its checkpoint and how it got there."""

    checkpoint: Path
    checkpoint_sha256: str
    mlflow_run_id: str
    profile: str
    best_epoch: int
    best_val_dice: float
    epochs_run: int
    train_images: int
    val_images: int
    wall_seconds: float
    train_images_per_s: float
    masks_dir: str
    history: list[dict[str, Any]]


def _masked(
    cache: PreprocessedCache, masks: LungMaskCache, split: str
) -> tuple[np.ndarray, np.ndarray]:
    rows = masks.rows(split)
    return np.asarray(cache.images(split)[rows]), np.asarray(masks.masks(split), dtype=bool)


def save_segmenter(
    path: Path, result_model: LungSegmenter, config: SegmentationConfig, preprocessing: dict
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "kind": CHECKPOINT_KIND,
            "state_dict": result_model.state_dict(),
            "config": config.to_dict(),
            "preprocessing": preprocessing,
        },
        tmp,
    )
    tmp.replace(path)  # written once, whole: a reader never sees half a checkpoint
    return path


def load_segmenter(path: str | Path) -> tuple[LungSegmenter, PreprocessingConfig]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("kind") != CHECKPOINT_KIND:
        raise SegmentationError(f"{path} is not a lung segmentation checkpoint")
    model = LungSegmenter(SegmentationConfig.from_dict(saved["config"]))
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, PreprocessingConfig.from_dict(saved["preprocessing"])


def train_segmenter_tracked(
    training: TrainingSection,
    cache: PreprocessedCache,
    masks: LungMaskCache,
    config: SegmentationConfig,
    *,
    manifest_hash: str | None = None,
    dagster_run_id: str | None = None,
    on_epoch: Callable[[str], None] | None = None,
) -> TrainedSegmenter:
    """Train on the masked images of the cache's train split, stop early on its val split."""
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    train_images, train_masks = _masked(cache, masks, "train")
    val_images, val_masks = _masked(cache, masks, "val")
    training.ensure_dirs()
    tracker = ExperimentTracker(
        training.tracking_uri, artifact_root=training.mlflow_dir / "artifacts"
    )
    run = tracker.start_run(
        f"{SEGMENTER_NAME}-{training.profile}",
        {
            "cxr.kind": CHECKPOINT_KIND,
            "cxr.arch": SEGMENTER_NAME,
            "cxr.profile": training.profile,
            "cxr.manifest_hash": manifest_hash,
            "cxr.git_commit": git_commit(),
            "cxr.masks_dir": str(masks.masks_root),
            "dagster.run_id": dagster_run_id,
        },
    )
    run.log_params(
        {
            **config.to_dict(),
            "preprocessing": preprocessing.to_dict(),
            "n_train": len(train_images),
            "n_val": len(val_images),
        }
    )

    def report(epoch: SegmentationEpoch, improved: bool) -> None:
        run.log_metrics(
            {"train_loss": epoch.train_loss, "val_dice": epoch.val_dice}, step=epoch.epoch
        )
        if on_epoch is not None:
            on_epoch(
                f"epoch {epoch.epoch}/{config.epochs}: loss {epoch.train_loss:.4f}, "
                f"val Dice {epoch.val_dice:.4f}{' (best)' if improved else ''}, "
                f"{epoch.seconds:.0f} s"
            )

    started = time.perf_counter()
    try:
        result = train_segmenter(
            config,
            preprocessing,
            train_images,
            train_masks,
            val_images,
            val_masks,
            device=select_device(training.device),
            on_epoch=report,
        )
        checkpoint = save_segmenter(
            training.models_dir / SEGMENTER_NAME / run.run_id / "best.pt",
            result.model,
            config,
            preprocessing.to_dict(),
        )
    except BaseException:
        run.finish("FAILED")
        raise
    wall = time.perf_counter() - started
    epochs_run = len(result.history)
    trained = TrainedSegmenter(
        checkpoint=checkpoint,
        checkpoint_sha256=file_sha256(checkpoint),
        mlflow_run_id=run.run_id,
        profile=training.profile,
        best_epoch=result.best_epoch,
        best_val_dice=result.best_val_dice,
        epochs_run=epochs_run,
        train_images=len(train_images),
        val_images=len(val_images),
        wall_seconds=wall,
        train_images_per_s=len(train_images) * epochs_run / max(result.train_seconds, 1e-9),
        masks_dir=str(masks.masks_root),
        history=[asdict(epoch) for epoch in result.history],
    )
    run.log_metrics(
        {"best_val_dice": trained.best_val_dice, "train_images_per_s": trained.train_images_per_s}
    )
    run.log_artifact(checkpoint)
    run.finish()
    return trained


@dataclass(frozen=True)
class SegmentationEvaluation:
    report: SegmentationReport
    json_path: Path
    markdown_path: Path
    worst_cases_path: Path


def segmentation_markdown(report: SegmentationReport, trained: TrainedSegmenter) -> str:
    s = report.summary
    ci = s.get("dice_mean_ci", [float("nan")] * 2)
    hd_ci = s.get("hd95_px_mean_ci", [float("nan")] * 2)
    lines = [
        f"## Lung segmentation on the {report.split} split",
        "",
        f"{s['images']} images of {s['patients']} patients the version never saw (the "
        "classifier's own patient split); masks from "
        f"`{Path(trained.masks_dir).name}`.",
        "",
        f"- **Dice {s['dice_mean']:.4f}** (95% CI {ci[0]:.4f}-{ci[1]:.4f}, patients resampled), "
        f"median {s['dice_median']:.4f}, 5th percentile {s['dice_p5']:.4f}, "
        f"worst {s['dice_min']:.4f}",
        f"- **HD95 {s['hd95_px_mean']:.2f} px** at {_side(report)} px "
        f"(95% CI {hd_ci[0]:.2f}-{hd_ci[1]:.2f}), median {s['hd95_px_median']:.2f}, "
        f"95th percentile {s['hd95_px_p95']:.2f}. In millimetres: not measured, the images' "
        "pixel spacing is not carried with the split.",
        f"- Trained {trained.epochs_run} epochs (best {trained.best_epoch}, val Dice "
        f"{trained.best_val_dice:.4f}) on {trained.train_images} images in "
        f"{trained.wall_seconds:.0f} s.",
        "",
    ]
    for column, title in (("label", "class"), ("family", "file family")):
        groups = report.by_group.get(column)
        if not groups:
            continue
        lines += [
            f"| {title} | images | patients | Dice mean (95% CI) | Dice p5 | HD95 px mean |",
            "| --- | ---: | ---: | --- | ---: | ---: |",
        ]
        for name, g in sorted(groups.items()):
            gci = g.get("dice_mean_ci", [float("nan")] * 2)
            lines.append(
                f"| {name} | {g['images']} | {g['patients']} | {g['dice_mean']:.4f} "
                f"({gci[0]:.4f}-{gci[1]:.4f}) | {g['dice_p5']:.4f} | {g['hd95_px_mean']:.2f} |"
            )
        lines.append("")
    lines += [
        "Worst ten by Dice:",
        "",
        "| image | class | Dice | HD95 px |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in report.worst(10).itertuples():
        lines.append(
            f"| `{row.relative_path}` | {row.label} | {row.dice:.4f} | {row.hd95_px:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _side(report: SegmentationReport) -> int:
    return int(report.summary.get("image_size", 224))


def plot_worst_cases(
    images: np.ndarray,
    truth: np.ndarray,
    predicted: np.ndarray,
    report: SegmentationReport,
    path: Path,
    n: int = 10,
) -> Path:
    """Each of the worst cases: the image with the reference border (green) and the predicted
    one (red), so a reader sees at once whether the miss is the network's or the mask's."""
    worst = report.worst(n)
    fig, axes = image_grid(len(worst), columns=5, cell=(3.0, 3.3))
    for ax, (position, row) in zip(axes, worst.iterrows(), strict=False):
        ax.imshow(images[position], cmap="gray", vmin=0, vmax=255)
        ax.contour(truth[position], levels=[0.5], colors="lime", linewidths=1.0)
        if predicted[position].any():
            ax.contour(predicted[position], levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(
            f"{Path(row['relative_path']).name}\nDice {row['dice']:.3f}, HD95 {row['hd95_px']:.0f}",
            fontsize=7,
        )
    fig.suptitle("Worst by Dice: reference (green), predicted (red)", fontsize=9)
    return save_figure(fig, path, dpi=90)


def report_paths(store: TrackedSection, run_id: str, split: str = "test") -> tuple[Path, Path]:
    """Where a segmentation run's report on ``split`` lives: its JSON and its Markdown."""
    folder = store.reports_dir / "segmentation" / run_id
    return folder / f"{split}.json", folder / f"{split}.md"


def evaluate_segmenter_on(
    trained: TrainedSegmenter,
    cache: PreprocessedCache,
    masks: LungMaskCache,
    store: TrackedSection,
    *,
    split: str = "test",
    n_bootstrap: int = 1000,
) -> SegmentationEvaluation:
    """The evaluation report of a trained segmenter on ``split``: JSON, Markdown and the worst
    cases as a picture under the home's reports, the headline figures in its MLflow run."""
    if file_sha256(trained.checkpoint) != trained.checkpoint_sha256:
        raise SegmentationError(f"{trained.checkpoint} changed after training wrote it")
    model, preprocessing = load_segmenter(trained.checkpoint)
    images, truth = _masked(cache, masks, split)
    index = cache.index(split).iloc[masks.rows(split)].reset_index(drop=True)
    predicted = predict_lung_logits(model, images, preprocessing) > 0
    report = evaluate_masks(
        predicted,
        truth,
        index,
        split=split,
        family=file_name_family,
        n_bootstrap=n_bootstrap,
        seed=store.seed,
    )
    json_path, markdown_path = report_paths(store, trained.mlflow_run_id, split)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report.to_dict(), indent=1))
    markdown_path.write_text(segmentation_markdown(report, trained))
    worst_path = plot_worst_cases(
        images, truth, predicted, report, json_path.with_name(f"{split}-worst.png")
    )
    run = ExperimentTracker(store.tracking_uri).client
    metrics = {
        f"{split}_dice_mean": report.summary["dice_mean"],
        f"{split}_dice_p5": report.summary["dice_p5"],
        f"{split}_hd95_px_mean": report.summary["hd95_px_mean"],
    }
    for key, value in metrics.items():
        run.log_metric(trained.mlflow_run_id, key, float(value))
    for path in (json_path, markdown_path, worst_path):
        run.log_artifact(trained.mlflow_run_id, str(path), "evaluation")
    return SegmentationEvaluation(report, json_path, markdown_path, worst_path)

"""Does cropping the classifier's input to the lung fields help it at another site? Measured.

Two baseline CNNs are trained on the platform's patient-level split of the shared Kaggle
training folder, under the same recipe (the ``full`` profile, same seed, same epoch budget):

- ``current``: the prepared square as the platform feeds it today;
- ``lung-crop``: every image (train, validation, and each stand-in at scoring time) cut to the
  square around the lung fields a segmentation version predicts on it, with a margin
  (``model_version/lung_fields.lung_crop_boxes``), and brought back to the full square.

The segmenter is an exported lung fields version (``lung_segmenter.onnx``) trained on the same
patient split, so the test patients are new to both networks. Each candidate's operating point
(Platt calibration, the highest specificity at sensitivity >= 0.95) is fitted on its own
validation split and frozen. Stand-ins for another site, all from the held-out test split:
the split as acquired, the NORMAL2-IM family's normals beside every test pneumonia image, the
five acquisition shifts of ``models/robustness.py``, and the two field shifts (a crop and a
collimation at severity 0.5: images with part of the lungs out of the picture). For a shifted
stand-in the crop candidate segments the shifted image, as serving would.

Per stand-in: each candidate's AUC and its sensitivity and specificity at its frozen threshold,
and the paired AUC difference (lung-crop minus current, whole patients resampled, 95%
interval) and specificity difference.

    CXR_HOME=<home> .venv/bin/python benchmarks/lung_crop_recipe.py \\
        --data-dir ../shared/data/kaggle-chest-xray-224 \\
        --segmenter <folder holding lung_segmenter.onnx> [--epochs 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from ensemble_search import StandIn, logits_of, paired_auc_difference, stand_ins

from cxr_platform.data.pipeline import prepare
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.transforms import TensorBatches
from cxr_platform.model_version.lung_fields import (
    CROP_MARGIN,
    LungFieldModel,
    crop_to_boxes,
    lung_crop_boxes,
)
from cxr_platform.models.evaluation import (
    ThresholdRule,
    fit_operating_point,
    mann_whitney_auc,
    threshold_metrics,
)
from cxr_platform.models.robustness import shifted_split
from cxr_platform.models.training import (
    TrainingData,
    load_checkpoint,
    model_from_checkpoint,
    select_device,
    train,
    training_profile,
    with_epochs,
)
from cxr_platform.provenance import git_commit
from cxr_platform.settings import CxrSettings

FIELD_STAND_INS = {"crop": 0.5, "collimation": 0.5}
BATCH = 64


def cropped(segmenter: LungFieldModel, images: np.ndarray, margin: float) -> np.ndarray:
    masks = np.concatenate(
        [
            np.stack([fields.mask for fields in segmenter.fields(images[start : start + BATCH])])
            for start in range(0, len(images), BATCH)
        ]
    )
    return crop_to_boxes(images, lung_crop_boxes(masks, margin=margin))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--segmenter", type=Path, required=True)
    parser.add_argument("--arch", default="baseline_cnn")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--margin", type=float, default=CROP_MARGIN)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("lung_crop_recipe.json"))
    args = parser.parse_args()

    settings = CxrSettings(data_dir=args.data_dir, device="cpu")
    _, cache = prepare(settings.data, progress=False)
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    segmenter = LungFieldModel(args.segmenter, model_version="benchmark")
    if not segmenter.fits(preprocessing):
        raise SystemExit(
            "the segmenter's square is not the classifier's: its fields would not line up"
        )
    device = select_device("cpu")
    print(
        f"{args.arch}, {args.epochs} epochs max, patience {args.patience}, crop margin "
        f"{args.margin}; {platform.machine()}, {torch.get_num_threads()} threads; "
        f"commit {git_commit()}",
        flush=True,
    )

    started = time.perf_counter()
    splits = {split: cache.images(split, mmap=False) for split in ("train", "val")}
    crops = {split: cropped(segmenter, images, args.margin) for split, images in splits.items()}
    crop_seconds = time.perf_counter() - started
    count = sum(len(images) for images in splits.values())
    print(f"segment and crop: {count} images in {crop_seconds:.1f} s", flush=True)

    inputs = {
        "current": {split: images for split, images in splits.items()},
        "lung-crop": crops,
    }
    models, points, train_seconds, best_epochs = {}, {}, {}, {}
    for name, images in inputs.items():
        data = TrainingData(
            train=TensorBatches(images["train"], cache.labels("train"), preprocessing),
            val=TensorBatches(images["val"], cache.labels("val"), preprocessing),
        )
        config = with_epochs(
            training_profile("full", args.arch, device="cpu", patience=args.patience), args.epochs
        )
        began = time.perf_counter()
        result = train(
            config, data, settings.home / "lung_crop_recipe" / args.arch / name, progress=False
        )
        train_seconds[name] = time.perf_counter() - began
        best_epochs[name] = f"{result.best_epoch} / {len(result.history)}"
        model = model_from_checkpoint(load_checkpoint(result.best_checkpoint)).to(device).eval()
        val_logits = logits_of(model, images["val"], cache.labels("val"), preprocessing)
        models[name] = model
        points[name] = fit_operating_point(cache.labels("val"), val_logits, ThresholdRule())
        print(
            f"{name}: best epoch {best_epochs[name]}, {train_seconds[name]:.0f} s, val AUC "
            f"{result.best_val_auc:.4f}",
            flush=True,
        )

    test = stand_ins(cache)
    patients = test[0].patients
    for shift, severity in FIELD_STAND_INS.items():
        test.append(
            StandIn(
                f"{shift} {severity}",
                shifted_split(test[0].images, shift, severity),
                test[0].labels,
                patients,
            )
        )
    rows = []
    for stand_in in test:
        logits = {
            "current": logits_of(
                models["current"], stand_in.images, stand_in.labels, preprocessing
            ),
            "lung-crop": logits_of(
                models["lung-crop"],
                cropped(segmenter, stand_in.images, args.margin),
                stand_in.labels,
                preprocessing,
            ),
        }
        row: dict = {"stand_in": stand_in.name, "images": len(stand_in.labels)}
        for name, values in logits.items():
            positives, negatives = values[stand_in.labels == 1], values[stand_in.labels == 0]
            metrics = threshold_metrics(
                stand_in.labels, points[name].probabilities(values), points[name].threshold
            )
            row[name] = {
                "auc": mann_whitney_auc(positives, negatives),
                "sensitivity": metrics["sensitivity"],
                "specificity": metrics["specificity"],
            }
        difference, low, high = paired_auc_difference(
            stand_in.labels,
            stand_in.patients,
            logits["lung-crop"],
            logits["current"],
            args.bootstrap,
        )
        row["auc_difference"] = {"value": difference, "ci": [low, high]}
        row["specificity_difference"] = (
            row["lung-crop"]["specificity"] - row["current"]["specificity"]
        )
        rows.append(row)
        print(
            f"{stand_in.name:<16} current {row['current']['auc']:.4f} "
            f"{row['current']['sensitivity']:.3f}/{row['current']['specificity']:.3f} | "
            f"lung-crop {row['lung-crop']['auc']:.4f} "
            f"{row['lung-crop']['sensitivity']:.3f}/{row['lung-crop']['specificity']:.3f} | "
            f"AUC diff {difference:+.4f} ({low:+.4f}, {high:+.4f})",
            flush=True,
        )

    print(
        "\n| stand-in | images | current AUC | current sens / spec | lung-crop AUC | "
        "lung-crop sens / spec | AUC difference (95% CI) | spec difference |"
    )
    print("|---|---:|---:|---|---:|---|---|---:|")
    for row in rows:
        current, crop = row["current"], row["lung-crop"]
        low, high = row["auc_difference"]["ci"]
        print(
            f"| {row['stand_in']} | {row['images']} | {current['auc']:.4f} | "
            f"{current['sensitivity']:.3f} / {current['specificity']:.3f} | {crop['auc']:.4f} | "
            f"{crop['sensitivity']:.3f} / {crop['specificity']:.3f} | "
            f"{row['auc_difference']['value']:+.4f} ({low:+.4f} to {high:+.4f}) | "
            f"{row['specificity_difference']:+.3f} |"
        )
    args.out.write_text(
        json.dumps(
            {
                "commit": git_commit(),
                "arch": args.arch,
                "epochs": args.epochs,
                "margin": args.margin,
                "train_seconds": train_seconds,
                "best_epochs": best_epochs,
                "crop_seconds_train_val": crop_seconds,
                "operating_points": {name: point.to_dict() for name, point in points.items()},
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

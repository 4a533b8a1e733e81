"""The lung segmentation version on real masks, run on the code path the Dagster assets run.

The shared Kaggle training folder, split by patient exactly as the platform splits it (the
classifier's own split), with the shared lung-field masks joined to it: the full profile's U-Net
trained on the train split's masks, stopped early on val's Dice, and judged on the test split's
patients, which it never saw. Prints train time, Dice and HD95 (overall, by class, by file
family, with patient-level intervals), the worst cases, and the CPU cost of one image; then

  - Dice on the test split under each acquisition shift of the robustness benchmark;
  - the "lungs in the picture" findings, with limits fitted on val's fields as the export fits
    them: how often each flags the test split, and test images cropped or collimated;
  - with ``--classifier CHECKPOINT`` (a classifier trained on the same split, such as the main
    job's): the share of its Grad-CAM relevance inside the lung fields on every test image,
    with the predicted fields and with the reference masks, so the figure the platform can make
    on any image is checked against the one only annotated images allow.

``--segmenter CHECKPOINT`` judges a segmenter trained earlier instead of training one.

    .venv/bin/python benchmarks/lung_segmentation.py [--home HOME] [--epochs N]
        [--segmenter CHECKPOINT] [--classifier CHECKPOINT]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from cxr_platform.data import pipeline as data_pipeline
from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8, to_square_uint8
from cxr_platform.data.shifts import FIELD_SHIFT_NAMES, apply_shift
from cxr_platform.deployment.segmentation_export import export_segmenter_onnx, segmenter_parity
from cxr_platform.explain.gradcam import heatmaps_for_uint8
from cxr_platform.model_version.files import onnx_session
from cxr_platform.model_version.lung_fields import (
    FINDINGS,
    SEGMENTER_INPUT,
    field_measures,
    fit_field_limits,
    relevance_inside,
)
from cxr_platform.models import segmentation_pipeline as seg
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.robustness import ROBUSTNESS_SHIFTS
from cxr_platform.models.segmentation import dice_scores, predict_lung_logits
from cxr_platform.settings import load_settings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _latency_ms(model, images: np.ndarray, preprocessing, batch: int, repeats: int) -> float:
    predict_lung_logits(model, images[:batch], preprocessing, batch_size=batch)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        predict_lung_logits(model, images[:batch], preprocessing, batch_size=batch)
    return (time.perf_counter() - started) / (repeats * batch) * 1000


def _onnx_latency_ms(path, images, preprocessing, batch: int, repeats: int) -> float:
    session = onnx_session(path)
    inputs = normalize_uint8(images[:batch], preprocessing)[:, None]
    session.run(None, {SEGMENTER_INPUT: inputs})  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {SEGMENTER_INPUT: inputs})
    return (time.perf_counter() - started) / (repeats * batch) * 1000


def _shifted_dice(model, images, truth, preprocessing) -> None:
    print("\nDice under the robustness benchmark's acquisition shifts (test split):")
    print("| shift | severity | Dice mean | Dice p5 |\n| --- | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for shift, severity in {"none": 1.0, **ROBUSTNESS_SHIFTS}.items():
        shifted = np.stack(
            [
                to_square_uint8(
                    apply_shift(image / 255.0, shift, severity=severity, rng=rng), preprocessing
                )
                for image in images
            ]
        )
        dice = dice_scores(predict_lung_logits(model, shifted, preprocessing) > 0, truth)
        print(f"| {shift} | {severity} | {dice.mean():.4f} | {np.percentile(dice, 5):.4f} |")


def _field_quality(model, cache, preprocessing) -> None:
    """The "lungs in the picture" findings as the export fits them (on val's predicted fields),
    judged on the test split as it is and under the two field shifts of data/shifts.py."""
    val = np.asarray(cache.images("val"))
    limits = fit_field_limits(
        field_measures(predict_lung_logits(model, val, preprocessing) > 0), split="val"
    )
    print(f"\nfield limits fitted on val: {json.dumps(limits.to_dict())}")
    print("| images | severity | any finding | " + " | ".join(FINDINGS) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(FINDINGS))
    test = np.asarray(cache.images("test"))
    rng = np.random.default_rng(0)
    cases = [("val", None), ("test", None)]
    cases += [(shift, severity) for shift in FIELD_SHIFT_NAMES for severity in (0.5, 1.0)]
    for name, severity in cases:
        images = val if name == "val" else test
        if severity is not None:
            images = np.stack(
                [
                    to_square_uint8(
                        apply_shift(image / 255.0, name, severity=severity, rng=rng), preprocessing
                    )
                    for image in test
                ]
            )
        measures = field_measures(predict_lung_logits(model, images, preprocessing) > 0)
        found = [limits.findings(measures, i) for i in range(len(images))]
        share = {key: np.mean([key in f for f in found]) for key in FINDINGS}
        label = name if severity is None else f"test, {name}"
        print(
            f"| {label} | {severity or '-'} | {np.mean([bool(f) for f in found]):.3f} | "
            + " | ".join(f"{share[key]:.3f}" for key in FINDINGS)
            + " |"
        )


def _relevance(classifier_path, cache, masks, segmenter, preprocessing) -> None:
    checkpoint = Checkpoint.load(classifier_path)
    if checkpoint.preprocessing_config != preprocessing:
        raise SystemExit("the classifier was trained with other preprocessing than this cache")
    images = np.asarray(cache.images("test"))
    started = time.perf_counter()
    heatmaps = heatmaps_for_uint8(checkpoint.bare_model(), checkpoint.arch, images, preprocessing)
    cam_s = time.perf_counter() - started
    predicted = predict_lung_logits(segmenter, images, preprocessing) > 0
    rows = masks.rows("test")
    shares = {
        "predicted fields, every test image": relevance_inside(heatmaps, predicted),
        "reference masks, test images with one": relevance_inside(
            heatmaps[rows], np.asarray(masks.masks("test"))
        ),
    }
    labels = cache.index("test")["label"].to_numpy()
    print(
        f"\nGrad-CAM relevance inside the lung fields ({checkpoint.arch}, "
        f"{len(images)} test images, Grad-CAM {cam_s:.0f} s):"
    )
    print("| lungs from | images | median | 10th pct | most outside (< 0.5) | no relevance |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, share in shares.items():
        finite = share[np.isfinite(share)]
        print(
            f"| {name} | {len(share)} | {np.median(finite):.3f} | "
            f"{np.percentile(finite, 10):.3f} | {int((finite < 0.5).sum())} | "
            f"{int((~np.isfinite(share)).sum())} |"
        )
    every = shares["predicted fields, every test image"]
    for label in ("NORMAL", "PNEUMONIA"):
        part = every[(labels == label) & np.isfinite(every)]
        print(f"  {label}: median {np.median(part):.3f}, most outside {int((part < 0.5).sum())}")
    agree = every[rows] - shares["reference masks, test images with one"]
    agree = agree[np.isfinite(agree)]
    print(
        f"  predicted vs reference fields, per image: mean |difference| "
        f"{np.abs(agree).mean():.3f}, 95th pct {np.percentile(np.abs(agree), 95):.3f}"
    )
    worst = np.argsort(np.nan_to_num(every, nan=2.0))[:10]
    names = cache.index("test")["relative_path"].to_numpy()
    print("  least inside: " + ", ".join(f"{names[i]} {every[i]:.2f}" for i in worst))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/cxr-lung-segmentation"))
    parser.add_argument("--data", type=Path, default=SHARED / "kaggle-chest-xray-224")
    parser.add_argument("--masks", type=Path, default=SHARED / "kaggle-lung-masks-224")
    parser.add_argument("--epochs", type=int, default=None, help="default: the full profile's")
    parser.add_argument("--segmenter", type=Path, help="judge this checkpoint, do not train")
    parser.add_argument("--classifier", type=Path, help="measure its relevance in the lungs")
    args = parser.parse_args()

    settings = load_settings(
        home=args.home,
        data_dir=args.data,
        lung_mask_dir=args.masks,
        lung_segmentation_epochs=args.epochs,
    )
    started = time.perf_counter()
    manifest, cache = data_pipeline.prepare(settings.data, progress=False)
    masks = data_pipeline.lung_masks(cache, settings.data, progress=False)
    assert masks is not None
    prepared_s = time.perf_counter() - started
    print(f"data and masks: {prepared_s:.0f} s; coverage {masks.coverage()}", flush=True)

    config = seg.segmentation_config_for(
        settings.training, image_size=int(cache.preprocessing["image_size"])
    )
    print(f"recipe: {json.dumps(config.to_dict())}", flush=True)
    if args.segmenter is None:
        trained = seg.train_segmenter_tracked(
            settings.training, cache, masks, config, on_epoch=lambda line: print(line, flush=True)
        )
        evaluation = seg.evaluate_segmenter_on(trained, cache, masks, settings.training)
        print(evaluation.markdown_path.read_text())
        print(f"report: {evaluation.json_path}\nworst cases: {evaluation.worst_cases_path}")
        checkpoint = trained.checkpoint
        print(
            f"train: {trained.wall_seconds / 60:.1f} min for {trained.epochs_run} epochs "
            f"(best {trained.best_epoch}, val Dice {trained.best_val_dice:.4f}), "
            f"{trained.train_images_per_s:.1f} images/s, {trained.train_images} images"
        )
    else:
        checkpoint = args.segmenter
    model, preprocessing = seg.load_segmenter(checkpoint)
    assert isinstance(preprocessing, PreprocessingConfig)
    rows = masks.rows("test")
    _shifted_dice(
        model,
        np.asarray(cache.images("test"))[rows],
        np.asarray(masks.masks("test")),
        preprocessing,
    )
    _field_quality(model, cache, preprocessing)
    if args.classifier is not None:
        _relevance(args.classifier, cache, masks, model, preprocessing)

    images = np.asarray(cache.images("test")[:64])
    single = _latency_ms(model, images, preprocessing, batch=1, repeats=30)
    batched = _latency_ms(model, images, preprocessing, batch=32, repeats=2)
    onnx_path = export_segmenter_onnx(
        model, preprocessing, args.home / "benchmark-export" / "lung_segmenter.onnx", metadata={}
    )
    parity = segmenter_parity(model, onnx_path, images, preprocessing)
    onnx_single = _onnx_latency_ms(onnx_path, images, preprocessing, batch=1, repeats=30)
    onnx_batched = _onnx_latency_ms(onnx_path, images, preprocessing, batch=32, repeats=2)
    parameters = sum(p.numel() for p in model.parameters())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; commit {commit}"
    )
    print(
        f"inference (PyTorch, CPU): {single:.1f} ms/image alone, {batched:.1f} ms/image in "
        f"batches of 32; {parameters:,} parameters"
    )
    print(
        f"inference (ONNX Runtime, CPU): {onnx_single:.1f} ms/image alone, {onnx_batched:.1f} "
        f"ms/image in batches of 32; parity on {parity.n_images} test images: max |logit "
        f"difference| {parity.max_abs_logit_diff:.2e}, pixels flipped {parity.pixels_flipped:.1e}"
    )


if __name__ == "__main__":
    main()

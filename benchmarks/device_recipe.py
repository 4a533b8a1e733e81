"""One training recipe run from a folder of images to held-out figures, on the torch stack alone.

What the accelerator machine can run: it has torch, torchvision, numpy, pandas, scikit-learn,
scipy, Pillow and matplotlib but no MLflow, Dagster, pydicom or pydantic, so this calls the
library's data and training functions directly (the platform's own discovery, patient split,
cache, ``train()`` and evaluation; no tracking). ``cxr_platform_tests/test_device_recipe.py``
runs it under an import hook that refuses every other package.

Timed from the cache to the evaluation, as ``train_throughput.py --full-run`` does through the
tracked pipeline: prints one JSON object and, with ``--out``, writes it there.

    PYTHONPATH=. python3 benchmarks/device_recipe.py DATA_DIR [--arch resnet18] [--profile full]
        [--epochs N] [--batch-size N] [--size 224] [--device auto] [--compile]
        [--workers N] [--home DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cxr_platform.data.pipeline import prepare
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.transforms import TensorBatches
from cxr_platform.models.evaluation import evaluate_predictions
from cxr_platform.models.robustness import robustness_scores
from cxr_platform.models.training import (
    TrainingData,
    load_checkpoint,
    predict_logits,
    scoring_model,
    select_device,
    train,
    training_profile,
    with_epochs,
)
from cxr_platform.provenance import git_commit
from cxr_platform.sections import TRAINING_PROFILES, DataSection


def hardware(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
        facts["cudnn"] = torch.backends.cudnn.version()
    return facts


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = select_device(args.device)
    # The platform's own data stages (and its split checks), its seed and split ratios.
    section = DataSection(
        home=args.home or Path(tempfile.mkdtemp(prefix="cxr-home-")),
        data_dir=args.data.resolve(),
        image_size=args.size,
        workers=args.workers,
    )
    started = time.perf_counter()
    _, cache = prepare(section, progress=False)
    cached = time.perf_counter()

    overrides: dict[str, Any] = {"device": str(device), "compile": args.compile}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.arch != "baseline_cnn":
        overrides["pretrained"] = "auto"  # offline machines fall back to scratch, and say so
    config = training_profile(args.profile, args.arch, **overrides)
    if args.epochs:
        config = with_epochs(config, args.epochs)
    data = TrainingData.from_cache(cache, device)
    with tempfile.TemporaryDirectory(prefix="cxr-run-") as out_dir:
        result = train(config, data, out_dir, progress=False)
        trained = time.perf_counter()
        model = scoring_model(load_checkpoint(result.best_checkpoint)).to(device)
        val = TensorBatches.from_cache(cache, "val", device=device)
        test = TensorBatches.from_cache(cache, "test", device=device)
        report = evaluate_predictions(
            arch=args.arch,
            model_name=args.arch,
            val=(val.labels_np, predict_logits(model, val)),
            test=(test.labels_np, predict_logits(model, test)),
            seed=section.seed,
        )
        shifted = robustness_scores(
            model,
            cache.images("test", mmap=False),
            cache.labels("test"),
            PreprocessingConfig.from_dict(cache.preprocessing),
            report.operating_point,
            device=device,
        )
    finished = time.perf_counter()
    return {
        "what": "device_recipe",
        "commit": args.commit or git_commit(),
        "hardware": hardware(device),
        "arch": args.arch,
        "profile": args.profile,
        "schedule": result.schedule,
        "pretrained": result.pretrained,
        "compile": args.compile,
        "batch_size": config.batch_size,
        "image_size": args.size,
        "n_images": {split: int(len(cache.labels(split))) for split in ("train", "val", "test")},
        "epochs_run": len(result.history),
        "epochs_planned": config.total_epochs,
        "best_epoch": result.best_epoch,
        "train_images_per_s": result.train_images_per_s,
        "wall_seconds": {
            "cache": round(cached - started, 2),
            "training": round(trained - cached, 2),
            "evaluation": round(finished - trained, 2),
            "cache_to_evaluation": round(finished - cached, 2),
        },
        "best_val_auc": result.best_val_auc,
        "operating_point": report.operating_point.to_dict(),
        "test": report.headline("test"),
        "shifted_test": [score.to_dict() for score in shifted],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a folder of images in a supported layout")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--profile", choices=TRAINING_PROFILES, default="full")
    parser.add_argument("--epochs", type=int, help="total epochs (default: the profile's)")
    parser.add_argument("--batch-size", type=int, help="default: the profile's")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--home", type=Path, help="work folder; its cache is reused by later runs")
    parser.add_argument("--commit", help="the commit, where the checkout has no .git")
    parser.add_argument("--out", type=Path, help="also write the JSON row here")
    args = parser.parse_args(argv)
    row = run(args)
    text = json.dumps(row, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

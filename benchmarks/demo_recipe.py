"""What the demo's minutes buy: its recipe against the one it replaced, on the synthetic set.

For each architecture, trains (from scratch, as offline demos do) on the demo's synthetic
dataset with its patient split, then fixes the 0.95-sensitivity threshold on validation and
measures the held-out test split, exactly as evaluation does:

- ``previous``: batches of 32 at a constant rate (baseline 8 epochs at 1e-3; ResNet18 one
  frozen epoch on random features then 3 at 3e-4), NCHW layout: the demo profile before
  issue 21;
- ``demo``: the current demo profile (``training_profile("demo", arch)``).

Both recipes see the same data in the same run, so the table compares recipes, not datasets.
Also prints the channels-last speed-up of one training step per architecture (the layout the
loop now uses on every device).

    .venv/bin/python benchmarks/demo_recipe.py [--patients 400] [--archs baseline_cnn resnet18]
        [--seed 1337] [--home /tmp/demo-recipe]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from cxr_platform.data import pipeline
from cxr_platform.data.transforms import TensorBatches
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.evaluation import ThresholdRule, evaluate_predictions
from cxr_platform.models.recipe import TrainConfig, training_profile
from cxr_platform.models.training import TrainingData, predict_logits, train
from cxr_platform.models.zoo import build_model
from cxr_platform.provenance import git_commit
from cxr_platform.sections import DataSection


def previous_recipe(arch: str, seed: int) -> TrainConfig:
    before = dict(arch=arch, pretrained="none", seed=seed, channels_last=False)
    if arch == "baseline_cnn":
        return TrainConfig(
            **before, frozen_epochs=0, finetune_epochs=8, finetune_lr=1e-3, patience=3
        )
    return TrainConfig(**before, frozen_epochs=1, finetune_epochs=3, finetune_lr=3e-4, patience=2)


def step_rate(arch: str, channels_last: bool, *, size: int = 224, batch: int = 16) -> float:
    model = build_model(arch, pretrained="none").model.train()
    images, targets = torch.randn(batch, 1, size, size), torch.rand(batch)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters())
    steps = 3
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(images).flatten(), targets
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - started)


def measure(config: TrainConfig, cache, out: Path) -> dict:
    data = TrainingData.from_cache(cache, "cpu")
    started = time.perf_counter()
    result = train(config, data, out, progress=False)
    seconds = time.perf_counter() - started
    model = Checkpoint.load(result.best_checkpoint).scoring_model()
    val = TensorBatches.from_cache(cache, "val", device="cpu")
    test = TensorBatches.from_cache(cache, "test", device="cpu")
    report = evaluate_predictions(
        arch=config.arch,
        model_name=config.arch,
        val=(val.labels_np, predict_logits(model, val)),
        test=(test.labels_np, predict_logits(model, test)),
        rule=ThresholdRule("sensitivity_target", 0.95),
        n_bootstrap=500,
        # Intervals resample patients, as the platform's evaluation does.
        patients={
            split: cache.index(split)["patient_id"].astype(str).to_numpy()
            for split in ("val", "test")
        },
    )
    split = report.splits["test"]
    return {
        "train_s": seconds,
        "epochs": len(result.history),
        "auc": split.auc,
        "auc_ci": (split.auc_ci_low, split.auc_ci_high),
        "sensitivity": split.sensitivity,
        "specificity": split.specificity,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--archs", nargs="+", default=["baseline_cnn", "resnet18"])
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--home", type=Path, default=Path("/tmp/demo-recipe"))
    args = parser.parse_args()

    data = DataSection(home=args.home, synthetic_patients=args.patients, seed=args.seed)
    _, cache = pipeline.prepare(data, progress=False)
    n_test = len(cache.index("test"))
    print(
        f"synthetic set: {args.patients} patients, train {len(cache.index('train'))}, "
        f"test {n_test} images; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; commit {git_commit() or 'unknown'}"
    )
    print("arch          recipe    epochs  train s  test AUC (95% CI)      sens   spec")
    rows = []
    for arch in args.archs:
        demo = replace(training_profile("demo", arch, pretrained="none"), seed=args.seed)
        for name, config in (("previous", previous_recipe(arch, args.seed)), ("demo", demo)):
            row = measure(config, cache, args.home / "runs" / f"{arch}-{name}")
            low, high = row["auc_ci"]
            print(
                f"{arch:<13} {name:<9} {row['epochs']:>6} {row['train_s']:>8.0f}  "
                f"{row['auc']:.3f} ({low:.3f}-{high:.3f})   {row['sensitivity']:.3f}  "
                f"{row['specificity']:.3f}"
            )
            rows.append({"arch": arch, "recipe": name, **row})
    print("\nchannels-last training step (batch 16, 224 px), images/s:")
    for arch in args.archs:
        nchw, nhwc = step_rate(arch, False), step_rate(arch, True)
        print(f"  {arch:<13} NCHW {nchw:6.1f}  channels-last {nhwc:6.1f}  x{nhwc / nchw:.2f}")
    (args.home / "demo_recipe.json").write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()

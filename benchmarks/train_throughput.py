"""Training throughput per architecture: loader alone, compute alone, and the real loop.

- loader-only: batches from the in-memory uint8 cache through the batched augmentation;
- compute-only: forward + backward + AdamW step on one fixed, already-normalized batch;
- end-to-end: one epoch of the platform's own `train()` on synthetic uint8 images, as timed
  by the training loop itself (validation excluded).

Prints images/s and end-to-end as a share of compute-only (target: >= 90%, i.e. data loading is
not the bottleneck). Runs on CUDA when available (bf16 autocast, channels_last), else CPU.

    .venv/bin/python benchmarks/train_throughput.py [--archs baseline_cnn resnet18 ...]
        [--images 96] [--batch-size 32] [--size 224] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.transforms import AugmentationConfig, TensorBatches
from cxr_platform.models.training import (
    TrainingData,
    select_device,
    train,
    training_profile,
)
from cxr_platform.models.zoo import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_only(batches: TensorBatches, batch_size: int, repeats: int) -> float:
    augmentation = AugmentationConfig()
    _sync(batches.device)
    start = time.perf_counter()
    seen = 0
    for epoch in range(repeats):
        for images, _ in batches.training_epoch(batch_size, augmentation=augmentation, seed=epoch):
            seen += len(images)
    _sync(batches.device)
    return seen / (time.perf_counter() - start)


def compute_only(arch: str, device: torch.device, batch_size: int, size: int, steps: int) -> float:
    model = build_model(arch, pretrained="none").model.to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = torch.nn.BCEWithLogitsLoss()
    images = torch.randn(batch_size, 1, size, size, device=device)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = (torch.rand(batch_size, device=device) > 0.5).float()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(images).float().flatten()
        loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator, cuDNN autotuning
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def end_to_end(arch: str, data: TrainingData, batch_size: int, device: torch.device) -> float:
    config = training_profile(
        "demo",
        arch,
        pretrained="none",
        frozen_epochs=0,
        finetune_epochs=2,  # the first epoch warms up; the second is the figure
        patience=99,
        batch_size=batch_size,
        device=str(device),
    )
    with tempfile.TemporaryDirectory() as out:
        result = train(config, data, out, progress=False)
    return result.history[-1].train_images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["baseline_cnn", "resnet18"])
    parser.add_argument("--images", type=int, default=96, help="images per training epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = select_device(args.device)
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        f"{hardware}; torch {torch.__version__}; {args.size}x{args.size}, batch {args.batch_size}"
    )
    rng = np.random.default_rng(0)
    preprocessing = PreprocessingConfig(image_size=args.size)
    images = rng.integers(0, 256, (args.images, args.size, args.size), dtype=np.uint8)
    labels = (np.arange(args.images) % 3 != 0).astype(np.float32)
    val_images = images[: args.batch_size]
    data = TrainingData(
        train=TensorBatches(images, labels, preprocessing, device=device),
        val=TensorBatches(val_images, labels[: args.batch_size], preprocessing, device=device),
    )
    steps = max(2, args.images // args.batch_size)
    loader = loader_only(data.train, args.batch_size, repeats=3)
    print(f"loader only (augmentation included): {loader:,.0f} img/s")
    print(f"{'arch':<14} {'compute img/s':>14} {'end-to-end img/s':>17} {'e2e/compute':>12}")
    for arch in args.archs:
        compute = compute_only(arch, device, args.batch_size, args.size, steps)
        loop = end_to_end(arch, data, args.batch_size, device)
        print(f"{arch:<14} {compute:>14,.1f} {loop:>17,.1f} {loop / compute:>11.0%}")


if __name__ == "__main__":
    main()

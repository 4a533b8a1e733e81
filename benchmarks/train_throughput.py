"""Training throughput per architecture: loader alone, compute alone, the real loop, inference.

- loader-only: batches from the in-memory uint8 cache through the batched augmentation;
- compute-only: forward + backward + AdamW step on one fixed, already-normalized batch;
- end-to-end: one epoch of the platform's own `train()` with the full profile's augmentation
  and weight averaging, on synthetic uint8 images, as timed by the training loop itself
  (validation excluded);
- inference: batched forward passes in eval mode (bf16 autocast on CUDA, fp32 on CPU).

Prints images/s and end-to-end as a share of compute-only (target: >= 90%, i.e. data loading is
not the bottleneck). Runs on CUDA when available (bf16 autocast, channels_last), else CPU.
``--compile`` times the torch.compile path of compute-only and end-to-end (compilation is in
the warm-up, not in the figure).

``--processes 1 2`` adds data-parallel rows: the same end-to-end loop in N processes with
DistributedDataParallel (gloo on CPU, NCCL and one GPU each on CUDA), at the same global batch,
as a ratio of one process measured in the same run. On a CPU the processes share its cores, so
expect little gain there: the row is for a machine with a GPU per process.

``--full-run DATA_DIR`` also times a whole training run as the platform does it: the cache
(built or reused), the profile's epochs with validation after each, then the evaluation
(calibration and threshold on validation, metrics on the held-out test split). On two CPU cores
ResNet18's 30 epochs take hours; ``--full-run-arch``/``--full-run-epochs`` shorten it there.

    .venv/bin/python benchmarks/train_throughput.py [--archs baseline_cnn resnet18 ...]
        [--images 96] [--batch-size 32] [--size 224] [--device auto] [--compile]
        [--inference-batch-size 256] [--processes 1 2]
        [--full-run ../shared/data/kaggle-chest-xray-224 [--full-run-arch resnet18]
         [--full-run-epochs N]]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.transforms import AugmentationConfig, TensorBatches
from cxr_platform.models.training import (
    ACQUISITION_AUGMENTATION,
    TrainingData,
    select_device,
    train,
    training_profile,
)
from cxr_platform.models.zoo import build_model
from cxr_platform.provenance import git_commit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(
    step: Callable[[], object], device: torch.device, batch_size: int, steps: int, warmup: int
) -> float:
    """Images per second of ``step`` (one batch each), timed after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def loader_only(
    batches: TensorBatches, batch_size: int, repeats: int, augmentation: AugmentationConfig
) -> float:
    _sync(batches.device)
    start = time.perf_counter()
    seen = 0
    for epoch in range(repeats):
        for images, _ in batches.training_epoch(batch_size, augmentation=augmentation, seed=epoch):
            seen += len(images)
    _sync(batches.device)
    return seen / (time.perf_counter() - start)


def compute_only(
    arch: str, device: torch.device, batch_size: int, size: int, steps: int, compile: bool
) -> float:
    model = build_model(arch, pretrained="none").model.to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = torch.nn.BCEWithLogitsLoss()
    images = torch.randn(batch_size, 1, size, size, device=device)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = (torch.rand(batch_size, device=device) > 0.5).float()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = forward(images).float().flatten()
        loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # Warm-up: allocator, cuDNN autotuning, and compilation (which may take a few calls).
    return _images_per_s(step, device, batch_size, steps, warmup=3 if compile else 1)


@torch.inference_mode()
def inference_only(
    arch: str, device: torch.device, batch_size: int, size: int, steps: int
) -> float:
    model = build_model(arch, pretrained="none").model.to(device).eval()
    cuda = device.type == "cuda"
    images = torch.randn(batch_size, 1, size, size, device=device)
    if cuda:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return model(images)

    return _images_per_s(step, device, batch_size, steps, warmup=1)


def end_to_end(
    arch: str, data: TrainingData, batch_size: int, device: torch.device, compile: bool
) -> float:
    # The full profile's loop: its augmentation (acquisition included) and weight averaging.
    config = training_profile(
        "full",
        arch,
        pretrained="none",
        frozen_epochs=0,
        finetune_epochs=2,  # the first epoch warms up; the second is the figure
        patience=99,
        batch_size=batch_size,
        device=str(device),
        compile=compile,
    )
    with tempfile.TemporaryDirectory() as out:
        result = train(config, data, out, progress=False)
    return result.history[-1].train_images_per_s


def end_to_end_rank(
    arch: str, data: TrainingData, batch_size: int, device: str, compile: bool, out: str
) -> float:
    """One rank of the data-parallel end-to-end loop (the launcher starts one per process)."""
    from cxr_platform.models.distributed import join_from_environment, leave, share_cpu

    ranks = join_from_environment(torch.device(device))
    share_cpu(ranks)
    if torch.device(device).type == "cuda":
        device = f"cuda:{ranks.rank}"
        data = TrainingData(
            train=TensorBatches(
                data.train.images.squeeze(1).cpu().numpy(),
                data.train.labels_np,
                data.train.preprocessing,
                device=device,
            ),
            val=TensorBatches(
                data.val.images.squeeze(1).cpu().numpy(),
                data.val.labels_np,
                data.val.preprocessing,
                device=device,
            ),
        )
    config = training_profile(
        "full",
        arch,
        pretrained="none",
        frozen_epochs=0,
        finetune_epochs=2,
        patience=99,
        batch_size=batch_size,
        device=device,
        compile=compile,
    )
    try:
        result = train(config, data, out, progress=False, ranks=ranks)  # rank 0 writes there
    finally:
        leave(ranks)
    return result.history[-1].train_images_per_s


def data_parallel_rows(
    archs: list[str],
    processes: list[int],
    data: TrainingData,
    batch_size: int,
    device: torch.device,
    compile: bool,
) -> None:
    from cxr_platform.models.distributed import launch

    cpu_data = TrainingData(
        train=TensorBatches(
            data.train.images.squeeze(1).cpu().numpy(),
            data.train.labels_np,
            data.train.preprocessing,
        ),
        val=TensorBatches(
            data.val.images.squeeze(1).cpu().numpy(), data.val.labels_np, data.val.preprocessing
        ),
    )
    print(f"{'arch':<14} {'processes':>9} {'end-to-end img/s':>17} {'vs 1 process':>13}")
    for arch in archs:
        single = None
        for count in processes:
            with tempfile.TemporaryDirectory() as out:
                rate = launch(
                    count, end_to_end_rank, arch, cpu_data, batch_size, str(device), compile, out
                )
            single = rate if count == 1 else single
            ratio = f"{rate / single:.2f}x" if single else "-"
            print(f"{arch:<14} {count:>9} {rate:>17,.1f} {ratio:>13}")


def full_run(data_dir: Path, arch: str, epochs: int | None, device: torch.device) -> None:
    """A whole ``full``-profile run on real data, timed from cache to evaluation report."""
    from cxr_platform.data.pipeline import prepare
    from cxr_platform.models.pipeline import evaluate_trained, train_config_for, train_tracked
    from cxr_platform.settings import CxrSettings

    with tempfile.TemporaryDirectory() as home:
        settings = CxrSettings(home=Path(home), data_dir=data_dir, device=str(device))
        started = time.perf_counter()
        _, cache = prepare(settings.data, progress=False)
        prepared = time.perf_counter()
        config = train_config_for(settings.training, arch, profile="full", epochs=epochs)
        trained = train_tracked(settings.training, cache, config, profile="full", progress=False)
        trained_at = time.perf_counter()
        report, _ = evaluate_trained(settings.training, cache, trained)
        finished = time.perf_counter()
    test = report.splits["test"]
    print(
        f"full run, {arch}: {trained.epochs_run} of {config.total_epochs} epochs "
        f"(best {trained.best_epoch}), {trained.train_images_per_s:,.0f} train img/s"
    )
    print(
        f"  wall: cache {prepared - started:.1f} s, training {trained_at - prepared:.1f} s, "
        f"evaluation {finished - trained_at:.1f} s, total {finished - started:.1f} s"
    )
    print(
        f"  val AUC {trained.best_val_auc:.4f}; test AUC {test.auc:.4f}, sensitivity "
        f"{test.sensitivity:.3f}, specificity {test.specificity:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["baseline_cnn", "resnet18"])
    parser.add_argument("--images", type=int, default=96, help="images per training epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--inference-batch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[],
        help="also time the loop data-parallel in these process counts (include 1 as baseline)",
    )
    parser.add_argument("--full-run", type=Path, metavar="DATA_DIR")
    parser.add_argument("--full-run-arch", default="resnet18")
    parser.add_argument("--full-run-epochs", type=int)
    args = parser.parse_args()

    device = select_device(args.device)
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        f"{hardware}; torch {torch.__version__}; commit {git_commit()}; "
        f"{args.size}x{args.size}, batch {args.batch_size}"
        f"{', torch.compile' if args.compile else ''}"
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
    for name, augmentation in (
        ("default", AugmentationConfig()),
        ("full profile, with acquisition", ACQUISITION_AUGMENTATION),
    ):
        loader = loader_only(data.train, args.batch_size, 3, augmentation)
        print(f"loader only ({name} augmentation): {loader:,.0f} img/s")
    precision = "bf16" if device.type == "cuda" else "fp32"
    print(
        f"{'arch':<14} {'compute img/s':>14} {'end-to-end img/s':>17} {'e2e/compute':>12} "
        f"{f'inference img/s ({precision}, batch {args.inference_batch_size})':>40}"
    )
    for arch in args.archs:
        compute = compute_only(arch, device, args.batch_size, args.size, steps, args.compile)
        loop = end_to_end(arch, data, args.batch_size, device, args.compile)
        inference = inference_only(
            arch, device, args.inference_batch_size, args.size, steps=max(2, steps // 4)
        )
        print(
            f"{arch:<14} {compute:>14,.1f} {loop:>17,.1f} {loop / compute:>11.0%} "
            f"{inference:>40,.1f}"
        )
    if args.processes:
        data_parallel_rows(args.archs, args.processes, data, args.batch_size, device, args.compile)
    if args.full_run is not None:
        full_run(args.full_run, args.full_run_arch, args.full_run_epochs, device)


if __name__ == "__main__":
    main()

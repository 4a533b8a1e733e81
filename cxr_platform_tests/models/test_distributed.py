"""Data-parallel training: two CPU processes on loopback (gloo) take the steps one process takes
on the same global batch, and `cxr train --nproc-per-node 2` runs and tracks as one run."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.transforms import NO_AUGMENTATION, TensorBatches
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.distributed import (
    DistributedLaunchError,
    join_from_environment,
    launch,
    leave,
    share_cpu,
)
from cxr_platform.models.training import (
    TrainConfig,
    TrainingData,
    initial_model,
    seed_everything,
    train,
)

GLOBAL_BATCH = 16


def _config() -> TrainConfig:
    """A run whose steps do not depend on how its batches are split: no augmentation, no weight
    averaging, BatchNorm on its running statistics and dropout off (``batch_independent``)."""
    return TrainConfig(
        arch="baseline_cnn",
        pretrained="none",
        frozen_epochs=0,
        finetune_epochs=2,
        finetune_lr=1e-3,
        batch_size=GLOBAL_BATCH,
        augmentation=NO_AUGMENTATION,
        device="cpu",
        seed=5,
        patience=10,
        batch_independent=True,
    )


def _data(cache: PreprocessedCache, n_train: int) -> TrainingData:
    """The cache's splits, the training split cut to whole global batches (every rank then
    holds an equal share of every step)."""
    train_split = TensorBatches.from_cache(cache, "train")
    # Spread over the split (it is stored class by class), the same images in every process.
    keep = np.linspace(0, len(train_split) - 1, n_train).round().astype(int)
    return TrainingData(
        train=TensorBatches(
            cache.images("train", mmap=False)[keep],
            train_split.labels_np[keep],
            train_split.preprocessing,
        ),
        val=TensorBatches.from_cache(cache, "val"),
    )


def train_rank(
    cache: PreprocessedCache,
    config: TrainConfig,
    n_train: int,
    out: Path,
    resume: bool = False,
    threads: int | None = None,
) -> tuple[int, int]:
    """One rank of the distributed run (the launcher imports it by name): (world size, epochs
    this rank trained). ``threads`` pins the rank's intra-op threads and its kernels to the
    deterministic ones, as the single-process reference it is compared with."""
    ranks = join_from_environment(torch.device("cpu"))
    share_cpu(ranks)
    if threads is not None:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
    try:
        result = train(
            config, _data(cache, n_train), out, progress=False, resume=resume, ranks=ranks
        )
    finally:
        leave(ranks)
    return ranks.world_size, len(result.history)


def fail_on_rank_one() -> None:
    ranks = join_from_environment(torch.device("cpu"))
    try:
        if ranks.rank == 1:
            raise ValueError("rank one cannot go on")
    finally:
        leave(ranks)


# Two processes cannot take bit-identical steps: each rank sums the gradients of its half and
# DDP adds the halves, where one process sums the whole batch in another order. AdamW's first
# steps divide a gradient by its own size, so a near-zero gradient whose sign that rounding
# flips moves its weight by a whole learning rate, and the weights fed by it follow. Measured
# here (1 thread a process, 8 steps, seeds 1-16): in 3 of 16 seeds a few weights moved apart,
# at most 0.07% of them by more than 1e-4 (the largest by 7e-4); a run whose batches hold one
# image other than they should (one of 64 replaced) moves 60-63% of them by more than that.
# After 28 steps the rounding alone moves up to 7.5% apart: the comparison stops at 8.
APART = 1e-4
MOST_WEIGHTS_TOGETHER = 0.01  # the share of weights allowed to be APART


def _share_apart(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """The share of the weights (not the BatchNorm counters) that differ by more than APART."""
    differences = torch.cat(
        [
            (one[name].float() - other[name].float()).abs().flatten()
            for name in one
            if one[name].is_floating_point()
        ]
    )
    return float((differences > APART).float().mean())


def _single_process(config: TrainConfig, data: TrainingData, out: Path) -> None:
    """The reference: one process on one pinned thread with deterministic kernels, as each rank."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        train(config, data, out, progress=False)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def test_two_processes_take_the_steps_of_one(learnable_cache, tmp_path):
    config = _config()
    n_train = 4 * GLOBAL_BATCH  # 4 steps an epoch, 8 in all: over an epoch's new shuffle
    _single_process(config, _data(learnable_cache, n_train), tmp_path / "one")
    world_size, _ = launch(
        2, train_rank, learnable_cache, config, n_train, tmp_path / "two", False, 1
    )
    assert world_size == 2

    one = Checkpoint.load(tmp_path / "one" / "last.pt")
    two = Checkpoint.load(tmp_path / "two" / "last.pt")
    steps = n_train // GLOBAL_BATCH * config.total_epochs
    assert steps >= 8
    apart = _share_apart(one.model, two.model)
    assert apart < MOST_WEIGHTS_TOGETHER, apart
    print(f"weights more than {APART:g} apart after {steps} steps: {apart:.2%}")

    # What the comparison tells apart: the same run with one training image replaced by another
    # (a rank that takes a wrong share does at least that much).
    data = _data(learnable_cache, n_train)
    images, labels = data.train.images[:, 0].numpy().copy(), data.train.labels_np.copy()
    images[0], labels[0] = images[n_train // 2], labels[n_train // 2]
    wrong = TrainingData(
        train=TensorBatches(images, labels, data.train.preprocessing), val=data.val
    )
    _single_process(config, wrong, tmp_path / "wrong")
    wrong_share = _share_apart(one.model, Checkpoint.load(tmp_path / "wrong" / "last.pt").model)
    assert wrong_share > 30 * MOST_WEIGHTS_TOGETHER, wrong_share

    # Training moved most weights: the comparison is not of two untouched initializations.
    seed_everything(config.seed)
    initial = initial_model(config).model.state_dict()
    assert _share_apart(initial, one.model) > 0.5
    assert [r.val_auc for r in one.history] == pytest.approx(
        [r.val_auc for r in two.history], abs=1e-4
    )
    assert [r.train_loss for r in one.history] == pytest.approx(
        [r.train_loss for r in two.history], abs=1e-4
    )
    assert two.history[-1].epoch == one.history[-1].epoch == config.total_epochs

    # Stopped after its first epoch and resumed in two processes: every rank restores rank 0's
    # last.pt, and the run ends where the uninterrupted one did (the same ranks, the same sums).
    first_epoch = replace(config, finetune_epochs=1)
    resumed_out = tmp_path / "resumed"
    launch(2, train_rank, learnable_cache, first_epoch, n_train, resumed_out, False, 1)
    launch(2, train_rank, learnable_cache, config, n_train, resumed_out, True, 1)
    resumed = Checkpoint.load(resumed_out / "last.pt")
    assert (
        max(
            float((resumed.model[name].float() - two.model[name].float()).abs().max())
            for name in two.model
        )
        < 1e-5
    )


def test_every_rank_stops_early_with_rank_0(learnable_cache, tmp_path):
    """Only rank 0 validates; a rank that went on alone would wait for the others forever."""
    config = replace(_config(), finetune_epochs=6, patience=1, min_delta=1.0)
    n_train = 4 * GLOBAL_BATCH
    _, epochs = launch(2, train_rank, learnable_cache, config, n_train, tmp_path / "stopped")
    assert epochs == 2 < config.total_epochs  # no epoch can gain 1.0 of AUC over the first
    stopped = Checkpoint.load(tmp_path / "stopped" / "last.pt")
    assert [record.epoch for record in stopped.history] == [1, 2]


def test_a_failing_rank_is_reported_with_its_error():
    with pytest.raises(DistributedLaunchError, match="rank 1 of 2 failed.*rank one cannot go on"):
        launch(2, fail_on_rank_one)


def test_the_rank_that_raised_is_named_before_the_rank_that_lost_it():
    """Error files carry whole seconds: a rank that died of the other's exit can tie with it."""
    from types import SimpleNamespace

    from cxr_platform.models.distributed import _root_cause

    lost = "RuntimeError: Gloo connectFullMesh failed: Connection closed by peer [127.0.0.1]:1"
    failures = {
        0: SimpleNamespace(message={"message": lost}, timestamp=100),
        1: SimpleNamespace(message={"message": "ValueError: rank one cannot go on"}, timestamp=100),
    }
    assert _root_cause(SimpleNamespace(failures=failures), 2) == (
        "rank 1 of 2 failed: ValueError: rank one cannot go on (rank 0 failed after it)"
    )
    # A rank the launcher stopped after the other failed wrote no error of its own.
    failures[0] = SimpleNamespace(message="Signal 15 (SIGTERM) received by PID 7", timestamp=99)
    assert _root_cause(SimpleNamespace(failures=failures), 2).startswith("rank 1 of 2 failed")
    failures[0] = SimpleNamespace(message={"message": lost}, timestamp=100)
    # Both ranks lost a peer (the cause left no error file): the earlier is named.
    failures[1] = SimpleNamespace(message=lost, timestamp=101)
    assert _root_cause(SimpleNamespace(failures=failures), 2).startswith("rank 0 of 2 failed: ")


def test_cxr_train_with_two_processes_tracks_one_run(tiny_synthetic, tmp_path):
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CXR_")},
        "CXR_HOME": str(home),
        "CXR_IMAGE_SIZE": "64",
        "CXR_WORKERS": "1",
        "CXR_DEVICE": "cpu",
    }
    command = [
        *(sys.executable, "-m", "cxr_platform.cli", "train", "--data", str(tiny_synthetic)),
        *("--arch", "baseline_cnn", "--epochs", "2", "--batch-size", "8"),
        *("--nproc-per-node", "2"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "in 2 processes" in done.stdout
    assert "best validation AUC" in done.stdout

    client = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cxr-training")
    (run,) = client.search_runs([experiment.experiment_id])  # rank 1 tracked nothing
    assert run.info.status == "FINISHED"
    assert run.data.tags["cxr.world_size"] == "2"
    assert run.data.params["world_size"] == "2"
    epochs = client.get_metric_history(run.info.run_id, "val_auc")
    assert [metric.step for metric in epochs] == [1, 2]  # one report per epoch, from rank 0
    (checkpoints,) = list((home / "models" / "baseline_cnn").iterdir())
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["best.pt", "last.pt"]

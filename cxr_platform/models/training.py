"""Two-phase fine-tuning with early stopping on validation ROC AUC.

Phase 1 trains the head with the backbone frozen (weights *and* BatchNorm statistics), phase 2
trains everything at a lower rate. Every epoch is seeded from ``(seed, epoch)``, so a run resumed
from ``last.pt`` takes exactly the same steps as one that never stopped. ``best.pt`` holds a copy
of the best epoch's weights, taken when that epoch finished, never a reference to the live model.

The test split is not an input here: :class:`TrainingData` carries train and validation only.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.transforms import TensorBatches
from cxr_platform.models.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    scoring_model,
)
from cxr_platform.models.distributed import (
    SINGLE,
    Ranks,
    from_main,
    summed,
    wait_for_all,
)
from cxr_platform.models.recipe import (
    ACQUISITION_AUGMENTATION,
    FROM_SCRATCH_LR,
    EpochRecord,
    Phase,
    ResumeMismatchError,
    TrainConfig,
    TrainingError,
    describe_schedule,
    training_profile,
    with_epochs,
)
from cxr_platform.models.zoo import (
    BuiltModel,
    FlipAveraged,
    backbone_modules,
    backbone_parameters,
    build_model,
)
from cxr_platform.terminal import duration_text, progress_line, progress_stream

# The recipe and checkpoint names callers have always imported from here.
__all__ = [
    "ACQUISITION_AUGMENTATION",
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "EpochRecord",
    "ResumeMismatchError",
    "TrainConfig",
    "TrainingData",
    "TrainingError",
    "TrainingResult",
    "load_checkpoint",
    "model_from_checkpoint",
    "predict_logits",
    "scoring_model",
    "select_device",
    "train",
    "training_profile",
    "with_epochs",
]

log = logging.getLogger(__name__)


class MetricsSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class TrainingData:
    train: TensorBatches
    val: TensorBatches

    @classmethod
    def from_cache(cls, cache: PreprocessedCache, device: torch.device | str) -> TrainingData:
        return cls(
            train=TensorBatches.from_cache(cache, "train", device=device),
            val=TensorBatches.from_cache(cache, "val", device=device),
        )


@dataclass
class TrainingResult:
    arch: str
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_auc: float
    history: list[EpochRecord]
    stopped_early: bool
    pretrained: bool
    weights_source: str | None
    device: str
    wall_seconds: float
    schedule: str = ""  # the phases as run, e.g. "5 frozen at 0.001 + 25 full at 0.0001"

    @property
    def train_images_per_s(self) -> float:
        rates = [record.train_images_per_s for record in self.history]
        return float(np.median(rates)) if rates else 0.0


def select_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 10_007 + epoch


def resolve_pos_weight(config: TrainConfig, labels: np.ndarray) -> float | None:
    if config.pos_weight is None:
        return None
    if config.pos_weight == "auto":
        positives = float(labels.sum())
        negatives = float(len(labels) - positives)
        if positives == 0 or negatives == 0:
            raise TrainingError("the training split must contain both classes")
        return negatives / positives
    return float(config.pos_weight)


def set_phase(model: nn.Module, arch: str, phase: Phase) -> list[nn.Parameter]:
    """Freeze or unfreeze the backbone; returns the parameters the optimizer should train."""
    frozen = phase == "frozen"
    for _, parameter in backbone_parameters(model, arch):
        parameter.requires_grad_(not frozen)
    return [p for p in model.parameters() if p.requires_grad]


def _train_mode(model: nn.Module, arch: str, phase: Phase, *, batch_independent: bool) -> None:
    model.train()
    if phase == "frozen":
        for module in backbone_modules(model, arch):
            module.eval()  # BatchNorm running statistics are part of what is frozen
    if batch_independent:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.Dropout):
                module.eval()


def data_parallel(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """The training forward pass of one rank. Built again at each phase change: DDP
    synchronizes the gradients of the parameters that required them when it was built."""
    parallel = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    return torch.compile(parallel) if config.compile else parallel


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    batches: TensorBatches,
    *,
    batch_size: int = 128,
    mixed_precision: bool = True,
    channels_last: bool = True,
) -> np.ndarray:
    model.eval()
    device = batches.device
    cuda = device.type == "cuda"
    outputs = []
    for images, _ in batches.evaluation_batches(batch_size):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and mixed_precision):
            outputs.append(model(images).float().flatten())
    # One transfer at the end: a .cpu() per batch would wait for each batch in turn.
    return torch.cat(outputs).cpu().numpy().astype(np.float64)


def validation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    targets = torch.as_tensor(labels, dtype=torch.float64)
    loss = nn.functional.binary_cross_entropy_with_logits(torch.as_tensor(logits), targets)
    return {"val_loss": float(loss), "val_auc": float(roc_auc_score(labels, logits))}


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def ema_decay_per_step(half_life_epochs: float, steps_per_epoch: int) -> float:
    return 0.5 ** (1.0 / (half_life_epochs * max(steps_per_epoch, 1)))


class WeightAverage:
    """An exponential moving average of a model's parameters and buffers.

    BatchNorm statistics are averaged with the weights they belong to; integer buffers (batch
    counters) are copied. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` so the first
    steps are not dominated by the initial weights. torch's ``AveragedModel`` does the same job
    but reads its update counter back from the device on every step, a host-device
    synchronisation that stalls a GPU training loop; here the counter is a Python int.
    """

    def __init__(self, model: nn.Module, decay: float, *, updates: int = 0) -> None:
        self.module = copy.deepcopy(model)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.updates = updates

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = list(zip(self._tensors(self.module), self._tensors(model), strict=True))
        floats = [(kept, live) for kept, live in pairs if kept.is_floating_point()]
        counters = [(kept, live) for kept, live in pairs if not kept.is_floating_point()]
        keep = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_([k for k, _ in floats], [live for _, live in floats], 1.0 - keep)
        if counters:
            torch._foreach_copy_([k for k, _ in counters], [live for _, live in counters])
        self.updates += 1


@dataclass
class EarlyStopping:
    """Validation-AUC patience, counted afresh in each phase; only phase 2 may stop the run."""

    patience: int
    min_delta: float
    best_epoch: int = 0
    best_auc: float = -math.inf
    stale_epochs: int = 0

    def update(self, epoch: int, auc: float) -> bool:
        """Record one epoch's AUC; True when it is the new best."""
        if auc > self.best_auc + self.min_delta:
            self.best_epoch, self.best_auc, self.stale_epochs = epoch, auc, 0
            return True
        self.stale_epochs += 1
        return False

    def new_phase(self) -> None:
        self.stale_epochs = 0

    def should_stop(self, phase: Phase) -> bool:
        return phase == "finetune" and self.stale_epochs >= self.patience


@dataclass
class StartingPoint:
    """Where a run begins: fresh weights at epoch 1, or what ``last.pt`` saved."""

    built: BuiltModel
    stopping: EarlyStopping
    history: list[EpochRecord] = field(default_factory=list)
    start_epoch: int = 1
    saved: Checkpoint | None = None

    def optimizer_state_for(self, config: TrainConfig) -> dict[str, Any] | None:
        """The saved optimizer state carries on only within the phase it was saved in."""
        if self.saved is None or config.phase_of(self.start_epoch) != self.saved.phase:
            return None
        return self.saved.optimizer


def initial_model(config: TrainConfig) -> BuiltModel:
    built = build_model(config.arch, pretrained=config.pretrained, weights_path=config.weights_path)
    if config.initial_weights is None:
        return built
    state = torch.load(config.initial_weights, map_location="cpu", weights_only=True)
    try:
        built.model.load_state_dict(state)
    except RuntimeError as error:
        raise TrainingError(
            f"{config.initial_weights} does not fit {config.arch}: {str(error).splitlines()[0]}"
        ) from error
    built.pretrained, built.weights_source = True, f"fine-tune of {config.initial_weights}"
    return built


def restore_or_start(
    config: TrainConfig, preprocessing: dict[str, Any], last_path: Path | None
) -> StartingPoint:
    """Fresh weights, or (``last_path`` given and present) the run saved there, checked to be
    the same architecture and preprocessing."""
    built = initial_model(config)
    stopping = EarlyStopping(config.patience, config.min_delta)
    if last_path is None or not last_path.exists():
        return StartingPoint(built, stopping)
    saved = Checkpoint.load(last_path)
    if saved.arch != config.arch or saved.preprocessing != preprocessing:
        raise ResumeMismatchError(
            f"{last_path} was trained as {saved.arch} with other preprocessing settings"
        )
    # An averaged run keeps the average as "model" and the live weights beside it.
    built.model.load_state_dict(
        saved.training_model if saved.training_model is not None else saved.model
    )
    built.pretrained, built.weights_source = saved.pretrained, saved.weights_source
    stopping.best_epoch, stopping.best_auc = saved.best_epoch, saved.best_val_auc
    stopping.stale_epochs = saved.epochs_without_improvement
    log.info("resuming %s at epoch %d from %s", config.arch, saved.epoch + 1, last_path)
    return StartingPoint(built, stopping, list(saved.history), saved.epoch + 1, saved)


def final_schedule(config: TrainConfig, pretrained: bool) -> TrainConfig:
    """Without pretrained weights the scratch schedule drops the frozen phase: it would fit a
    head to random features."""
    if not (config.scratch_schedule and not pretrained and config.frozen_epochs):
        return config
    log.warning(
        "%s has no pretrained weights: no frozen phase; all %d epochs train every layer at %g",
        config.arch,
        config.total_epochs,
        FROM_SCRATCH_LR,
    )
    return replace(
        config, frozen_epochs=0, finetune_epochs=config.total_epochs, finetune_lr=FROM_SCRATCH_LR
    )


@dataclass
class Trainee:
    """The model as the loop drives it: live weights, their average, and the compiled views."""

    model: nn.Module  # the live weights the optimizer changes
    averaged: WeightAverage | None
    forward: nn.Module  # the training forward pass (compiled or not)
    scorer: nn.Module  # what validation scores: the kept weights, flip-averaged if so trained

    @property
    def kept(self) -> nn.Module:
        """The weights that are validated, kept as best.pt and deployed."""
        return self.averaged.module if self.averaged is not None else self.model

    @classmethod
    def prepare(
        cls, config: TrainConfig, start: StartingPoint, data: TrainingData, ranks: Ranks = SINGLE
    ) -> Trainee:
        device = data.train.device
        cuda = device.type == "cuda"
        model = start.built.model
        if cuda and ranks.distributed and not config.batch_independent:
            # One BatchNorm over the global batch, as one process would compute it.
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device)
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: autotuned kernels pay off
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        averaged = None
        if config.ema_half_life_epochs is not None:
            steps_per_epoch = data.train.num_batches(config.batch_size)
            decay = ema_decay_per_step(config.ema_half_life_epochs, steps_per_epoch)
            averaged = WeightAverage(model, decay)
            saved = start.saved
            if saved is not None and saved.training_model is not None:
                averaged.module.load_state_dict(saved.model)
                averaged.updates = saved.ema_updates or 0
        kept = averaged.module if averaged is not None else model
        scorer: nn.Module = FlipAveraged(kept) if config.tta_flip else kept
        # Compiled wrappers share parameters with the originals; checkpoints always come from
        # the originals, whose state-dict keys carry no "_orig_mod." prefix.
        forward: nn.Module = torch.compile(model) if config.compile else model
        if config.compile:
            scorer = torch.compile(scorer)
        return cls(model, averaged, forward, scorer)


def phase_optimizer(
    config: TrainConfig, model: nn.Module, phase: Phase, state: dict[str, Any] | None
) -> torch.optim.Optimizer:
    lr = config.frozen_lr if phase == "frozen" else config.finetune_lr
    optimizer = torch.optim.AdamW(
        set_phase(model, config.arch, phase), lr=lr, weight_decay=config.weight_decay
    )
    if state is not None:
        optimizer.load_state_dict(state)
    return optimizer


@dataclass(frozen=True)
class EpochTraining:
    loss: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_one_epoch(
    config: TrainConfig,
    trainee: Trainee,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    train_data: TensorBatches,
    epoch: int,
    phase: Phase,
    *,
    progress: bool,
    ranks: Ranks = SINGLE,
) -> EpochTraining:
    """One pass over the training split, seeded from ``(seed, epoch)`` so a resumed run takes
    the same steps; with several ranks, each takes its share of every batch."""
    device = train_data.device
    cuda = device.type == "cuda"
    epoch_seed = _epoch_seed(config.seed, epoch)
    torch.manual_seed(epoch_seed)  # dropout
    _train_mode(trainee.model, config.arch, phase, batch_independent=config.batch_independent)
    started = time.perf_counter()
    loss_sum, seen = torch.zeros((), device=device), 0
    batches = train_data.training_epoch(
        config.batch_size,
        augmentation=config.augmentation,
        seed=epoch_seed,
        balanced=config.balanced_sampling,
        shard=ranks.shard,
    )
    bar = tqdm(
        total=len(train_data),
        desc=f"{config.arch} epoch {epoch}/{config.total_epochs} ({phase})",
        unit="img",
        disable=not (progress and ranks.is_main),
        leave=False,
        file=progress_stream(),
    )
    steps_per_epoch = train_data.num_batches(config.batch_size)
    for step, (images, labels) in enumerate(batches):
        if config.lr_schedule != "constant":
            rate = config.learning_rate(phase, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = rate
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels * (1 - config.label_smoothing) + 0.5 * config.label_smoothing
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and config.mixed_precision):
            logits = trainee.forward(images).float().flatten()
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if trainee.averaged is not None:
            trainee.averaged.update(trainee.model)
        loss_sum += loss.detach() * len(labels)  # stays on the device: no sync per step
        seen += len(labels)
        bar.update(len(labels) * ranks.world_size)
    bar.close()
    # The epoch's figures over all ranks: one exchange per epoch.
    totals = summed(
        torch.stack([loss_sum.float(), torch.tensor(float(seen), device=device)]), ranks
    )
    loss_total, images = float(totals[0]), int(totals[1])
    return EpochTraining(loss_total / max(images, 1), images, time.perf_counter() - started)


def evaluate(config: TrainConfig, scorer: nn.Module, val: TensorBatches) -> dict[str, float]:
    logits = predict_logits(
        scorer,
        val,
        batch_size=config.eval_batch_size,
        mixed_precision=config.mixed_precision,
        channels_last=config.channels_last,
    )
    return validation_metrics(logits, val.labels_np)


def checkpoint_of(
    config: TrainConfig,
    trainee: Trainee,
    optimizer: torch.optim.Optimizer,
    start: StartingPoint,
    history: list[EpochRecord],
    *,
    preprocessing: dict[str, Any],
    metrics: dict[str, float],
    pos_weight: float | None,
) -> Checkpoint:
    record = history[-1]
    stopping = start.stopping
    return Checkpoint(
        arch=config.arch,
        model=_state_copy(trainee.kept),
        config=config,
        preprocessing=preprocessing,
        epoch=record.epoch,
        phase=record.phase,
        metrics=metrics,
        pretrained=start.built.pretrained,
        weights_source=start.built.weights_source,
        pos_weight=pos_weight,
        history=list(history),
        best_epoch=stopping.best_epoch,
        best_val_auc=stopping.best_auc,
        epochs_without_improvement=stopping.stale_epochs,
        optimizer=optimizer.state_dict(),
        training_model=_state_copy(trainee.model) if trainee.averaged is not None else None,
        ema_updates=trainee.averaged.updates if trainee.averaged is not None else None,
    )


def epoch_line(config: TrainConfig, history: Sequence[EpochRecord], improved: bool) -> str:
    """One finished epoch as a person follows a run: where it is, how it learns, how fast, and
    how long the rest takes at this pace (at most: early stopping can end it sooner)."""
    record = history[-1]
    remaining = config.total_epochs - record.epoch
    pace = float(np.mean([r.seconds for r in history[-3:]]))
    left = f"at most {duration_text(pace * remaining)} left" if remaining else "last epoch"
    return (
        f"{config.arch} epoch {record.epoch}/{config.total_epochs} ({record.phase}): "
        f"train loss {record.train_loss:.4f}, val loss {record.val_loss:.4f}, "
        f"val AUC {record.val_auc:.4f}{' (best so far)' if improved else ''}; "
        f"{record.train_images_per_s:.1f} img/s, {duration_text(record.seconds)}; {left}"
    )


def epoch_lines(config: TrainConfig, history: Sequence[EpochRecord]) -> list[str]:
    """Every epoch's line of a finished run, as it was reported while training."""
    return [
        epoch_line(config, history[: index + 1], record.best_so_far)
        for index, record in enumerate(history)
    ]


def report_epoch(
    config: TrainConfig,
    history: Sequence[EpochRecord],
    improved: bool,
    metrics_sink: MetricsSink | None,
    *,
    progress: bool,
    on_epoch: Callable[[str], None] | None = None,
) -> None:
    record = history[-1]
    line = epoch_line(config, history, improved)
    log.info(line)
    if progress:
        tqdm.write(line, file=progress_stream())
    else:
        progress_line(line)
    if on_epoch is not None:
        on_epoch(line)
    if metrics_sink is not None:
        metrics_sink.log_metrics(
            {
                "train_loss": record.train_loss,
                "val_loss": record.val_loss,
                "val_auc": record.val_auc,
                "lr": record.lr,
                "train_images_per_s": record.train_images_per_s,
            },
            step=record.epoch,
        )


def train(
    config: TrainConfig,
    data: TrainingData,
    out_dir: str | Path,
    *,
    resume: bool = False,
    metrics_sink: MetricsSink | None = None,
    progress: bool = True,
    on_epoch: Callable[[str], None] | None = None,
    ranks: Ranks = SINGLE,
) -> TrainingResult:
    """Train ``config.arch``; writes ``best.pt`` and ``last.pt`` under ``out_dir``.

    ``progress`` draws a bar per epoch and writes each epoch's line under it (for a terminal);
    ``on_epoch`` receives the same line (a Dagster run log, a test). ``ranks``: this process's
    place in a distributed run (see :mod:`cxr_platform.models.distributed`); only rank 0
    validates, writes checkpoints and reports, and every rank follows its early stopping."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    preprocessing = data.train.preprocessing.to_dict()
    started = time.perf_counter()

    seed_everything(config.seed)
    start = restore_or_start(config, preprocessing, last_path if resume else None)
    config = final_schedule(config, start.built.pretrained)
    optimizer_state = start.optimizer_state_for(config)
    trainee = Trainee.prepare(config, start, data, ranks)
    pos_weight = resolve_pos_weight(config, data.train.labels_np)
    criterion = nn.BCEWithLogitsLoss(
        pos_weight=None
        if pos_weight is None
        else torch.tensor([pos_weight], device=data.train.device)
    )
    history, stopping = start.history, start.stopping
    phase: Phase | None = None
    optimizer: torch.optim.Optimizer | None = None
    stopped_early = False
    for epoch in range(start.start_epoch, config.total_epochs + 1):
        if config.phase_of(epoch) != phase:
            phase = config.phase_of(epoch)
            optimizer = phase_optimizer(config, trainee.model, phase, optimizer_state)
            optimizer_state = None
            if ranks.distributed:
                trainee.forward = data_parallel(trainee.model, config, data.train.device)
            if epoch > 1 and config.phase_of(epoch - 1) != phase:
                stopping.new_phase()
        assert optimizer is not None and phase is not None

        epoch_started = time.perf_counter()
        trained = train_one_epoch(
            config,
            trainee,
            optimizer,
            criterion,
            data.train,
            epoch,
            phase,
            progress=progress,
            ranks=ranks,
        )
        # Rank 0 validates and the others take its figures: one early-stopping decision.
        metrics = from_main(
            evaluate(config, trainee.scorer, data.val) if ranks.is_main else None, ranks
        )
        record = EpochRecord(
            epoch=epoch,
            phase=phase,
            lr=optimizer.param_groups[0]["lr"],
            train_loss=trained.loss,
            seconds=time.perf_counter() - epoch_started,
            train_images_per_s=trained.images_per_s,
            **metrics,
        )
        improved = stopping.update(epoch, record.val_auc)
        record = replace(record, best_so_far=improved)
        history.append(record)

        if ranks.is_main:
            checkpoint = checkpoint_of(
                config,
                trainee,
                optimizer,
                start,
                history,
                preprocessing=preprocessing,
                metrics=metrics,
                pos_weight=pos_weight,
            )
            if improved:
                checkpoint.save(best_path)
            checkpoint.save(last_path)
            # Reported once saved: a line that says "best so far" is already in best.pt.
            report_epoch(
                config, history, improved, metrics_sink, progress=progress, on_epoch=on_epoch
            )
        if stopping.should_stop(phase):
            stopped_early = epoch < config.total_epochs
            log.info(
                "%s: early stop at epoch %d (best %d)", config.arch, epoch, stopping.best_epoch
            )
            break

    wait_for_all(ranks)  # rank 0's checkpoints are on disk before any rank returns
    if not best_path.exists():
        raise TrainingError(f"{out_dir} has no best checkpoint; nothing was trained")
    return TrainingResult(
        arch=config.arch,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        best_epoch=stopping.best_epoch,
        best_val_auc=stopping.best_auc,
        history=history,
        stopped_early=stopped_early,
        pretrained=start.built.pretrained,
        weights_source=start.built.weights_source,
        device=str(data.train.device),
        wall_seconds=time.perf_counter() - started,
        schedule=describe_schedule(config),
    )

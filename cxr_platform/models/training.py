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
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.transforms import AugmentationConfig, TensorBatches
from cxr_platform.errors import CxrError
from cxr_platform.models.zoo import (
    FlipAveraged,
    architecture,
    backbone_modules,
    backbone_parameters,
    build_model,
)
from cxr_platform.sections import TRAINING_PROFILES, PretrainedMode

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Training every layer from random initialisation needs a higher rate than fine-tuning does.
FROM_SCRATCH_LR = 1e-3
Phase = Literal["frozen", "finetune"]


class TrainingError(CxrError):
    pass


class ResumeMismatchError(TrainingError):
    """The checkpoint to resume was made with a different architecture or preprocessing."""


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "resnet18"
    pretrained: PretrainedMode = "auto"
    weights_path: str | None = None
    # A full state dict of this architecture to start from (fine-tuning a deployed model);
    # unlike ``weights_path`` (ImageNet backbones) it must fit the whole model, head included.
    initial_weights: str | None = None
    frozen_epochs: int = 5  # phase 1: head only
    frozen_lr: float = 1e-3
    finetune_epochs: int = 25  # phase 2: everything
    finetune_lr: float = 1e-4
    weight_decay: float = 1e-2
    batch_size: int = 32
    eval_batch_size: int = 128
    # "auto": n_negative / n_positive of the training split; None: unweighted; or a number.
    pos_weight: float | Literal["auto"] | None = "auto"
    label_smoothing: float = 0.0
    balanced_sampling: bool = False
    patience: int = 7  # epochs without a validation-AUC gain before stopping (per phase)
    min_delta: float = 1e-4
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    seed: int = 1337
    device: str = "auto"
    mixed_precision: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    # torch.compile for the training and validation forward passes. Off by default: compiling
    # costs tens of seconds up front (more on CPU), which pays off only over long GPU runs.
    compile: bool = False
    # Exponential moving average of the weights, with this half-life in epochs (None: off). The
    # average is what is validated, kept as best.pt and deployed; the live weights are kept only
    # to resume. A half-life in epochs, not a per-step decay, so changing the batch size keeps
    # the same averaging horizon.
    ema_half_life_epochs: float | None = None
    # Score the mean logit of each image and its mirror image (validation, evaluation, export).
    tta_flip: bool = False
    # When no pretrained weights were loaded, skip the frozen phase (it would fit a head to
    # random features) and train everything for all epochs at FROM_SCRATCH_LR.
    scratch_schedule: bool = False

    def __post_init__(self) -> None:
        architecture(self.arch)  # fails early on a typo
        if self.frozen_epochs < 0 or self.finetune_epochs < 0:
            raise TrainingError("epoch counts must be >= 0")
        if self.frozen_epochs + self.finetune_epochs == 0:
            raise TrainingError("at least one epoch is needed")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise TrainingError("label_smoothing must be in [0, 0.5)")
        if self.ema_half_life_epochs is not None and not self.ema_half_life_epochs > 0:
            raise TrainingError("ema_half_life_epochs must be > 0 (or None for no averaging)")

    @property
    def total_epochs(self) -> int:
        return self.frozen_epochs + self.finetune_epochs

    def phase_of(self, epoch: int) -> Phase:
        """``epoch`` is 1-based."""
        return "frozen" if epoch <= self.frozen_epochs else "finetune"

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["augmentation"] = self.augmentation.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        values["augmentation"] = AugmentationConfig.from_dict(values.get("augmentation", {}))
        return cls(**values)


# Scanner and site variation added to the default augmentation by the ``full`` profile.
ACQUISITION_AUGMENTATION = AugmentationConfig(gamma=1.4, blur_sigma=1.5, noise_std=0.03)


def training_profile(profile: str, arch: str, **overrides: Any) -> TrainConfig:
    """The defaults for a named profile; ``overrides`` (None values ignored) win.

    ``full`` is the recipe for real data, chosen by ``benchmarks/recipe_search.py`` for how it
    holds up under acquisition shifts (``benchmarks/RESULTS.md``): the two-phase schedule, weight
    averaging with a one-epoch half-life, and acquisition augmentation; without pretrained
    weights it trains every layer from the start. ``demo`` keeps the embedded synthetic run to a
    couple of minutes on two CPU cores. Architectures without ImageNet weights (the baseline)
    skip the frozen phase, which only makes sense on top of learned features, and train at 1e-3.
    """
    if profile not in TRAINING_PROFILES:
        raise TrainingError(
            f"unknown training profile {profile!r}; choose from {TRAINING_PROFILES}"
        )
    has_imagenet = architecture(arch).imagenet_weights is not None
    if profile == "full":
        values: dict[str, Any] = dict(
            frozen_epochs=5,
            finetune_epochs=25,
            patience=7,
            ema_half_life_epochs=1.0,
            augmentation=ACQUISITION_AUGMENTATION,
            scratch_schedule=True,
        )
    elif has_imagenet:
        values = dict(frozen_epochs=1, finetune_epochs=3, patience=2, finetune_lr=3e-4)
    else:
        values = dict(frozen_epochs=0, finetune_epochs=8, patience=3)
    if not has_imagenet:
        values.update(frozen_epochs=0, finetune_lr=FROM_SCRATCH_LR, pretrained="none")
        if profile == "full":
            values["finetune_epochs"] = 30
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(arch=arch, **values)


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
class EpochRecord:
    epoch: int
    phase: str
    lr: float
    train_loss: float
    val_loss: float
    val_auc: float
    seconds: float
    train_images_per_s: float


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


def _train_mode(model: nn.Module, arch: str, phase: Phase) -> None:
    model.train()
    if phase == "frozen":
        for module in backbone_modules(model, arch):
            module.eval()  # BatchNorm running statistics are part of what is frozen


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
        if cuda and channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and mixed_precision):
            outputs.append(model(images).float().flatten())
    # One transfer at the end: a .cpu() per batch would wait for each batch in turn.
    return torch.cat(outputs).cpu().numpy().astype(np.float64)


def validation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    targets = torch.as_tensor(labels, dtype=torch.float64)
    loss = nn.functional.binary_cross_entropy_with_logits(torch.as_tensor(logits), targets)
    return {"val_loss": float(loss), "val_auc": float(roc_auc_score(labels, logits))}


def save_checkpoint(payload: dict, path: Path) -> None:
    """Write-then-rename: a crash mid-save never leaves a truncated checkpoint behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a cxr_platform checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """The bare network (what Grad-CAM needs: its layers under their usual names)."""
    model = build_model(checkpoint["arch"], pretrained="none").model
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def scoring_model(checkpoint: dict[str, Any]) -> nn.Module:
    """The network as the checkpoint's recipe scores it: with flip averaging when trained so."""
    model = model_from_checkpoint(checkpoint)
    if checkpoint.get("config", {}).get("tta_flip", False):
        return FlipAveraged(model).eval()
    return model


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


def train(
    config: TrainConfig,
    data: TrainingData,
    out_dir: str | Path,
    *,
    resume: bool = False,
    metrics_sink: MetricsSink | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train ``config.arch``; writes ``best.pt`` and ``last.pt`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    device = data.train.device
    cuda = device.type == "cuda"
    preprocessing = data.train.preprocessing.to_dict()
    started = time.perf_counter()

    seed_everything(config.seed)
    built = build_model(config.arch, pretrained=config.pretrained, weights_path=config.weights_path)
    model = built.model
    if config.initial_weights is not None:
        state = torch.load(config.initial_weights, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise TrainingError(
                f"{config.initial_weights} does not fit {config.arch}: {str(error).splitlines()[0]}"
            ) from error
        built.pretrained, built.weights_source = True, f"fine-tune of {config.initial_weights}"

    history: list[EpochRecord] = []
    best_epoch, best_auc, stale_epochs, start_epoch = 0, -math.inf, 0, 1
    optimizer_state = None
    saved_phase: tuple[str, dict[str, Any]] | None = None  # resumed phase and optimizer state
    resumed_average: tuple[dict[str, torch.Tensor], int] | None = None
    if resume and last_path.exists():
        saved = load_checkpoint(last_path)
        if saved["arch"] != config.arch or saved["preprocessing"] != preprocessing:
            raise ResumeMismatchError(
                f"{last_path} was trained as {saved['arch']} with other preprocessing settings"
            )
        if "training_model" in saved:  # an averaged run: "model" is the average
            model.load_state_dict(saved["training_model"])
            resumed_average = saved["model"], saved["ema_updates"]
        else:
            model.load_state_dict(saved["model"])
        built.pretrained, built.weights_source = saved["pretrained"], saved["weights_source"]
        history = [EpochRecord(**record) for record in saved["history"]]
        best_epoch, best_auc = saved["best"]["epoch"], saved["best"]["val_auc"]
        stale_epochs = saved["epochs_without_improvement"]
        start_epoch = saved["epoch"] + 1
        saved_phase = saved["phase"], saved["optimizer"]
        log.info("resuming %s at epoch %d from %s", config.arch, start_epoch, last_path)

    if config.scratch_schedule and not built.pretrained and config.frozen_epochs:
        log.warning(
            "%s has no pretrained weights: no frozen phase; all %d epochs train every layer at %g",
            config.arch,
            config.total_epochs,
            FROM_SCRATCH_LR,
        )
        config = replace(
            config,
            frozen_epochs=0,
            finetune_epochs=config.total_epochs,
            finetune_lr=FROM_SCRATCH_LR,
        )
    # After the schedule is final: the optimizer state carries on only within the same phase.
    if saved_phase is not None and config.phase_of(start_epoch) == saved_phase[0]:
        optimizer_state = saved_phase[1]

    model.to(device)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotuned kernels pay off
    if cuda and config.channels_last:
        model.to(memory_format=torch.channels_last)
    averaged: WeightAverage | None = None
    if config.ema_half_life_epochs is not None:
        steps_per_epoch = data.train.num_batches(config.batch_size)
        decay = ema_decay_per_step(config.ema_half_life_epochs, steps_per_epoch)
        averaged = WeightAverage(model, decay)
        if resumed_average is not None:
            averaged.module.load_state_dict(resumed_average[0])
            averaged.updates = resumed_average[1]
    # The weights that are validated, kept as best.pt and deployed.
    kept = averaged.module if averaged is not None else model
    scorer: nn.Module = FlipAveraged(kept) if config.tta_flip else kept
    # Compiled wrappers share parameters with the originals; checkpoints always come from the
    # originals, whose state-dict keys carry no "_orig_mod." prefix.
    forward: nn.Module = torch.compile(model) if config.compile else model
    if config.compile:
        scorer = torch.compile(scorer)
    pos_weight = resolve_pos_weight(config, data.train.labels_np)
    criterion = nn.BCEWithLogitsLoss(
        pos_weight=None if pos_weight is None else torch.tensor([pos_weight], device=device)
    )

    phase: Phase | None = None
    optimizer: torch.optim.Optimizer | None = None
    stopped_early = False
    for epoch in range(start_epoch, config.total_epochs + 1):
        if config.phase_of(epoch) != phase:
            phase = config.phase_of(epoch)
            lr = config.frozen_lr if phase == "frozen" else config.finetune_lr
            optimizer = torch.optim.AdamW(
                set_phase(model, config.arch, phase), lr=lr, weight_decay=config.weight_decay
            )
            if optimizer_state is not None:
                optimizer.load_state_dict(optimizer_state)
                optimizer_state = None
            if epoch > 1 and config.phase_of(epoch - 1) != phase:
                stale_epochs = 0  # a new phase gets its own patience
        assert optimizer is not None and phase is not None

        epoch_seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(epoch_seed)  # dropout
        _train_mode(model, config.arch, phase)
        epoch_started = time.perf_counter()
        loss_sum, seen = torch.zeros((), device=device), 0
        batches = data.train.training_epoch(
            config.batch_size,
            augmentation=config.augmentation,
            seed=epoch_seed,
            balanced=config.balanced_sampling,
        )
        bar = tqdm(
            batches,
            total=data.train.num_batches(config.batch_size),
            desc=f"{config.arch} epoch {epoch}/{config.total_epochs} ({phase})",
            disable=not progress,
            leave=False,
        )
        for images, labels in bar:
            if cuda and config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels * (1 - config.label_smoothing) + 0.5 * config.label_smoothing
            with torch.autocast(
                "cuda", dtype=torch.bfloat16, enabled=cuda and config.mixed_precision
            ):
                logits = forward(images).float().flatten()
            loss = criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if averaged is not None:
                averaged.update(model)
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
        train_seconds = time.perf_counter() - epoch_started

        val_logits = predict_logits(
            scorer,
            data.val,
            batch_size=config.eval_batch_size,
            mixed_precision=config.mixed_precision,
            channels_last=config.channels_last,
        )
        metrics = validation_metrics(val_logits, data.val.labels_np)
        record = EpochRecord(
            epoch=epoch,
            phase=phase,
            lr=optimizer.param_groups[0]["lr"],
            train_loss=float(loss_sum) / max(seen, 1),
            seconds=time.perf_counter() - epoch_started,
            train_images_per_s=seen / train_seconds if train_seconds > 0 else 0.0,
            **metrics,
        )
        history.append(record)
        improved = record.val_auc > best_auc + config.min_delta
        if improved:
            best_epoch, best_auc, stale_epochs = epoch, record.val_auc, 0
        else:
            stale_epochs += 1
        log.info(
            "%s epoch %d/%d (%s): loss %.4f, val loss %.4f, val AUC %.4f%s",
            config.arch,
            epoch,
            config.total_epochs,
            phase,
            record.train_loss,
            record.val_loss,
            record.val_auc,
            " *" if improved else "",
        )
        if progress:
            tqdm.write(
                f"{config.arch} epoch {epoch}/{config.total_epochs} ({phase}): "
                f"loss {record.train_loss:.4f}  val AUC {record.val_auc:.4f}"
                f"{'  (best)' if improved else ''}"
            )
        if metrics_sink is not None:
            metrics_sink.log_metrics(
                {
                    "train_loss": record.train_loss,
                    "val_loss": record.val_loss,
                    "val_auc": record.val_auc,
                    "lr": record.lr,
                    "train_images_per_s": record.train_images_per_s,
                },
                step=epoch,
            )

        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "arch": config.arch,
            "model": _state_copy(kept),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "phase": phase,
            "config": config.to_dict(),
            "preprocessing": preprocessing,
            "metrics": metrics,
            "pretrained": built.pretrained,
            "weights_source": built.weights_source,
            "pos_weight": pos_weight,
            "history": [asdict(r) for r in history],
            "best": {"epoch": best_epoch, "val_auc": best_auc},
            "epochs_without_improvement": stale_epochs,
        }
        if averaged is not None:
            checkpoint["training_model"] = _state_copy(model)
            checkpoint["ema_updates"] = averaged.updates
        if improved:
            save_checkpoint(checkpoint, best_path)
        save_checkpoint(checkpoint, last_path)
        if phase == "finetune" and stale_epochs >= config.patience:
            stopped_early = epoch < config.total_epochs
            log.info("%s: early stop at epoch %d (best %d)", config.arch, epoch, best_epoch)
            break

    if not best_path.exists():
        raise TrainingError(f"{out_dir} has no best checkpoint; nothing was trained")
    return TrainingResult(
        arch=config.arch,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        best_epoch=best_epoch,
        best_val_auc=best_auc,
        history=history,
        stopped_early=stopped_early,
        pretrained=built.pretrained,
        weights_source=built.weights_source,
        device=str(device),
        wall_seconds=time.perf_counter() - started,
        schedule=describe_schedule(config),
    )


def describe_schedule(config: TrainConfig) -> str:
    full = f"{config.finetune_epochs} full at {config.finetune_lr:g}"
    if config.frozen_epochs:
        return f"{config.frozen_epochs} frozen at {config.frozen_lr:g} + {full}"
    return full


def with_epochs(config: TrainConfig, epochs: int) -> TrainConfig:
    """Rescale to ``epochs`` in total, keeping the frozen phase's share (at least one epoch when
    the profile has one, and always at least one epoch of full fine-tuning)."""
    frozen = 0
    if config.frozen_epochs and epochs > 1:
        share = config.frozen_epochs / config.total_epochs
        frozen = min(max(1, round(epochs * share)), epochs - 1)
    return replace(config, frozen_epochs=frozen, finetune_epochs=epochs - frozen)

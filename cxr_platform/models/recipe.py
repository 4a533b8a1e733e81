"""The training recipe: its settings, the named profiles, and the record of one epoch.

Kept apart from the loop so checkpoints, the pipeline and benchmarks can read a recipe without
importing the training machinery.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from cxr_platform.data.transforms import AugmentationConfig
from cxr_platform.errors import CxrError
from cxr_platform.models.zoo import architecture
from cxr_platform.sections import TRAINING_PROFILES, PretrainedMode

# Training every layer from random initialisation needs a higher rate than fine-tuning does.
FROM_SCRATCH_LR = 1e-3
Phase = Literal["frozen", "finetune"]
LrSchedule = Literal["constant", "cosine"]


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
    # NHWC memory layout: faster convolutions on CUDA and on CPU alike (a training step 9-28%
    # faster on two CPU cores, benchmarks/RESULTS.md).
    channels_last: bool = True
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
    # How the rate moves within each phase: "constant", or "cosine": a linear warm-up over the
    # first tenth of the phase's steps, then a half cosine down to a hundredth of the phase's
    # rate. A short run from scratch learns far more per image with the decay: the late low-rate
    # steps settle what the early high-rate steps found. The rate is a function of the step
    # alone (no scheduler state), so resuming mid-phase continues on the same curve.
    lr_schedule: LrSchedule = "constant"
    # Each image's forward pass independent of the rest of its batch and of chance: BatchNorm
    # keeps its running statistics, dropout is off. A distributed run then takes exactly the
    # steps one process takes on the whole batch (what the equivalence test checks); it is not
    # a recipe for accuracy. On CPU BatchNorm cannot be synchronized across ranks (PyTorch's
    # SyncBatchNorm is GPU-only), so without this each rank normalizes with its share's
    # statistics, as plain DDP does.
    batch_independent: bool = False

    def __post_init__(self) -> None:
        architecture(self.arch)  # fails early on a typo
        if self.frozen_epochs < 0 or self.finetune_epochs < 0:
            raise TrainingError("epoch counts must be >= 0")
        if self.frozen_epochs + self.finetune_epochs == 0:
            raise TrainingError("at least one epoch is needed")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise TrainingError("label_smoothing must be in [0, 0.5)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise TrainingError(f"lr_schedule must be constant or cosine, not {self.lr_schedule!r}")
        if self.ema_half_life_epochs is not None and not self.ema_half_life_epochs > 0:
            raise TrainingError("ema_half_life_epochs must be > 0 (or None for no averaging)")

    @property
    def total_epochs(self) -> int:
        return self.frozen_epochs + self.finetune_epochs

    def phase_of(self, epoch: int) -> Phase:
        """``epoch`` is 1-based."""
        return "frozen" if epoch <= self.frozen_epochs else "finetune"

    def phase_epochs(self, phase: Phase) -> tuple[int, int]:
        """(first epoch, epochs) of ``phase``."""
        if phase == "frozen":
            return 1, self.frozen_epochs
        return self.frozen_epochs + 1, self.finetune_epochs

    def learning_rate(self, phase: Phase, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The rate for ``step`` (0-based) of ``epoch`` (1-based) in ``phase``."""
        base = self.frozen_lr if phase == "frozen" else self.finetune_lr
        if self.lr_schedule == "constant":
            return base
        first, epochs = self.phase_epochs(phase)
        total = max(1, epochs * steps_per_epoch)
        done = (epoch - first) * steps_per_epoch + step
        warmup = max(1, total // 10)
        if done < warmup:
            return base * (done + 1) / warmup
        # The last step of the phase lands on the floor.
        progress = min(1.0, (done - warmup) / max(1, total - 1 - warmup))
        floor = base / 100
        return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * progress))

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


# The demo's minutes go furthest with a decaying rate and more, smaller steps: measured on the
# synthetic set by benchmarks/demo_recipe.py (benchmarks/RESULTS.md).
DEMO_SCHEDULE: dict[str, Any] = dict(lr_schedule="cosine", batch_size=16, scratch_schedule=True)
# The baseline is small enough for a higher rate than FROM_SCRATCH_LR within the demo's epochs.
DEMO_BASELINE_LR = 2e-3


def training_profile(profile: str, arch: str, **overrides: Any) -> TrainConfig:
    """The defaults for a named profile; ``overrides`` (None values ignored) win.

    ``full`` is the recipe for real data, chosen by ``benchmarks/recipe_search.py`` for how it
    holds up under acquisition shifts (``benchmarks/RESULTS.md``): the two-phase schedule, weight
    averaging with a one-epoch half-life, and acquisition augmentation; without pretrained
    weights it trains every layer from the start. ``demo`` keeps the embedded synthetic run to a
    couple of minutes on two CPU cores: a cosine rate over batches of 16, ten epochs for the
    baseline, three for the transfer models (one frozen and two full with ImageNet weights; all
    three full from scratch without). Architectures without ImageNet weights (the baseline) skip
    the frozen phase, which only makes sense on top of learned features.
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
        # Offline the scratch schedule makes this three full epochs at FROM_SCRATCH_LR.
        values = dict(
            frozen_epochs=1,
            finetune_epochs=2,
            patience=2,
            finetune_lr=3e-4,
            **DEMO_SCHEDULE,
        )
    else:
        values = dict(frozen_epochs=0, finetune_epochs=10, patience=4, **DEMO_SCHEDULE)
    if not has_imagenet:
        values.update(frozen_epochs=0, finetune_lr=FROM_SCRATCH_LR, pretrained="none")
        if profile == "full":
            values["finetune_epochs"] = 30
        else:
            values["finetune_lr"] = DEMO_BASELINE_LR
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(arch=arch, **values)


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
    best_so_far: bool = False  # validation AUC improved: this epoch's weights went to best.pt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_schedule(config: TrainConfig) -> str:
    full = f"{config.finetune_epochs} full at {config.finetune_lr:g}"
    if config.frozen_epochs:
        full = f"{config.frozen_epochs} frozen at {config.frozen_lr:g} + {full}"
    return full if config.lr_schedule == "constant" else f"{full} ({config.lr_schedule})"


def with_epochs(config: TrainConfig, epochs: int) -> TrainConfig:
    """Rescale to ``epochs`` in total, keeping the frozen phase's share (at least one epoch when
    the profile has one, and always at least one epoch of full fine-tuning)."""
    frozen = 0
    if config.frozen_epochs and epochs > 1:
        share = config.frozen_epochs / config.total_epochs
        frozen = min(max(1, round(epochs * share)), epochs - 1)
    return replace(config, frozen_epochs=frozen, finetune_epochs=epochs - frozen)

"""The lung-field segmentation version: a MONAI U-Net, its training, and its evaluation.

The network takes exactly what the classifier takes (the preprocessed square, normalized the
same way), so one preprocessing serves both versions and a mask it predicts lies pixel for pixel
on the image the classifier and its Grad-CAM saw. Inside, it works at a lower resolution
(``working_size``) and brings its logits back to the input's size: lung fields are large smooth
regions, and the bilinear upsampling of logits puts their border between pixels, while a quarter
of the pixels makes a CPU epoch four times cheaper (benchmarks/RESULTS.md, lung segmentation).

Losses and metrics are MONAI's own (``DiceCELoss``, ``DiceMetric``, ``HausdorffDistanceMetric``)
so the figures mean what the field means by them.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.nets import UNet
from torch import nn

from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8
from cxr_platform.errors import CxrError
from cxr_platform.models.evaluation import patient_resamples


class SegmentationError(CxrError):
    pass


@dataclass(frozen=True)
class SegmentationConfig:
    working_size: int = 112
    channels: tuple[int, ...] = (16, 32, 64, 128)
    residual_units: int = 1
    epochs: int = 12
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    # Epochs without a validation-Dice gain before stopping.
    patience: int = 4
    # Small geometric and exposure changes per image: a lung field moves, tilts and changes
    # contrast from one acquisition to the next, and the version must follow it.
    augment: bool = True
    max_rotation_degrees: float = 7.0
    max_shift: float = 0.06  # of the image side
    max_scale: float = 0.08
    seed: int = 1337

    def __post_init__(self) -> None:
        if len(self.channels) < 2:
            raise ValueError("a U-Net needs at least two levels of channels")
        if self.working_size % 2 ** (len(self.channels) - 1):
            raise ValueError(
                f"working_size {self.working_size} must be divisible by "
                f"{2 ** (len(self.channels) - 1)} (one halving per level)"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch_size and patience must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["channels"] = list(self.channels)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegmentationConfig:
        known = {key: values[key] for key in cls.__dataclass_fields__ if key in values}
        if "channels" in known:
            known["channels"] = tuple(known["channels"])
        return cls(**known)


class LungSegmenter(nn.Module):
    """Normalized (N, 1, S, S) -> lung logits (N, 1, S, S)."""

    def __init__(self, config: SegmentationConfig) -> None:
        super().__init__()
        self.working_size = config.working_size
        self.unet = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=config.channels,
            strides=(2,) * (len(config.channels) - 1),
            num_res_units=config.residual_units,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        small = F.interpolate(images, size=(self.working_size, self.working_size), mode="area")
        logits = self.unet(small)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _as_input(images: np.ndarray, preprocessing: PreprocessingConfig) -> torch.Tensor:
    return torch.from_numpy(normalize_uint8(np.asarray(images), preprocessing))[:, None]


def predict_lung_logits(
    model: nn.Module,
    images: np.ndarray,
    preprocessing: PreprocessingConfig,
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """uint8 (N, S, S) squares -> float32 (N, S, S) lung logits."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = _as_input(images[start : start + batch_size], preprocessing).to(device)
            out.append(model(batch)[:, 0].float().cpu().numpy())
    size = preprocessing.image_size
    return np.concatenate(out) if out else np.zeros((0, size, size), np.float32)


def _augment(
    images: torch.Tensor, masks: torch.Tensor, config: SegmentationConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    n = images.shape[0]
    angle = np.radians(rng.uniform(-config.max_rotation_degrees, config.max_rotation_degrees, n))
    scale = 1.0 + rng.uniform(-config.max_scale, config.max_scale, n)
    shift = rng.uniform(-config.max_shift, config.max_shift, (n, 2)) * 2  # grid runs -1..1
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.stack(
        [np.stack([cos, -sin, shift[:, 0]], 1), np.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(images.shape), align_corners=False)
    # Outside the film is the darkest value the batch has, as a collimated border is.
    background = images.amin(dim=(2, 3), keepdim=True)
    moved = F.grid_sample(images - background, grid, align_corners=False) + background
    moved_masks = F.grid_sample(masks, grid, mode="nearest", align_corners=False)
    # Exposure: contrast and brightness, in the normalized units the network sees.
    gain = torch.from_numpy(rng.uniform(0.8, 1.2, (n, 1, 1, 1))).float()
    offset = torch.from_numpy(rng.uniform(-0.3, 0.3, (n, 1, 1, 1))).float()
    return moved * gain + offset, moved_masks


@dataclass
class SegmentationEpoch:
    epoch: int
    train_loss: float
    val_dice: float
    seconds: float


@dataclass
class SegmentationTraining:
    model: LungSegmenter
    config: SegmentationConfig
    history: list[SegmentationEpoch] = field(default_factory=list)
    best_epoch: int = 0
    train_images: int = 0

    @property
    def best_val_dice(self) -> float:
        return max((e.val_dice for e in self.history), default=float("nan"))

    @property
    def train_seconds(self) -> float:
        return sum(e.seconds for e in self.history)


def _batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    # The last short batch is dropped: a batch of one makes BatchNorm's statistics noise.
    for start in range(0, n - size + 1, size):
        yield np.sort(order[start : start + size])


def dice_scores(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice of two bool (N, H, W) stacks (MONAI's DiceMetric; both empty = 1)."""
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    values = metric(_channel(predicted), _channel(truth))
    return values.numpy()[:, 0].astype(np.float64)


def hd95_pixels(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image 95th-percentile Hausdorff distance in pixels; an empty prediction of a
    non-empty truth scores the image's diagonal (the worst a prediction can be), not NaN."""
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    with warnings.catch_warnings():
        # Empty masks are scored below, not left to MONAI's NaN and its warning about them;
        # MONAI 1.5+ also warns about an argument its own metric passes to itself.
        warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan")
        warnings.filterwarnings(
            "ignore", message=".*always_return_as_numpy", category=FutureWarning
        )
        values = metric(_channel(predicted), _channel(truth)).numpy()[:, 0].astype(np.float64)
    diagonal = math.hypot(*predicted.shape[1:])
    empty_pred = ~predicted.reshape(len(predicted), -1).any(1)
    empty_truth = ~truth.reshape(len(truth), -1).any(1)
    values[empty_pred & empty_truth] = 0.0
    values[empty_pred ^ empty_truth] = diagonal
    return np.nan_to_num(values, nan=diagonal, posinf=diagonal)


# What a pair of lung fields says about the thorax it is in, each relative to the image side:
# how much of the image is lung, the fields' extent and its aspect, where they start and end,
# where they are centred, how the smaller field compares with the larger, and how much of the
# span between the fields' outer edges the heart and mediastinum take in their lower third.
LUNG_GEOMETRY = (
    "area",
    "height",
    "width",
    "aspect",
    "top",
    "bottom",
    "centre_x",
    "smaller_to_larger",
    "lower_gap",
)


def lung_field_geometry(masks: np.ndarray) -> np.ndarray:
    """bool (N, S, S) lung fields -> float32 (N, len(LUNG_GEOMETRY)); zeros where none found."""
    from scipy import ndimage

    masks = np.asarray(masks, dtype=bool)
    side = masks.shape[-1]
    rows_out = np.zeros((len(masks), len(LUNG_GEOMETRY)), dtype=np.float32)
    for index, mask in enumerate(masks):
        if not mask.any():
            continue
        rows, columns = np.nonzero(mask)
        top, bottom = rows.min() / side, (rows.max() + 1) / side
        left, right = columns.min() / side, (columns.max() + 1) / side
        labels, count = ndimage.label(mask)
        sizes = np.sort(ndimage.sum(mask, labels, range(1, count + 1)))[::-1]
        lower = mask[int(rows.min() + 2 * (rows.max() - rows.min()) / 3) : rows.max() + 1]
        occupied = lower[:, columns.min() : columns.max() + 1].any(axis=0)
        rows_out[index] = (
            mask.mean(),
            bottom - top,
            right - left,
            (bottom - top) / (right - left),
            top,
            bottom,
            (left + right) / 2,
            sizes[1] / sizes[0] if count > 1 else 0.0,
            1.0 - occupied.mean(),
        )
    return rows_out


def _channel(masks: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]


def train_segmenter(
    config: SegmentationConfig,
    preprocessing: PreprocessingConfig,
    train_images: np.ndarray,
    train_masks: np.ndarray,
    val_images: np.ndarray,
    val_masks: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[SegmentationEpoch, bool], None] | None = None,
) -> SegmentationTraining:
    """Train on (uint8 squares, bool masks); keep the weights of the best validation Dice."""
    if len(train_images) < config.batch_size:
        raise SegmentationError(
            f"{len(train_images)} training images with a mask: fewer than one batch "
            f"({config.batch_size})"
        )
    if len(val_images) == 0:
        raise SegmentationError("no validation image has a mask: nothing to stop early on")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = LungSegmenter(config).to(device)
    loss_function = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = len(train_images) // config.batch_size
    # One warm-up then a cosine decay over the planned epochs (OneCycle): a from-scratch U-Net
    # settles its borders in the late low-rate steps.
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch
    )
    result = SegmentationTraining(model=model, config=config, train_images=len(train_images))
    best_state: dict[str, torch.Tensor] | None = None
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        losses = []
        for chosen in _batches(len(train_images), config.batch_size, rng):
            images = _as_input(train_images[chosen], preprocessing)
            masks = _channel(np.asarray(train_masks[chosen]))
            if config.augment:
                images, masks = _augment(images, masks, config, rng)
            loss = loss_function(model(images.to(device)), masks.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        logits = predict_lung_logits(
            model, val_images, preprocessing, batch_size=config.eval_batch_size
        )
        val_dice = float(dice_scores(logits > 0, np.asarray(val_masks, dtype=bool)).mean())
        record = SegmentationEpoch(
            epoch, float(np.mean(losses)), val_dice, time.perf_counter() - started
        )
        improved = not result.history or val_dice > result.best_val_dice
        result.history.append(record)
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            result.best_epoch = epoch
        if on_epoch is not None:
            on_epoch(record, improved)
        if epoch - result.best_epoch >= config.patience:
            break
    assert best_state is not None  # the first epoch is always the best so far
    model.load_state_dict(best_state)
    model.eval()
    result.model = model.cpu()
    return result


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class SegmentationReport:
    """Per-image figures and their summaries on one split."""

    split: str
    per_image: pd.DataFrame  # relative_path, patient_id, label, family, dice, hd95_px, areas
    summary: dict[str, Any]
    by_group: dict[str, dict[str, dict[str, Any]]]

    def worst(self, n: int = 10) -> pd.DataFrame:
        return self.per_image.nsmallest(n, "dice")

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "summary": self.summary,
            "by_group": self.by_group,
            "per_image": self.per_image.to_dict(orient="records"),
        }


def _summary(
    frame: pd.DataFrame, *, n_bootstrap: int, seed: int, confidence: float = 0.95
) -> dict[str, Any]:
    dice = frame["dice"].to_numpy()
    hd95 = frame["hd95_px"].to_numpy()
    summary: dict[str, Any] = {
        "images": len(frame),
        "patients": int(frame["patient_id"].nunique()),
        "dice_mean": float(dice.mean()),
        "dice_median": float(np.median(dice)),
        "dice_p5": float(np.percentile(dice, 5)),
        "dice_min": float(dice.min()),
        "hd95_px_mean": float(hd95.mean()),
        "hd95_px_median": float(np.median(hd95)),
        "hd95_px_p95": float(np.percentile(hd95, 95)),
    }
    # Patients, not images, are the independent draws: a patient's images share anatomy.
    labels = (frame["label"] == "PNEUMONIA").to_numpy().astype(int)
    means_dice, means_hd95 = [], []
    for chosen in patient_resamples(labels, frame["patient_id"].to_numpy(), n_bootstrap, seed=seed):
        means_dice.append(dice[chosen].mean())
        means_hd95.append(hd95[chosen].mean())
    alpha = (1 - confidence) / 2
    for name, draws in (("dice_mean", means_dice), ("hd95_px_mean", means_hd95)):
        if draws:
            summary[f"{name}_ci"] = [
                float(np.quantile(draws, alpha)),
                float(np.quantile(draws, 1 - alpha)),
            ]
    return summary


def evaluate_masks(
    predicted: np.ndarray,
    truth: np.ndarray,
    index: pd.DataFrame,
    *,
    split: str = "test",
    family: Callable[[str], str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> SegmentationReport:
    """Dice and HD95 per image, their summaries overall, by class and by file family.

    ``predicted`` and ``truth`` are bool (N, H, W); ``index`` holds one row per image
    (``relative_path``, ``patient_id``, ``label``) in the same order.
    """
    predicted = np.asarray(predicted, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if len(predicted) != len(truth) or len(truth) != len(index):
        raise SegmentationError("predictions, masks and index must have one row per image each")
    if len(truth) == 0:
        raise SegmentationError(f"no image of the {split} split has a mask: nothing to evaluate")
    per_image = pd.DataFrame(
        {
            "relative_path": index["relative_path"].astype(str).to_numpy(),
            "patient_id": index["patient_id"].astype(str).to_numpy(),
            "label": index["label"].astype(str).to_numpy(),
            "dice": dice_scores(predicted, truth),
            "hd95_px": hd95_pixels(predicted, truth),
            "lung_share_truth": truth.reshape(len(truth), -1).mean(1),
            "lung_share_predicted": predicted.reshape(len(predicted), -1).mean(1),
        }
    )
    if family is not None:
        per_image["family"] = [family(path) for path in per_image["relative_path"]]
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for column in ("label", "family"):
        if column not in per_image:
            continue
        groups[column] = {
            str(value): _summary(part, n_bootstrap=n_bootstrap, seed=seed)
            for value, part in per_image.groupby(column)
        }
    summary = _summary(per_image, n_bootstrap=n_bootstrap, seed=seed)
    summary["image_size"] = int(truth.shape[-1])
    return SegmentationReport(split=split, per_image=per_image, summary=summary, by_group=groups)

"""How a model holds up when the images change: held-out scores under acquisition shifts.

A model chosen on validation AUC alone tends to be the one that fits this dataset's scanners
best. An external test set comes from other scanners and other processing, so the recipe search
also scores each candidate on the held-out test split after the shifts of
:mod:`cxr_platform.data.shifts` (contrast, noise, blur, resolution, exposure), with the
operating point frozen on clean validation images, exactly as a deployment would meet them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.shifts import apply_shift
from cxr_platform.data.transforms import TensorBatches
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.evaluation import threshold_metrics
from cxr_platform.models.training import predict_logits

# Moderate severities: strong enough to move a brittle model, not so strong that every model
# collapses to chance (inversion is left out: it is a pipeline bug, not a scanner difference).
ROBUSTNESS_SHIFTS: dict[str, float] = {
    "contrast": 0.5,
    "noise": 0.3,
    "blur": 0.5,
    "resolution": 0.5,
    "exposure": 0.3,
}


@dataclass(frozen=True)
class ShiftedScore:
    shift: str
    severity: float
    auc: float
    sensitivity: float
    specificity: float

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def shifted_split(images: np.ndarray, shift: str, severity: float, *, seed: int = 0) -> np.ndarray:
    """uint8 (N, S, S) -> the same images after ``shift``, back at S x S and uint8."""
    rng = np.random.default_rng(seed)
    size = images.shape[1:]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        shifted = apply_shift(image.astype(np.float32) / 255.0, shift, severity=severity, rng=rng)
        if shifted.shape != size:  # "resolution" downsamples; the model input is S x S again
            resized = Image.fromarray(shifted).resize(size[::-1], Image.Resampling.BILINEAR)
            shifted = np.asarray(resized, dtype=np.float32)
        out[i] = np.clip(np.rint(shifted * 255.0), 0, 255).astype(np.uint8)
    return out


def score_split(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    preprocessing: PreprocessingConfig,
    operating_point: OperatingPoint,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
) -> tuple[float, float, float]:
    """AUC, and sensitivity and specificity at the frozen operating point."""
    batches = TensorBatches(images, labels, preprocessing, device=device)
    logits = predict_logits(model, batches, batch_size=batch_size)
    metrics = threshold_metrics(
        labels, operating_point.probabilities(logits), operating_point.threshold
    )
    return float(roc_auc_score(labels, logits)), metrics["sensitivity"], metrics["specificity"]


def robustness_scores(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    preprocessing: PreprocessingConfig,
    operating_point: OperatingPoint,
    *,
    shifts: dict[str, float] = ROBUSTNESS_SHIFTS,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[ShiftedScore]:
    scores = []
    for shift, severity in shifts.items():
        shifted = shifted_split(images, shift, severity, seed=seed)
        auc, sensitivity, specificity = score_split(
            model, shifted, labels, preprocessing, operating_point, device=device
        )
        scores.append(ShiftedScore(shift, severity, auc, sensitivity, specificity))
    return scores

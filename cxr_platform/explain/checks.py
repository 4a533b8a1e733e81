"""Quantitative checks that a heatmap means something.

- Pointing game (Zhang et al. 2016): does the heatmap's maximum fall on the lesion? Compared with
  the hit rate of a uniformly random point, which equals the share of the image the (tolerance-
  widened) lesion covers.
- Relevance inside the lung fields: what share of a heatmap's relevance lies on the lungs (the
  region pneumonia can be in) rather than on a shoulder, the neck or a burnt-in marker; the lungs
  are the lung segmentation version's fields, so this check runs on every real image.
- Model randomization (Adebayo et al. 2018): a method whose maps barely change when the trained
  weights are replaced by random ones explains the image, not the model.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from scipy.stats import binomtest, spearmanr
from torch import nn

from cxr_platform.explain.gradcam import HeatmapMethod

# The pointing game's customary 15 pixels at 224x224, scaled with the image.
DEFAULT_TOLERANCE_FRACTION = 15 / 224
DEFAULT_MAX_RANK_CORRELATION = 0.5


@dataclass(frozen=True)
class PointingGameResult:
    n: int
    hits: int
    hit_rate: float
    random_point_hit_rate: float  # expected hit rate of a uniformly random point
    tolerance_px: float

    @property
    def lift(self) -> float:
        return self.hit_rate / self.random_point_hit_rate if self.random_point_hit_rate else 0.0

    @property
    def p_value(self) -> float:
        """One-sided binomial test against random points: could chance explain the hits?"""
        return float(
            binomtest(self.hits, self.n, self.random_point_hit_rate, alternative="greater").pvalue
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "lift": self.lift, "p_value": self.p_value}

    @classmethod
    def from_dict(cls, values: dict) -> PointingGameResult:
        return cls(**{key: values[key] for key in cls.__dataclass_fields__})


def pointing_game(
    heatmaps: np.ndarray, masks: np.ndarray, *, tolerance_px: float | None = None
) -> PointingGameResult:
    """Hit when the heatmap's maximum lies within ``tolerance_px`` of a lesion pixel.

    ``heatmaps`` (N, H, W) and boolean ``masks`` (N, H, W) must be aligned; images with an empty
    mask are skipped. All-zero heatmaps have no maximum and count as misses.
    """
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    if heatmaps.shape != masks.shape:
        raise ValueError(f"heatmaps {heatmaps.shape} and masks {masks.shape} differ in shape")
    if tolerance_px is None:
        tolerance_px = DEFAULT_TOLERANCE_FRACTION * heatmaps.shape[-1]
    hits = 0
    n = 0
    covered = []
    for heatmap, mask in zip(heatmaps, masks, strict=True):
        if not mask.any():
            continue
        n += 1
        near_lesion = distance_transform_edt(~mask) <= tolerance_px
        covered.append(float(near_lesion.mean()))
        if heatmap.max() > 0:
            row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            hits += bool(near_lesion[row, col])
    if n == 0:
        raise ValueError("no image has a lesion mask: the pointing game needs positives")
    return PointingGameResult(
        n=n,
        hits=hits,
        hit_rate=hits / n,
        random_point_hit_rate=float(np.mean(covered)),
        tolerance_px=float(tolerance_px),
    )


@dataclass(frozen=True)
class RandomizationResult:
    n: int
    mean_abs_rank_correlation: float
    max_allowed: float
    per_image: list[float]

    @property
    def passed(self) -> bool:
        """True when the trained model's maps differ from a random model's: the method is
        sensitive to the weights."""
        return self.mean_abs_rank_correlation <= self.max_allowed

    def to_dict(self) -> dict:
        values = asdict(self)
        values.pop("per_image")
        return {**values, "passed": self.passed}

    @classmethod
    def from_dict(cls, values: dict) -> RandomizationResult:
        # The JSON form leaves the per-image correlations out.
        return cls(
            n=values["n"],
            mean_abs_rank_correlation=values["mean_abs_rank_correlation"],
            max_allowed=values["max_allowed"],
            per_image=list(values.get("per_image", [])),
        )


def randomized_copy(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """The same architecture with every parameter and BatchNorm statistic re-initialized."""
    clone = copy.deepcopy(model).cpu()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in clone.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    finally:
        torch.random.set_rng_state(generator_state)
    device = next(model.parameters()).device
    return clone.to(device).eval()


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        # A constant map carries no ranking: it shares nothing with the other map.
        return 0.0
    return float(spearmanr(a, b).statistic)


def randomization_check(
    method: HeatmapMethod,
    model: nn.Module,
    images: torch.Tensor,
    *,
    max_abs_rank_correlation: float = DEFAULT_MAX_RANK_CORRELATION,
    seed: int = 0,
    downsample: int = 4,
) -> RandomizationResult:
    """Spearman rank correlation between the trained and a re-initialized model's maps.

    Maps are compared after ``downsample``-fold average pooling, as in Adebayo et al., so that
    the bilinear upsampling's many near-ties do not dominate the ranking.
    """
    trained = method(model, images)
    randomized = method(randomized_copy(model, seed=seed), images)

    def pooled(maps: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(maps))[:, None]
        return torch.nn.functional.avg_pool2d(tensor, downsample)[:, 0].numpy()

    correlations = [
        abs(_rank_correlation(a, b))
        for a, b in zip(pooled(trained), pooled(randomized), strict=True)
    ]
    return RandomizationResult(
        n=len(correlations),
        mean_abs_rank_correlation=float(np.mean(correlations)),
        max_allowed=max_abs_rank_correlation,
        per_image=correlations,
    )

"""Explain a trained model on its test split: gallery, pointing game, randomization check.

Shared by the ``gradcam_gallery`` Dagster asset and the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cxr_platform.data.cache import PreprocessedCache  # noqa: E402
from cxr_platform.data.preprocessing import (  # noqa: E402
    PreprocessingConfig,
    normalize_uint8,
    to_square_uint8,
)
from cxr_platform.data.synthetic import lesion_mask_path  # noqa: E402
from cxr_platform.data.transforms import TensorBatches  # noqa: E402
from cxr_platform.explain.checks import (  # noqa: E402
    PointingGameResult,
    RandomizationResult,
    pointing_game,
    randomization_check,
)
from cxr_platform.explain.gradcam import gradcam_method, heatmaps_for_uint8, overlay  # noqa: E402
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.checkpoint import Checkpoint  # noqa: E402
from cxr_platform.models.reporting import save_figure  # noqa: E402
from cxr_platform.models.training import predict_logits  # noqa: E402

GALLERY_GROUPS = ("true positive", "false positive", "false negative", "true negative")


@dataclass
class ExplanationReport:
    model_name: str
    arch: str
    n_test: int
    gallery: Path
    gallery_cases: list[dict[str, Any]]
    pointing_game: PointingGameResult | None  # None where the data has no lesion masks
    randomization: RandomizationResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "arch": self.arch,
            "n_test": self.n_test,
            "gallery": str(self.gallery),
            "gallery_cases": self.gallery_cases,
            "pointing_game": self.pointing_game.to_dict() if self.pointing_game else None,
            "randomization": self.randomization.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExplanationReport:
        game = values.get("pointing_game")
        return cls(
            model_name=values["model_name"],
            arch=values["arch"],
            n_test=values["n_test"],
            gallery=Path(values["gallery"]),
            gallery_cases=list(values["gallery_cases"]),
            pointing_game=PointingGameResult.from_dict(game) if game else None,
            randomization=RandomizationResult.from_dict(values["randomization"]),
        )

    @classmethod
    def read_json(cls, path: Path) -> ExplanationReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


GALLERY_PER_GROUP = 4  # cases shown per outcome


def select_gallery_cases(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, per_group: int
) -> dict[str, np.ndarray]:
    """Indices per outcome: the most confident correct calls and the most confident mistakes."""
    predicted = probabilities >= threshold
    positive = labels.astype(bool)
    order_high = np.argsort(-probabilities, kind="stable")
    order_low = order_high[::-1]
    groups = {
        "true positive": (order_high, positive & predicted),
        "false positive": (order_high, ~positive & predicted),
        "false negative": (order_low, positive & ~predicted),
        "true negative": (order_low, ~positive & ~predicted),
    }
    return {name: order[member[order]][:per_group] for name, (order, member) in groups.items()}


def _dataset_root(path: str, relative_path: str) -> Path:
    return Path(path[: len(path) - len(relative_path)])


def lesion_masks(
    cache_index: pd.DataFrame, preprocessing: PreprocessingConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, boolean masks at model resolution) for the rows that have a lesion mask.

    Only the synthetic set ships masks; real data yields no rows.
    """
    rows, masks = [], []
    paths = cache_index["path"].astype(str)
    relatives = cache_index["relative_path"].astype(str)
    for row, (path, relative) in enumerate(zip(paths, relatives, strict=True)):
        path = lesion_mask_path(_dataset_root(path, relative), relative)
        if path is None:
            continue
        mask = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
        # Through the image's own geometry (stretch or letterbox), so mask and pixels align.
        masks.append(to_square_uint8(mask, preprocessing) >= 128)
        rows.append(row)
    if not rows:
        return np.array([], dtype=int), np.zeros((0, 0, 0), dtype=bool)
    return np.asarray(rows), np.stack(masks)


def plot_gallery(
    images: np.ndarray,
    heatmaps: dict[int, np.ndarray],
    cases: dict[str, np.ndarray],
    probabilities: np.ndarray,
    names: list[str],
    path: Path,
    title: str,
    *,
    fields: dict[int, np.ndarray] | None = None,
    shares: dict[int, float] | None = None,
) -> Path:
    """The cases by outcome, each heatmap over its image; with ``fields`` (bool masks on the same
    square) the lung fields are outlined in cyan and the title gives ``shares``, the relevance
    inside them."""
    columns = max(1, max((len(v) for v in cases.values()), default=1))
    fig, axes = plt.subplots(
        len(GALLERY_GROUPS),
        columns,
        figsize=(2.3 * columns, (2.6 if fields is None else 2.9) * len(GALLERY_GROUPS)),
        squeeze=False,
    )
    for row, group in enumerate(GALLERY_GROUPS):
        for col in range(columns):
            ax = axes[row][col]
            ax.axis("off")
            chosen = cases.get(group, [])
            if col >= len(chosen):
                if col == 0:
                    ax.text(0.5, 0.5, f"no {group}", ha="center", va="center", fontsize=8)
                continue
            index = int(chosen[col])
            ax.imshow(overlay(images[index], heatmaps[index]))
            caption = f"{group}\np={probabilities[index]:.2f}  {names[index][:18]}"
            if fields is not None:
                ax.contour(fields[index], levels=[0.5], colors="cyan", linewidths=0.8)
                share = (shares or {}).get(index)
                caption += "\nno relevance" if share is None else f"\n{share:.0%} on the lungs"
            ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=90)


def explain_checkpoint(
    checkpoint_path: Path,
    operating_point: OperatingPoint,
    cache: PreprocessedCache,
    out_dir: Path,
    *,
    model_name: str | None = None,
    per_group: int = GALLERY_PER_GROUP,
    max_pointing_cases: int = 64,
    randomization_cases: int = 16,
    seed: int = 0,
) -> ExplanationReport:
    """``operating_point`` is the one the checkpoint's evaluation fitted (the gallery's groups
    are cut at its threshold)."""
    checkpoint = Checkpoint.load(checkpoint_path)
    arch = checkpoint.arch
    model_name = model_name or arch
    preprocessing = checkpoint.preprocessing_config
    model = checkpoint.bare_model()  # Grad-CAM on CPU: a few dozen images

    test = TensorBatches.from_cache(cache, "test")
    images = test.images[:, 0].numpy()  # the same uint8 memory, not a second load
    labels = test.labels_np
    # The same scores the evaluation and the exported model give (test-time augmentation too).
    probabilities = operating_point.probabilities(predict_logits(checkpoint.scoring_model(), test))
    index = cache.index("test")
    names = [Path(p).name for p in index["relative_path"].astype(str)]

    cases = select_gallery_cases(labels, probabilities, operating_point.threshold, per_group)
    chosen = np.unique(np.concatenate([v for v in cases.values()]).astype(int))
    # Only the shown cases: a map per test image would be N x S x S floats for nothing.
    heatmaps: dict[int, np.ndarray] = {}
    if len(chosen):
        maps = heatmaps_for_uint8(model, arch, images[chosen], preprocessing)
        heatmaps = dict(zip(chosen.tolist(), maps, strict=True))
    gallery = plot_gallery(
        images,
        heatmaps,
        cases,
        probabilities,
        names,
        out_dir / "gradcam_gallery.png",
        f"{model_name}: Grad-CAM on the test split (threshold {operating_point.threshold:.3f})",
    )

    pointing = None
    mask_rows, masks = lesion_masks(index, preprocessing)
    if len(mask_rows):
        mask_rows, masks = mask_rows[:max_pointing_cases], masks[:max_pointing_cases]
        pointing = pointing_game(
            heatmaps_for_uint8(model, arch, images[mask_rows], preprocessing), masks
        )

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(images), min(randomization_cases, len(images)), replace=False))
    normalized = torch.from_numpy(normalize_uint8(images[sample], preprocessing))[:, None]
    randomization = randomization_check(
        gradcam_method(arch, relu=False), model, normalized, seed=seed
    )

    report = ExplanationReport(
        model_name=model_name,
        arch=arch,
        n_test=len(images),
        gallery=gallery,
        gallery_cases=[
            {
                "group": group,
                "file": names[int(i)],
                "probability": float(probabilities[int(i)]),
                "label": "PNEUMONIA" if labels[int(i)] else "NORMAL",
            }
            for group, indices in cases.items()
            for i in indices
        ],
        pointing_game=pointing,
        randomization=randomization,
    )
    (out_dir / "explanations.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report

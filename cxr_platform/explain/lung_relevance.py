"""Where a classifier looks, on real images: the share of its Grad-CAM relevance inside the lung
fields a segmentation version draws, on every image of a split.

The founding document's explainability step asks whether the model looks at the correct lung
regions; the synthetic set answers with its drawn lesions (the pointing game), real images only
with lung fields. The report gives the distribution per class and lists the images where most of
the relevance lies outside the lungs, with a picture of the worst (heatmap and fields drawn over
the image), which is what a reader of the evaluation looks at first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.transforms import TensorBatches
from cxr_platform.explain.gradcam import heatmaps_for_uint8
from cxr_platform.explain.report import GALLERY_PER_GROUP, plot_gallery, select_gallery_cases
from cxr_platform.model_version.lung_fields import relevance_inside
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.reporting import image_grid, save_figure
from cxr_platform.models.segmentation import LungSegmenter, predict_lung_logits
from cxr_platform.models.training import predict_logits

WORST_SHOWN = 10


def _summary(frame: pd.DataFrame) -> dict[str, Any]:
    shares = frame["relevance_in_lungs"].dropna().to_numpy()
    if len(shares) == 0:
        return {"images": len(frame), "with_relevance": 0}
    return {
        "images": len(frame),
        "with_relevance": len(shares),
        "median": float(np.median(shares)),
        "p10": float(np.percentile(shares, 10)),
        "mostly_outside": int((shares < 0.5).sum()),
        "lung_area_median": float(frame["lung_area_share"].median()),
    }


@dataclass(frozen=True)
class LungRelevance:
    model_name: str
    split: str
    summary: dict[str, Any]
    by_class: dict[str, dict[str, Any]]
    per_image: pd.DataFrame  # relative_path, label, relevance_in_lungs, lung_area_share
    picture: Path
    # The Grad-CAM gallery's cases (the most confident right and wrong calls at the operating
    # point), each with its share on the lungs, and their picture; empty without an operating
    # point.
    gallery_cases: list[dict[str, Any]] = field(default_factory=list)
    gallery: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "split": self.split,
            "summary": self.summary,
            "by_class": self.by_class,
            "per_image": self.per_image.to_dict(orient="records"),
            "gallery_cases": self.gallery_cases,
        }

    def markdown(self) -> str:
        lines = [
            f"## Where {self.model_name} looks, on the {self.split} split",
            "",
            "The share of each image's Grad-CAM relevance inside the lung fields the "
            "segmentation version draws. A map spread evenly would score the lungs' share of "
            "the image.",
            "",
            "| images | with relevance | median share in lungs | 10th percentile | mostly "
            "outside (share < 0.5) | lungs' median share of the image |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, values in (("all", self.summary), *sorted(self.by_class.items())):
            if not values.get("with_relevance"):
                lines.append(f"| {name} | 0 | n/a | n/a | n/a | n/a |")
                continue
            lines.append(
                f"| {name} ({values['images']}) | {values['with_relevance']} | "
                f"{values['median']:.3f} | {values['p10']:.3f} | {values['mostly_outside']} | "
                f"{values['lung_area_median']:.3f} |"
            )
        if self.gallery_cases:
            lines += [
                "",
                "The Grad-CAM gallery's cases, on the lungs:",
                "",
                "| outcome | image | probability | share in lungs |",
                "| --- | --- | ---: | ---: |",
            ]
            for case in self.gallery_cases:
                share = case["relevance_in_lungs"]
                lines.append(
                    f"| {case['group']} | {case['file']} | {case['probability']:.2f} | "
                    + ("no relevance" if share is None else f"{share:.0%}")
                    + " |"
                )
        return "\n".join(lines) + "\n"


def _plot_worst(
    images: np.ndarray, heatmaps: np.ndarray, fields: np.ndarray, frame: pd.DataFrame, path: Path
) -> Path:
    worst = frame.dropna(subset=["relevance_in_lungs"]).nsmallest(WORST_SHOWN, "relevance_in_lungs")
    fig, axes = image_grid(len(worst), columns=min(5, max(1, len(worst))), cell=(2.4, 2.6))
    for ax, (position, row) in zip(axes, worst.iterrows(), strict=False):
        ax.imshow(images[position], cmap="gray")
        ax.imshow(heatmaps[position], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.contour(fields[position], levels=[0.5], colors="cyan", linewidths=1.0)
        ax.set_title(
            f"{Path(str(row['relative_path'])).name}\n{row['label']}, "
            f"{row['relevance_in_lungs']:.0%} in lungs",
            fontsize=7,
        )
    fig.suptitle(
        "Least relevance inside the lung fields (cyan): Grad-CAM over the image", fontsize=9
    )
    return save_figure(fig, path, dpi=90)


def _gallery_on_lungs(
    classifier: Checkpoint,
    cache: PreprocessedCache,
    split: str,
    operating_point: OperatingPoint,
    heatmaps: np.ndarray,
    fields: np.ndarray,
    frame: pd.DataFrame,
    out_dir: Path,
    model_name: str,
) -> tuple[list[dict[str, Any]], Path]:
    """The gallery's selection, scored as the evaluation scores (test-time augmentation too)."""
    batches = TensorBatches.from_cache(cache, split)
    probabilities = operating_point.probabilities(
        predict_logits(classifier.scoring_model(), batches)
    )
    cases = select_gallery_cases(
        batches.labels_np, probabilities, operating_point.threshold, GALLERY_PER_GROUP
    )
    chosen = sorted({int(i) for indices in cases.values() for i in indices})
    shares = frame["relevance_in_lungs"].to_numpy()
    names = [Path(str(p)).name for p in frame["relative_path"]]
    picture = plot_gallery(
        np.asarray(cache.images(split)),
        {i: heatmaps[i] for i in chosen},
        cases,
        probabilities,
        names,
        out_dir / f"{split}-gallery-on-lungs.png",
        f"{model_name}: the Grad-CAM gallery's cases, lung fields in cyan",
        fields={i: fields[i] for i in chosen},
        shares={i: float(shares[i]) for i in chosen if not np.isnan(shares[i])},
    )
    listed = [
        {
            "group": group,
            "file": names[int(i)],
            "probability": float(probabilities[int(i)]),
            "label": str(frame["label"].iloc[int(i)]),
            "relevance_in_lungs": None if np.isnan(shares[int(i)]) else float(shares[int(i)]),
        }
        for group, indices in cases.items()
        for i in indices
    ]
    return listed, picture


def measure_lung_relevance(
    classifier: Checkpoint,
    segmenter: LungSegmenter,
    segmenter_preprocessing: PreprocessingConfig,
    cache: PreprocessedCache,
    out_dir: Path,
    *,
    model_name: str,
    split: str = "test",
    operating_point: OperatingPoint | None = None,
) -> LungRelevance:
    """Grad-CAM of ``classifier`` and the fields of ``segmenter`` on every image of ``split``,
    both on the cache's square; the report as JSON and Markdown, and the worst as a picture.
    With the ``operating_point`` its evaluation fitted, also the Grad-CAM gallery's cases (the
    same selection as the gallery's) with their fields and shares."""
    if classifier.preprocessing_config != segmenter_preprocessing:
        raise ValueError(
            "the classifier and the segmenter prepare images differently: their maps and fields "
            "would not line up"
        )
    images = np.asarray(cache.images(split))
    index = cache.index(split).reset_index(drop=True)
    heatmaps = heatmaps_for_uint8(
        classifier.bare_model(), classifier.arch, images, classifier.preprocessing_config
    )
    fields = predict_lung_logits(segmenter, images, segmenter_preprocessing) > 0
    frame = pd.DataFrame(
        {
            "relative_path": index["relative_path"].astype(str),
            "label": index["label"].astype(str),
            "relevance_in_lungs": relevance_inside(heatmaps, fields),
            "lung_area_share": fields.mean(axis=(1, 2)),
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = _plot_worst(images, heatmaps, fields, frame, out_dir / f"{split}-least-in-lungs.png")
    gallery_cases, gallery = [], None
    if operating_point is not None:
        gallery_cases, gallery = _gallery_on_lungs(
            classifier, cache, split, operating_point, heatmaps, fields, frame, out_dir, model_name
        )
    report = LungRelevance(
        model_name=model_name,
        split=split,
        summary=_summary(frame),
        by_class={label: _summary(part) for label, part in frame.groupby("label")},
        per_image=frame,
        picture=picture,
        gallery_cases=gallery_cases,
        gallery=gallery,
    )
    (out_dir / f"{split}.json").write_text(json.dumps(report.to_dict(), indent=1))
    (out_dir / f"{split}.md").write_text(report.markdown())
    return report

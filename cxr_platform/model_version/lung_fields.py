"""The lung segmentation version as files, and what it says about one image: where its lung
fields are, how much of the image they cover, and whether the lungs are wholly in the picture.

What a scoring process needs to use an exported segmenter, without torch or the training code:
the ONNX file carries its preprocessing, run and test Dice (``metadata_props``), and it takes
exactly the classifier's prepared square, so the fields lie on the classifier's own grid (the
grid of its Grad-CAM). A segmenter whose square differs from the classifier's (size, stretch or
letterbox) is not used for that classifier: its fields would not line up.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image

from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8
from cxr_platform.model_version.files import ExportError, onnx_session

SEGMENTER_ONNX_FILE = "lung_segmenter.onnx"
SEGMENTER_REPORT_FILE = "segmentation.json"
SEGMENTER_INPUT = "image"
SEGMENTER_OUTPUT = "lung_logits"
SEGMENTER_METADATA_KEY = "cxr_lung_segmenter"
# The limits are fitted on the validation split's predicted fields (the split that stopped
# training; the test split stays for judging): below AREA_MARGIN times the AREA_PERCENTILE-th
# percentile of its areas is "far below what the version saw"; above the OUTLIER_PERCENTILE-th
# percentile of its largest share of one side, "cut by the border"; above that percentile of
# its raggedness, "broken up"; below the matching lower percentile of the balance between its
# left and right halves, "one-sided". Floors keep a few grazing or jagged pixels from counting.
AREA_PERCENTILE = 1.0
AREA_MARGIN = 0.75
OUTLIER_PERCENTILE = 99.5
MIN_SIDE_SHARE = 0.05
MIN_RAGGEDNESS = 4.0
LUNGS_SMALL = "lung_fields_small"
LUNGS_CUT = "lung_fields_cut_by_border"
LUNGS_BROKEN = "lung_fields_broken_up"
LUNGS_ONE_SIDED = "lung_fields_one_sided"
MAX_BALANCE_FLOOR = 0.5  # below half of one field against the other is never "typical"
FINDINGS = {
    LUNGS_SMALL: "the lung fields cover far less of the image than in the images the version "
    "was judged on: part of the lungs may be out of the picture or hidden",
    LUNGS_CUT: "the image's border cuts the lung fields: part of the lungs is not in the picture",
    LUNGS_BROKEN: "the lung fields are broken up, unlike any the version drew in training: the "
    "image may not show the lungs as it knows them (collimator shutters, another projection)",
    LUNGS_ONE_SIDED: "one lung field is far smaller than the other: one lung may be out of the "
    "picture (a crop, a rotated patient)",
}


def relevance_inside(heatmaps: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Per image, the share of the heatmap's relevance (its positive mass) inside the region.

    ``heatmaps`` (N, H, W) and boolean ``regions`` (N, H, W) must be aligned. NaN for a map with
    no positive relevance: it points nowhere, so it is neither inside nor outside.
    """
    heatmaps = np.clip(np.asarray(heatmaps, dtype=np.float64), 0.0, None)
    regions = np.asarray(regions, dtype=bool)
    if heatmaps.shape != regions.shape:
        raise ValueError(f"heatmaps {heatmaps.shape} and regions {regions.shape} differ in shape")
    total = heatmaps.reshape(len(heatmaps), -1).sum(1)
    inside = (heatmaps * regions).reshape(len(heatmaps), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def segmenter_metadata(path: str | Path) -> dict[str, Any]:
    """What an exported segmenter carries (``preprocessing``, recipe, run, test Dice, the
    limits of its fields)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path}: not an ONNX model ({exc})") from exc
    for entry in proto.metadata_props:
        if entry.key == SEGMENTER_METADATA_KEY:
            return json.loads(entry.value)
    raise ExportError(f"{path} is not an exported lung segmenter (no {SEGMENTER_METADATA_KEY})")


@dataclass(frozen=True)
class FieldMeasures:
    """Per mask (arrays of N): what the findings are judged on."""

    area_share: np.ndarray  # the share of the square the fields cover
    side_share: np.ndarray  # the largest share of any one side of the square inside the fields
    # Boundary pixels over the square root of the area: about 6 for two smooth lung fields,
    # far more for fields in pieces or with frayed edges; 0 for an empty mask.
    raggedness: np.ndarray
    # The smaller half's share of the fields over the larger's (left and right of the square's
    # midline): near 1 with both lungs in the picture, near 0 with one; 0 for an empty mask.
    balance: np.ndarray


def field_measures(masks: np.ndarray) -> FieldMeasures:
    """:class:`FieldMeasures` of bool masks (N, S, S)."""
    masks = np.asarray(masks, dtype=bool)
    sides = np.stack(
        [masks[:, 0].mean(1), masks[:, -1].mean(1), masks[:, :, 0].mean(1), masks[:, :, -1].mean(1)]
    )
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    interior = (
        padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    )
    boundary = (masks & ~interior).sum(axis=(1, 2))
    area = masks.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        raggedness = np.where(area > 0, boundary / np.sqrt(np.maximum(area, 1)), 0.0)
    half = masks.shape[2] // 2
    left, right = masks[:, :, :half].sum(axis=(1, 2)), masks[:, :, half:].sum(axis=(1, 2))
    larger = np.maximum(left, right)
    balance = np.where(larger > 0, np.minimum(left, right) / np.maximum(larger, 1), 0.0)
    return FieldMeasures(masks.mean(axis=(1, 2)), sides.max(axis=0), raggedness, balance)


@dataclass(frozen=True)
class FieldLimits:
    """When a lung segmentation version says the lungs are not wholly in the picture."""

    min_area_share: float
    max_side_share: float
    max_raggedness: float
    min_balance: float
    fitted_on: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FieldLimits:
        return cls(
            float(values["min_area_share"]),
            float(values["max_side_share"]),
            float(values["max_raggedness"]),
            float(values["min_balance"]),
            dict(values.get("fitted_on", {})),
        )

    def findings(self, measures: FieldMeasures, index: int = 0) -> tuple[str, ...]:
        found = []
        if measures.area_share[index] < self.min_area_share:
            found.append(LUNGS_SMALL)
        if measures.side_share[index] > self.max_side_share:
            found.append(LUNGS_CUT)
        if measures.raggedness[index] > self.max_raggedness:
            found.append(LUNGS_BROKEN)
        if measures.balance[index] < self.min_balance:
            found.append(LUNGS_ONE_SIDED)
        return tuple(found)


def fit_field_limits(measures: FieldMeasures, *, split: str = "val") -> FieldLimits:
    """The limits from the predicted fields of images whose lungs are in the picture."""
    if len(measures.area_share) == 0:
        raise ValueError("no images to fit the lung field limits on")
    area_floor = float(np.percentile(measures.area_share, AREA_PERCENTILE))
    side_top = float(np.percentile(measures.side_share, OUTLIER_PERCENTILE))
    ragged_top = float(np.percentile(measures.raggedness, OUTLIER_PERCENTILE))
    balance_floor = float(np.percentile(measures.balance, 100 - OUTLIER_PERCENTILE))
    return FieldLimits(
        min_area_share=AREA_MARGIN * area_floor,
        max_side_share=max(MIN_SIDE_SHARE, side_top),
        max_raggedness=max(MIN_RAGGEDNESS, ragged_top),
        min_balance=min(MAX_BALANCE_FLOOR, balance_floor),
        fitted_on={
            "split": split,
            "images": len(measures.area_share),
            f"area_share_p{AREA_PERCENTILE:g}": area_floor,
            "area_share_median": float(np.median(measures.area_share)),
            f"side_share_p{OUTLIER_PERCENTILE:g}": side_top,
            f"raggedness_p{OUTLIER_PERCENTILE:g}": ragged_top,
            "raggedness_median": float(np.median(measures.raggedness)),
            f"balance_p{100 - OUTLIER_PERCENTILE:g}": balance_floor,
        },
    )


# The crop keeps this share of the fields' larger side as a margin on every side: the
# costophrenic angles and apices sit on the fields' edge, and a segmenter's edge is a few pixels
# off. Below MIN_CROP_AREA_SHARE of the square the fields are too few to place a crop on.
CROP_MARGIN = 0.1
MIN_CROP_AREA_SHARE = 0.05


def lung_crop_boxes(masks: np.ndarray, *, margin: float = CROP_MARGIN) -> np.ndarray:
    """Per bool mask (N, S, S), the square box ``(left, top, right, bottom)`` around its fields.

    The box is the fields' bounding box grown by ``margin`` of its larger side on every side,
    then squared about its centre (so the crop does not stretch the thorax) and moved inside the
    image. A mask covering less than ``MIN_CROP_AREA_SHARE`` of the square gets the whole square:
    no crop is better than one placed on a few stray pixels.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be (N, S, S), not {masks.shape}")
    size = masks.shape[1]
    boxes = np.tile(np.array([0, 0, size, size], dtype=np.int64), (len(masks), 1))
    for index, mask in enumerate(masks):
        if mask.mean() < MIN_CROP_AREA_SHARE:
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        side = max(bottom - top, right - left)
        side = min(size, int(round(side * (1 + 2 * margin))))
        centre_y, centre_x = (top + bottom) / 2, (left + right) / 2
        top = int(np.clip(round(centre_y - side / 2), 0, size - side))
        left = int(np.clip(round(centre_x - side / 2), 0, size - side))
        boxes[index] = (left, top, left + side, top + side)
    return boxes


def crop_to_boxes(squares: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """uint8 squares (N, S, S), each cut to its box and brought back to S x S (bilinear)."""
    squares = np.asarray(squares)
    if squares.dtype != np.uint8 or squares.ndim != 3:
        raise ValueError(f"squares must be uint8 (N, S, S), not {squares.dtype} {squares.shape}")
    if len(boxes) != len(squares):
        raise ValueError(f"{len(boxes)} boxes for {len(squares)} squares")
    size = squares.shape[1]
    out = np.empty_like(squares)
    for index, (square, box) in enumerate(zip(squares, boxes, strict=True)):
        if tuple(box) == (0, 0, size, size):
            out[index] = square
            continue
        image = Image.fromarray(square, mode="L")
        out[index] = np.asarray(
            image.resize((size, size), Image.Resampling.BILINEAR, box=tuple(float(v) for v in box))
        )
    return out


@dataclass(frozen=True)
class LungFields:
    """One image's predicted lung fields on the classifier's square."""

    mask: np.ndarray  # bool (S, S)
    version: str
    limits: FieldLimits | None = None  # None: a version exported before limits existed

    @property
    def measures(self) -> FieldMeasures:
        return field_measures(self.mask[None])

    @property
    def area_share(self) -> float:
        """The share of the square the fields cover."""
        return float(self.mask.mean())

    @property
    def findings(self) -> tuple[str, ...]:
        """Quality findings: the lungs are not wholly in the picture (:data:`FINDINGS`)."""
        return () if self.limits is None else self.limits.findings(self.measures)

    def relevance_inside(self, heatmap: np.ndarray) -> float | None:
        """The share of a heatmap's positive relevance inside the fields (None: the map has
        none, so it points nowhere). ``heatmap`` on the same square."""
        share = float(relevance_inside(np.asarray(heatmap)[None], self.mask[None])[0])
        return None if np.isnan(share) else share

    def summary(self, heatmap: np.ndarray | None = None) -> dict[str, Any]:
        values: dict[str, Any] = {
            "lung_fields_version": self.version,
            "lung_area_share": round(self.area_share, 4),
            "lung_field_findings": list(self.findings),
        }
        if heatmap is not None:
            inside = self.relevance_inside(heatmap)
            values["relevance_in_lungs"] = None if inside is None else round(inside, 4)
        return values


class LungFieldModel:
    """An exported segmenter, loaded for scoring."""

    def __init__(
        self, folder: str | Path, *, model_version: str, threads: int | None = None
    ) -> None:
        path = Path(folder) / SEGMENTER_ONNX_FILE
        if not path.exists():
            raise ExportError(f"{folder} has no {SEGMENTER_ONNX_FILE}")
        self.metadata = segmenter_metadata(path)
        self.preprocessing = PreprocessingConfig.from_dict(self.metadata["preprocessing"])
        limits = self.metadata.get("field_limits")
        self.limits = FieldLimits.from_dict(limits) if limits else None
        self.model_version = model_version
        self.session = onnx_session(path, threads=threads)

    def fits(self, preprocessing: PreprocessingConfig) -> bool:
        """Whether its fields line up with a classifier prepared this way."""
        return (
            preprocessing.image_size == self.preprocessing.image_size
            and preprocessing.resize_mode == self.preprocessing.resize_mode
        )

    def fields(self, squares: np.ndarray) -> list[LungFields]:
        """Lung fields of prepared uint8 squares (N, S, S) or one square (S, S)."""
        squares = np.asarray(squares)
        if squares.ndim == 2:
            squares = squares[None]
        size = self.preprocessing.image_size
        if squares.shape[1:] != (size, size):
            raise ValueError(f"the segmenter takes {size}x{size} squares, not {squares.shape[1:]}")
        batch = normalize_uint8(squares, self.preprocessing)[:, None]
        logits = self.session.run([SEGMENTER_OUTPUT], {SEGMENTER_INPUT: batch})[0]
        return [
            LungFields(mask=logit[0] > 0, version=self.model_version, limits=self.limits)
            for logit in logits
        ]

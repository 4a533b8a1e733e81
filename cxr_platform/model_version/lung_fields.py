"""The lung segmentation version as files, and what it says about one image: where its lung
fields are, how much of the image they cover, whether the border cuts them.

What a scoring process needs to use an exported segmenter, without torch or the training code:
the ONNX file carries its preprocessing, run and test Dice (``metadata_props``), and it takes
exactly the classifier's prepared square, so the fields lie on the classifier's own grid (the
grid of its Grad-CAM). A segmenter whose square differs from the classifier's (size, stretch or
letterbox) is not used for that classifier: its fields would not line up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8
from cxr_platform.model_version.files import ExportError, onnx_session

SEGMENTER_ONNX_FILE = "lung_segmenter.onnx"
SEGMENTER_REPORT_FILE = "segmentation.json"
SEGMENTER_INPUT = "image"
SEGMENTER_OUTPUT = "lung_logits"
SEGMENTER_METADATA_KEY = "cxr_lung_segmenter"
# The share of the image's border pixels the fields may touch before they count as cut by it.
# A lung that runs off the film touches a long stretch of the border; a field that grazes a
# corner of a tightly collimated image touches a few pixels.
BORDER_CUT_SHARE = 0.02


def segmenter_metadata(path: str | Path) -> dict[str, Any]:
    """What an exported segmenter carries (``preprocessing``, recipe, run, test Dice)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path}: not an ONNX model ({exc})") from exc
    for entry in proto.metadata_props:
        if entry.key == SEGMENTER_METADATA_KEY:
            return json.loads(entry.value)
    raise ExportError(f"{path} is not an exported lung segmenter (no {SEGMENTER_METADATA_KEY})")


@dataclass(frozen=True)
class LungFields:
    """One image's predicted lung fields on the classifier's square."""

    mask: np.ndarray  # bool (S, S)
    version: str

    @property
    def area_share(self) -> float:
        """The share of the square the fields cover."""
        return float(self.mask.mean())

    @property
    def border_share(self) -> float:
        """The share of the square's border pixels inside the fields."""
        edge = np.concatenate(
            [self.mask[0], self.mask[-1], self.mask[1:-1, 0], self.mask[1:-1, -1]]
        )
        return float(edge.mean())

    @property
    def cut_by_border(self) -> bool:
        return self.border_share > BORDER_CUT_SHARE

    def relevance_inside(self, heatmap: np.ndarray) -> float | None:
        """The share of a heatmap's positive relevance inside the fields (None: the map has
        none, so it points nowhere). ``heatmap`` on the same square."""
        heatmap = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, None)
        if heatmap.shape != self.mask.shape:
            raise ValueError(f"heatmap {heatmap.shape} and fields {self.mask.shape} differ")
        total = float(heatmap.sum())
        return float((heatmap * self.mask).sum() / total) if total > 0 else None

    def summary(self, heatmap: np.ndarray | None = None) -> dict[str, Any]:
        values: dict[str, Any] = {
            "lung_fields_version": self.version,
            "lung_area_share": round(self.area_share, 4),
            "lung_fields_cut_by_border": self.cut_by_border,
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
        return [LungFields(mask=logit[0] > 0, version=self.model_version) for logit in logits]

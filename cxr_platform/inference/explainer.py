"""Grad-CAM for one image from a registry folder: the eager model rebuilt from ``weights.pt``.

ONNX Runtime cannot give gradients, so explanations use the PyTorch weights exported alongside
the ONNX file; the prediction itself still comes from the :class:`Predictor`, so the label shown
with a heatmap is exactly the one served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_platform.data.imaging import DecodedImage
from cxr_platform.data.patient_age import UNKNOWN, AgeReading
from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8
from cxr_platform.explain.gradcam import gradcam_heatmaps, overlay
from cxr_platform.inference.live import ServingModels
from cxr_platform.inference.scoring import request_for, score_items
from cxr_platform.model_version.files import WEIGHTS_FILE, ExportError
from cxr_platform.model_version.lung_fields import LungFieldModel, LungFields
from cxr_platform.model_version.predictor import Prediction, Predictor
from cxr_platform.models.zoo import build_model


@dataclass(frozen=True)
class Explanation:
    prediction: Prediction
    heatmap: np.ndarray  # float32 (S, S) in [0, 1], at the model's input resolution
    overlay: np.ndarray  # RGB uint8 at the original image's resolution
    lung_fields: LungFields | None = None  # on the heatmap's grid, where a version drew them

    def lung_summary(self) -> dict[str, Any]:
        """Where the heatmap lies and whether the lungs are in the picture; {} without fields."""
        return self.lung_fields.summary(self.heatmap) if self.lung_fields else {}


class Explainer:
    def __init__(
        self,
        model_dir: str | Path,
        predictor: Predictor | None = None,
        *,
        lung_fields: LungFieldModel | None = None,
    ) -> None:
        """``lung_fields``: a lung segmentation version whose fields each explanation is
        measured against (``explain`` only; callers with their own snapshot use theirs)."""
        self.lung_fields = lung_fields
        model_dir = Path(model_dir)
        weights = model_dir / WEIGHTS_FILE
        if not weights.exists():
            raise ExportError(f"{model_dir} has no {WEIGHTS_FILE}: cannot compute Grad-CAM")
        self.predictor = predictor or Predictor(model_dir)
        self.arch = self.predictor.metadata.arch
        self.model = build_model(self.arch, pretrained="none").model
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model.eval()

    def explain(
        self, source: str | Path | bytes, *, patient_age: AgeReading = UNKNOWN
    ) -> Explanation:
        """Scored through the scoring core (input gate, intended use; nothing logged), then
        Grad-CAM. Raises :class:`~cxr_platform.inference.scoring.RefusedInputError` where the
        version refuses the image and :class:`~cxr_platform.errors.ImageReadError` where it
        cannot be read."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        models = ServingModels(self.predictor, None, lung_fields=self.lung_fields)
        request = request_for(
            models,
            data,
            max_pixels=self.predictor.max_pixels,
            uid_salt=b"",
            started=time.perf_counter(),
            source="explain",
            patient_age=patient_age,
        )
        prediction = score_items([request])[0].released()
        prepared = request.prepared
        assert prepared.decoded is not None
        heatmap, blended = self.heatmap_overlay(prepared.pixels, prepared.decoded)
        fields = models.fields_of(prepared.pixels, self.predictor)
        return Explanation(prediction, heatmap, blended, fields)

    def heatmap(self, pixels: np.ndarray) -> np.ndarray:
        """Grad-CAM of an already prepared uint8 square, at the model's resolution."""
        normalized = normalize_uint8(pixels[None], self.predictor.preprocessing)
        return gradcam_heatmaps(self.model, self.arch, torch.from_numpy(normalized)[:, None])[0]

    def heatmap_overlay(
        self, pixels: np.ndarray, decoded: DecodedImage
    ) -> tuple[np.ndarray, np.ndarray]:
        """Grad-CAM of an already prepared uint8 square, and its overlay on the original image
        (for callers that scored the image elsewhere, such as the HTTP service)."""
        heatmap = self.heatmap(pixels)
        return heatmap, self.overlay(heatmap, decoded)

    def overlay(self, heatmap: np.ndarray, decoded: DecodedImage) -> np.ndarray:
        """A model-resolution ``heatmap`` (or one already on the original's grid) blended over
        the original image, at the original's resolution."""
        original = np.clip(np.rint(decoded.pixels * 255.0), 0, 255).astype(np.uint8)
        if heatmap.shape != original.shape:
            heatmap = content_region(heatmap, original.shape, self.predictor.preprocessing)
        return overlay(original, heatmap)

    def content_region(self, heatmap: np.ndarray, original_shape: tuple[int, int]) -> np.ndarray:
        return content_region(heatmap, original_shape, self.predictor.preprocessing)


def content_region(
    heatmap: np.ndarray, original_shape: tuple[int, int], config: PreprocessingConfig
) -> np.ndarray:
    """The part of a model-resolution map that covers the original image: all of it when the
    image was stretched, the unpadded centre when it was letterboxed."""
    if config.resize_mode != "letterbox":
        return heatmap
    height, width = original_shape
    side = max(height, width)
    size = heatmap.shape[0]
    top = round((side - height) // 2 * size / side)
    left = round((side - width) // 2 * size / side)
    rows = max(1, round(height * size / side))
    cols = max(1, round(width * size / side))
    return heatmap[top : top + rows, left : left + cols]

"""Export the lung segmentation version to ONNX, with what it needs to be used carried inside.

The graph takes the classifier's own input (normalized (N, 1, S, S)) and returns lung logits of
the same size; its ``metadata_props`` carry the preprocessing, the recipe, the training run and
the test Dice, so the file alone says what it expects and how good it was. Parity is checked
against eager PyTorch on real images before the file is kept: the largest logit difference, and
the share of pixels whose lung/background call differs (a logit near zero may flip; a mask that
moves would be a broken export).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8
from cxr_platform.model_version.files import ExportError, onnx_session
from cxr_platform.model_version.lung_fields import (
    SEGMENTER_INPUT,
    SEGMENTER_METADATA_KEY,
    SEGMENTER_OUTPUT,
    FieldLimits,
    field_measures,
    fit_field_limits,
    segmenter_metadata,
)
from cxr_platform.models.segmentation import LungSegmenter, predict_lung_logits

# Logits are compared at fp32: the exporter's graph and eager PyTorch differ in the order of
# additions only. A lung/background call may flip where a logit is within that of zero.
LOGIT_TOLERANCE = 1e-3
MAX_PIXELS_FLIPPED = 1e-4
PARITY_IMAGES = 64  # the first test images, compared pixel by pixel


@dataclass(frozen=True)
class SegmenterParity:
    n_images: int
    max_abs_logit_diff: float
    pixels_flipped: float  # share of pixels whose lung/background call differs

    @property
    def passed(self) -> bool:
        return (
            self.max_abs_logit_diff <= LOGIT_TOLERANCE and self.pixels_flipped <= MAX_PIXELS_FLIPPED
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def export_segmenter_onnx(
    model: LungSegmenter,
    preprocessing: PreprocessingConfig,
    path: Path,
    *,
    metadata: dict[str, Any],
) -> Path:
    """ONNX through torch's maintained exporter, with a dynamic batch axis; written whole."""
    model = model.eval().cpu()
    size = preprocessing.image_size
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.zeros(2, 1, size, size),),
            input_names=[SEGMENTER_INPUT],
            output_names=[SEGMENTER_OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(tmp))
    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key = SEGMENTER_METADATA_KEY
    entry.value = json.dumps({**metadata, "preprocessing": preprocessing.to_dict()})
    onnx.save(proto, str(tmp))
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)
    return path


def segmenter_parity(
    model: LungSegmenter,
    onnx_path: Path,
    images: np.ndarray,
    preprocessing: PreprocessingConfig,
    *,
    batch_size: int = 32,
) -> SegmenterParity:
    """ONNX Runtime against eager PyTorch (CPU fp32) on uint8 squares (N, S, S)."""
    model = model.eval().cpu()
    session = onnx_session(onnx_path)
    worst, flipped, pixels = 0.0, 0, 0
    for start in range(0, len(images), batch_size):
        batch = normalize_uint8(np.asarray(images[start : start + batch_size]), preprocessing)
        batch = batch[:, None]
        with torch.inference_mode():
            reference = model(torch.from_numpy(batch)).numpy()
        exported = session.run(None, {SEGMENTER_INPUT: batch})[0]
        worst = max(worst, float(np.abs(exported - reference).max()))
        flipped += int(((exported > 0) != (reference > 0)).sum())
        pixels += reference.size
    if pixels == 0:
        raise ExportError("no image to check the exported segmenter on")
    return SegmenterParity(len(images), worst, flipped / pixels)


@dataclass(frozen=True)
class ExportedSegmenter:
    onnx: Path
    limits: FieldLimits
    parity: SegmenterParity


def _exported_as(path: Path, metadata: dict[str, Any], preprocessing: PreprocessingConfig) -> bool:
    """Whether ``path`` is already the export these facts describe."""
    if not path.exists():
        return False
    try:
        carried = segmenter_metadata(path)
    except ExportError:
        return False
    wanted = json.loads(json.dumps({**metadata, "preprocessing": preprocessing.to_dict()}))
    return carried == wanted


def export_lung_fields(
    model: LungSegmenter,
    preprocessing: PreprocessingConfig,
    cache: PreprocessedCache,
    path: Path,
    *,
    metadata: dict[str, Any],
) -> ExportedSegmenter:
    """The segmenter as a lung fields version ships it: the limits of its fields fitted on the
    validation split (the split that stopped training; the test split stays for judging),
    carried in the ONNX file beside ``metadata``, and parity on the first test images.

    Written once: an export these facts already describe stays as it is (it may be registered,
    or being read). A file that fails parity is removed, so no failed export is left to ship.
    """
    val_fields = predict_lung_logits(model, cache.images("val"), preprocessing) > 0
    limits = fit_field_limits(field_measures(val_fields), split="val")
    metadata = {**metadata, "field_limits": limits.to_dict()}
    if not _exported_as(path, metadata, preprocessing):
        export_segmenter_onnx(model, preprocessing, path, metadata=metadata)
    parity = segmenter_parity(
        model, path, np.asarray(cache.images("test")[:PARITY_IMAGES]), preprocessing
    )
    if not parity.passed:
        path.unlink()
    return ExportedSegmenter(path, limits, parity)

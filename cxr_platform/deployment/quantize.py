"""INT8 static quantization of an exported ONNX model (ONNX Runtime, QDQ, per-channel weights).

Activation ranges are calibrated on validation images, never test images. The platform metadata
travels with the file, marked ``precision = "int8"``, so a quantized file alone still serves
with the right preprocessing and threshold.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from sklearn.metrics import roc_auc_score

from cxr_platform.data.preprocessing import normalize_uint8
from cxr_platform.model_version.files import (
    INT8_ONNX_FILE,
    ONNX_FILE,
    read_onnx_metadata,
    write_onnx_metadata,
)
from cxr_platform.model_version.predictor import Predictor


class _Calibration(CalibrationDataReader):
    def __init__(self, inputs: np.ndarray, input_name: str, batch_size: int) -> None:
        self._batches = iter(
            {input_name: inputs[start : start + batch_size]}
            for start in range(0, len(inputs), batch_size)
        )

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize_int8(
    onnx_path: Path,
    calibration_images: np.ndarray,
    out_path: Path,
    *,
    batch_size: int = 16,
) -> Path:
    """``calibration_images``: uint8 (N, S, S) validation images (a few hundred suffice)."""
    metadata = read_onnx_metadata(onnx_path)
    if len(calibration_images) == 0:
        raise ValueError("INT8 calibration needs at least one image")
    inputs = normalize_uint8(np.asarray(calibration_images), metadata.preprocessing_config)
    with tempfile.TemporaryDirectory(prefix="cxr-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared))  # shape inference + graph cleanup
        tmp = Path(work) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(tmp),
            _Calibration(inputs[:, None], metadata.input_name, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        write_onnx_metadata(tmp, dataclasses.replace(metadata, precision="int8"))
        staged = out_path.with_name(out_path.name + ".tmp")
        staged.write_bytes(tmp.read_bytes())
        os.replace(staged, out_path)
    return out_path


MAX_INT8_AUC_DROP = 0.005


@dataclass(frozen=True)
class Int8Decision:
    """Whether the INT8 variant ships: judged on validation, like every other choice."""

    val_auc_fp32: float
    val_auc_int8: float
    max_auc_drop: float
    n_calibration: int

    @property
    def kept(self) -> bool:
        return self.val_auc_fp32 - self.val_auc_int8 <= self.max_auc_drop

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "kept": self.kept}


def add_int8_variant(
    export_dir: Path,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    *,
    calibration_images: int = 256,
    seed: int = 0,
    max_auc_drop: float = MAX_INT8_AUC_DROP,
) -> Int8Decision:
    """Quantize ``export_dir/model.onnx`` next to it; keep the file only when validation AUC
    drops by at most ``max_auc_drop``. Calibration only sets activation ranges (no labels), so
    judging on the same validation split does not flatter the result."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(val_images), min(calibration_images, len(val_images)), replace=False)
    target = export_dir / INT8_ONNX_FILE
    quantize_int8(export_dir / ONNX_FILE, val_images[np.sort(chosen)], target)
    fp32 = Predictor(export_dir / ONNX_FILE).probabilities(val_images)
    int8 = Predictor(target).probabilities(val_images)
    decision = Int8Decision(
        val_auc_fp32=float(roc_auc_score(val_labels, fp32)),
        val_auc_int8=float(roc_auc_score(val_labels, int8)),
        max_auc_drop=max_auc_drop,
        n_calibration=len(chosen),
    )
    if not decision.kept:
        target.unlink()
    return decision

"""INT8 static quantization of an exported ONNX model (ONNX Runtime, QDQ, per-channel weights).

Activation ranges are calibrated on validation images, never test images. The platform metadata
travels with the file, marked ``precision = "int8"``, so a quantized file alone still serves
with the right preprocessing and threshold.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from cxr_platform.data.preprocessing import normalize_uint8
from cxr_platform.deployment.export import read_onnx_metadata, write_onnx_metadata


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

"""Float arrays inside a model's JSON metadata: little-endian float32, base64. The input gate and
the population check travel in ONNX ``metadata_props`` this way."""

from __future__ import annotations

import base64

import numpy as np


def encode_floats(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def decode_floats(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raises ValueError when the text does not hold an array of ``shape``."""
    array = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if array.size != int(np.prod(shape)):
        raise ValueError(f"array of {array.size} values, expected shape {shape}")
    return array.reshape(shape).astype(np.float32)

"""INT8 static quantization vs fp32 for a registered model: speed and test AUC, same run.

Calibrates on validation images of the model's data (never test), then scores the test split
with both files through the platform's Predictor and measures ONNX Runtime throughput (batch
32) and single-image latency (batch 1) on this machine.

    CXR_HOME=<home with a registry> .venv/bin/python benchmarks/quantization.py \\
        [--model production] [--calibration-images 256] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_platform.data.pipeline import prepare
from cxr_platform.deployment.quantize import quantize_int8
from cxr_platform.deployment.registry import registry_for
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.settings import load_settings


def throughput(predictor: Predictor, images: np.ndarray, seconds: float) -> float:
    predictor.logits(images)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.logits(images)
        n += len(images)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="production")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    registry = registry_for(load_settings().registry)
    info = registry.get(args.model)
    release = info.release
    settings = load_settings(
        data_dir=release.data_dir or None, image_size=(release.preprocessing or {})["image_size"]
    )
    _, cache = prepare(settings.data, progress=False)
    folder = registry.download(info.version)
    val = cache.images("val", mmap=False)
    rng = np.random.default_rng(settings.data.seed)
    calibration = val[rng.choice(len(val), min(args.calibration_images, len(val)), replace=False)]
    test, labels = cache.images("test", mmap=False), cache.labels("test")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        int8_path = quantize_int8(folder / "model.onnx", calibration, Path(tmp) / "int8.onnx")
        quantize_seconds = time.perf_counter() - start
        rows = {}
        for name, path in (("fp32", folder / "model.onnx"), ("int8", int8_path)):
            predictor = Predictor(path, threads=os.cpu_count())
            probabilities = np.concatenate(
                [predictor.probabilities(test[i : i + 64]) for i in range(0, len(test), 64)]
            )
            rows[name] = {
                "auc": roc_auc_score(labels, probabilities),
                "batch32": throughput(predictor, test[:32], args.seconds),
                "batch1_ms": 1000 / throughput(predictor, test[:1], args.seconds),
                "mb": path.stat().st_size / 1e6,
            }
    base = rows["fp32"]
    print(
        f"model v{info.version} ({info.arch}), {len(calibration)} calibration images (val), "
        f"{len(test)} test images, {os.cpu_count()} cores; quantized in {quantize_seconds:.1f} s"
    )
    print(f"{'':6} {'test AUC':>9} {'img/s b32':>10} {'ms b1':>7} {'MB':>6}")
    for name, row in rows.items():
        print(
            f"{name:6} {row['auc']:9.4f} {row['batch32']:10.1f} {row['batch1_ms']:7.1f} "
            f"{row['mb']:6.1f}"
        )
    int8 = rows["int8"]
    print(
        f"int8 vs fp32: {int8['batch32'] / base['batch32']:.2f}x throughput, "
        f"{base['batch1_ms'] / int8['batch1_ms']:.2f}x latency, AUC change "
        f"{int8['auc'] - base['auc']:+.4f}"
    )


if __name__ == "__main__":
    main()

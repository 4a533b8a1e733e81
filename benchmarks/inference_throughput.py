"""Inference throughput of the exported formats against eager PyTorch, per architecture.

For each architecture: eager PyTorch (``inference_mode``), TorchScript and ONNX Runtime (the
path ``cxr predict``, the service and the DICOM node use), at batch 1 (latency) and batch 32
(throughput), fp32 on CPU. Figures are images/s and the ratio to eager PyTorch measured in the
same run. Weights are random: speed does not depend on their values.

    .venv/bin/python benchmarks/inference_throughput.py [--archs baseline_cnn resnet18]
        [--size 224] [--seconds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.deployment.export import export_onnx, export_torchscript, load_torchscript
from cxr_platform.model_version.files import ModelMetadata, onnx_session
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.zoo import build_model


def images_per_second(run: Callable[[], object], batch: int, seconds: float) -> float:
    run()  # warm-up: allocations, ORT graph optimizations, TorchScript profiling runs
    run()
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["baseline_cnn", "resnet18"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} threads, torch {torch.__version__}, {args.size}x{args.size}, fp32 CPU"
    )
    print(f"{'arch':<13} {'batch':>5} {'eager img/s':>12} {'TorchScript':>18} {'ONNX Runtime':>18}")
    operating_point = OperatingPoint(0.5, 1.0, "sensitivity_target", 0.95, 0.95, 0.5).to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            model = build_model(arch, pretrained="none").model.eval()
            metadata = ModelMetadata(
                model_name=arch,
                arch=arch,
                preprocessing=PreprocessingConfig(image_size=args.size).to_dict(),
                operating_point=operating_point,
                mlflow_run_id=None,
                manifest_hash=None,
                git_commit=None,
            )
            onnx_path = export_onnx(model, metadata, Path(tmp) / f"{arch}.onnx")
            script_path = export_torchscript(model, metadata, Path(tmp) / f"{arch}.pt")
            scripted, _ = load_torchscript(script_path)
            session = onnx_session(onnx_path, threads=args.threads)
            for batch in (1, 32):
                images = torch.randn(batch, 1, args.size, args.size)
                as_numpy = images.numpy()

                def eager(images=images, model=model):
                    with torch.inference_mode():
                        return model(images)

                def torchscript(images=images, scripted=scripted):
                    with torch.inference_mode():
                        return scripted(images)

                def ort(as_numpy=as_numpy, session=session):
                    return session.run(None, {"image": as_numpy})

                base = images_per_second(eager, batch, args.seconds)
                script = images_per_second(torchscript, batch, args.seconds)
                onnx_rate = images_per_second(ort, batch, args.seconds)
                print(
                    f"{arch:<13} {batch:>5} {base:>12.1f} {script:>10.1f} ({script / base:4.2f}x)"
                    f" {onnx_rate:>10.1f} ({onnx_rate / base:4.2f}x)"
                )


if __name__ == "__main__":
    main()

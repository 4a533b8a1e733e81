"""Heatmap overlay on a detector-sized radiograph: the platform's Pillow palette/composite
blend against the plain float64 numpy + matplotlib blend (the baseline, measured in the same
run), with the largest difference between the two in grey levels.

    .venv/bin/python benchmarks/overlay.py [--rows 2000] [--columns 1700] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from matplotlib import colormaps
from PIL import Image

from cxr_platform.explain.gradcam import overlay


def float64_overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    height, width = gray.shape
    resized = np.asarray(
        Image.fromarray(heatmap).resize((width, height), Image.Resampling.BILINEAR)
    )
    resized = np.clip(resized, 0.0, 1.0)
    colored = colormaps["jet"](resized)[..., :3]
    base = np.repeat(gray[..., None].astype(np.float64) / 255.0, 3, axis=2)
    weight = alpha * resized[..., None]
    return np.clip(np.rint((base * (1 - weight) + colored * weight) * 255), 0, 255).astype(np.uint8)


def seconds(run: Callable[[], np.ndarray], repeats: int) -> float:
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--columns", type=int, default=1700)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    gray = (rng.random((args.rows, args.columns)) * 255).astype(np.uint8)
    heatmap = rng.random((224, 224)).astype(np.float32)
    baseline = seconds(lambda: float64_overlay(gray, heatmap), args.repeats)
    platform = seconds(lambda: overlay(gray, heatmap), args.repeats)
    difference = np.abs(
        float64_overlay(gray, heatmap).astype(int) - overlay(gray, heatmap).astype(int)
    ).max()
    print(f"{args.rows}x{args.columns}: float64 blend {baseline * 1000:.0f} ms, platform "
          f"{platform * 1000:.0f} ms ({baseline / platform:.1f}x faster), "
          f"max difference {difference} grey levels")  # fmt: skip


if __name__ == "__main__":
    main()

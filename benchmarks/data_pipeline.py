"""Data-pipeline throughput on the shared Kaggle training split (5,216 images).

Measures discovery + profile and the cold cache build, each with one worker (the baseline,
measured in the same run) and with every core, then the warm (reused) cache. Prints images/s
and the ratios against the one-worker baseline. Target: cache build >= 500 images/s on 2 cores.

    .venv/bin/python benchmarks/data_pipeline.py [DATA_DIR] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from cxr_platform.data.cache import build_cache
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.profile import profile_dataset
from cxr_platform.data.sources import discover_images
from cxr_platform.data.splits import make_manifest

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kaggle-chest-xray-224"
)


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if not args.data_dir.exists():
        raise SystemExit(f"data folder {args.data_dir} not found (pass DATA_DIR)")

    config = PreprocessingConfig()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"data: {args.data_dir.name}"
    )
    index, t_discover = _timed(lambda: discover_images(args.data_dir))
    n = index.n_images
    rows = [("discovery", 1, t_discover)]
    profiles = {}
    for workers in sorted({1, args.workers}):
        (profile, inspected), seconds = _timed(
            lambda w=workers: profile_dataset(index, workers=w, progress=False)
        )
        profiles[workers] = inspected
        rows.append(("profile (full decode + sha256)", workers, seconds))
    manifest = make_manifest(profiles[args.workers], seed=0)
    for workers in sorted({1, args.workers}):
        cache_dir = Path(tempfile.mkdtemp(prefix="cxr-bench-cache-"))
        try:
            _, seconds = _timed(
                lambda w=workers, d=cache_dir: build_cache(
                    manifest, d, config, workers=w, progress=False
                )
            )
            rows.append(("cache build (cold)", workers, seconds))
            _, warm = _timed(
                lambda w=workers, d=cache_dir: build_cache(
                    manifest, d, config, workers=w, progress=False
                )
            )
            rows.append(("cache build (warm, reused)", workers, warm))
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)

    baseline = {name: seconds for name, workers, seconds in rows if workers == 1}
    print(f"\n{n} images ({profile.n_unreadable} unreadable, {profile.n_patients} patients)\n")
    print(f"{'stage':34} {'workers':>7} {'seconds':>8} {'images/s':>10} {'vs 1 worker':>12}")
    for name, workers, seconds in rows:
        ratio = baseline.get(name, seconds) / seconds
        print(f"{name:34} {workers:>7} {seconds:>8.2f} {n / seconds:>10.0f} {ratio:>11.2f}x")


if __name__ == "__main__":
    main()

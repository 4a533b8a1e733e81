"""What the lung fields cost on the HTTP path: ``/explain`` and ``/predict`` of the running
service (``bentoml serve``, the shipped service) with the home's lung fields version in
production, against the same service that loads none, in the same run.

``/explain`` runs the segmenter once per image (the share of Grad-CAM relevance inside the lung
fields); ``/predict`` never does, so its figures say whether loading the segmenter costs the
scoring path anything. Requests are sequential, one client: latency per image, not throughput.

    CXR_HOME=<home with a classifier and a lung fields version in production> \\
        .venv/bin/python benchmarks/explain_cost.py [--images DIR] [--n 40]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from cxr_platform.data.sources import discover_images
from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset
from cxr_platform.serving.process import ServiceProcess
from cxr_platform.settings import load_settings

ROUTES = ("/predict", "/explain")


def _images(folder: Path | None, n: int, scratch: Path) -> list[bytes]:
    if folder is None:
        folder = generate_synthetic_dataset(
            scratch / "images", SyntheticSpec(n_patients=max(8, n // 2), seed=21), progress=False
        )
    paths = sorted(discover_images(folder).records["path"])
    chosen = np.random.default_rng(0).permutation(len(paths))[:n]
    return [Path(paths[i]).read_bytes() for i in chosen]


def _timed(client: httpx.Client, route: str, payloads: list[bytes]) -> tuple[list[float], dict]:
    seconds, last = [], {}
    for data in payloads:
        started = time.perf_counter()
        answer = client.post(
            route, files={"file": ("image.png", data)}, headers={"Accept": "application/json"}
        )
        seconds.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise SystemExit(f"{route}: {answer.status_code} {answer.text[:300]}")
        last = answer.json()
    return seconds, last


def _measure(home: Path, payloads: list[bytes], scratch: Path, lungs: bool) -> dict[str, list]:
    env = {
        "CXR_HOME": str(home),
        "CXR_INFERENCE_LOG_URL": f"sqlite:///{scratch}/log-{lungs}.db",
        "CXR_SERVICE_THREADS": str(os.cpu_count() or 1),
    }
    if not lungs:
        env["CXR_REGISTRY_LUNG_MODEL_NAME"] = "cxr-lung-fields-none"  # registered by no one
    results: dict[str, list] = {}
    service = ServiceProcess(env=env, log_path=scratch / f"service-{lungs}.log")
    with service, httpx.Client(base_url=service.url, timeout=120) as client:
        for route in ROUTES:
            _timed(client, route, payloads[:3])  # Grad-CAM network and sessions loaded
        for route in ROUTES:
            seconds, last = _timed(client, route, payloads)
            if route == "/explain" and lungs and "relevance_in_lungs" not in last:
                raise SystemExit("the service loaded no lung fields version from this home")
            results[route] = seconds
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None, help="default: synthetic images")
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    settings = load_settings()
    with tempfile.TemporaryDirectory() as work:
        scratch = Path(work)
        payloads = _images(args.images, args.n, scratch)
        without = _measure(settings.home, payloads, scratch, lungs=False)
        with_lungs = _measure(settings.home, payloads, scratch, lungs=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; commit "
        f"{commit}; {len(payloads)} images, sequential, JSON answers"
    )
    print(f"{'route':<10} {'lung fields':<12} {'p50 ms':>8} {'p95 ms':>8} {'p50 ratio':>10}")
    for route in ROUTES:
        base = statistics.median(without[route])
        for name, figures in (("none", without[route]), ("production", with_lungs[route])):
            p50 = statistics.median(figures)
            p95 = float(np.percentile(figures, 95))
            print(f"{route:<10} {name:<12} {p50 * 1000:8.1f} {p95 * 1000:8.1f} {p50 / base:9.2f}x")


if __name__ == "__main__":
    main()

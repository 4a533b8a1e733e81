"""The HTTP service against raw in-process ONNX Runtime, for the production model.

In one run:
  (a) raw: the production model's ONNX Runtime session in this process, on images already
      prepared (the pure model cost), and the full in-process path from file bytes (decode,
      preprocessing, ONNX Runtime) that the service wraps;
  (b) the live service (``bentoml serve`` started here, same model): latency p50/p95/p99 at
      concurrency 1, and throughput at concurrency 16.
Ratios are service / raw. The load generator runs on the same machine and takes CPU from the
service, so on a small machine the figures are a lower bound for the service.

    CXR_HOME=<home with a production model> .venv/bin/python benchmarks/serve_load.py
        [--images DIR] [--requests 200] [--concurrency 16] [--precision fp32|int8]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from cxr_platform.deployment.registry import PRODUCTION, registry_for
from cxr_platform.inference.batch import expand_inputs
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.serving.process import ServiceProcess
from cxr_platform.settings import load_settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kaggle-chest-xray-224"


def percentiles(seconds: list[float]) -> tuple[float, float, float]:
    ms = np.asarray(seconds) * 1000.0
    return tuple(float(np.percentile(ms, q)) for q in (50, 95, 99))  # type: ignore[return-value]


def accepted_by_the_gate(
    predictor: Predictor, payloads: list[bytes]
) -> tuple[list[bytes], dict[str, int]]:
    """The images the model's input gate accepts, and the others counted by reason: a refused
    image costs the service no model run, so it has no place in a figure about the model's."""
    kept: list[bytes] = []
    refused: dict[str, int] = {}
    for data in payloads:
        prepared = predictor.prepare(data)
        verdict = predictor.judge_input(prepared.decoded.pixels, prepared.pixels)
        if verdict.accepted:
            kept.append(data)
        else:
            refused[str(verdict.reason)] = refused.get(str(verdict.reason), 0) + 1
    return kept, refused


def raw_figures(predictor: Predictor, payloads: list[bytes], batch: int) -> dict[str, float]:
    prepared = np.stack([predictor.prepare(data).pixels for data in payloads[:batch]])
    single = prepared[:1]
    for _ in range(5):
        predictor.logits(single)
    latencies = []
    for _ in range(100):
        start = time.perf_counter()
        predictor.logits(single)
        latencies.append(time.perf_counter() - start)
    full_latencies = []
    for data in payloads[:100]:
        start = time.perf_counter()
        predictor.predict(data)
        full_latencies.append(time.perf_counter() - start)
    # The baseline is the best batch size for raw ONNX Runtime, not the service's own maximum.
    by_batch = {}
    for size in sorted({8, 16, 32, batch}):
        images = np.resize(prepared, (size, *prepared.shape[1:]))
        predictor.logits(images)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 4.0:
            predictor.logits(images)
            n += size
        by_batch[size] = n / (time.perf_counter() - start)
    best_batch = max(by_batch, key=by_batch.__getitem__)
    throughput = by_batch[best_batch]
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 5.0:
        chunk = payloads[n % len(payloads) :][:batch] or payloads[:batch]
        predictor.predict_prepared(np.stack([predictor.prepare(d).pixels for d in chunk]))
        n += len(chunk)
    full_throughput = n / (time.perf_counter() - start)
    return {
        "latency_ms": statistics.median(latencies) * 1000.0,
        "full_latency_ms": statistics.median(full_latencies) * 1000.0,
        "throughput": throughput,
        "best_batch": best_batch,
        "full_throughput": full_throughput,
    }


def process_cpu_seconds(root_pid: int) -> dict[str, float]:
    """CPU time (user + system) of the service's processes and of this one, by role."""
    tick = os.sysconf("SC_CLK_TCK")
    roles: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, parent = int(entry.name), int(fields[1])
        if pid == os.getpid():
            role = "load generator"
        elif "cxr_scorer" in command:
            role = "scorer"
        elif "cxr_pneumonia" in command:
            role = "api"
        elif pid == root_pid or parent == root_pid:
            role = "bentoml arbiter"
        else:
            continue
        roles[role] = roles.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return roles


def service_figures(
    url: str, payloads: list[bytes], requests: int, concurrency: int, root_pid: int
) -> dict[str, float]:
    def post(client: httpx.Client, data: bytes) -> float:
        start = time.perf_counter()
        response = client.post(f"{url}/predict", files={"file": ("image", data)})
        if response.status_code != 200:
            # The gate was asked above; anything else refused here is a finding, not a crash.
            raise SystemExit(f"the service answered {response.status_code}: {response.text}")
        return time.perf_counter() - start

    with httpx.Client(timeout=60) as client:
        for data in payloads[:10]:
            post(client, data)
        sequential = [post(client, payloads[i % len(payloads)]) for i in range(requests)]

    counter = iter(range(requests * 2))
    lock = threading.Lock()
    concurrent_latencies: list[float] = []

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                latency = post(client, payloads[i % len(payloads)])
                with lock:
                    concurrent_latencies.append(latency)

    cpu_before = process_cpu_seconds(root_pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    elapsed = time.perf_counter() - start
    cpu_after = process_cpu_seconds(root_pid)
    n = len(concurrent_latencies)
    cpu_ms = {
        role: (cpu_after[role] - cpu_before.get(role, 0.0)) / n * 1000.0 for role in cpu_after
    }
    p50, p95, p99 = percentiles(sequential)
    c50, c95, c99 = percentiles(concurrent_latencies)
    return {
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "throughput": len(concurrent_latencies) / elapsed,
        "c_p50": c50,
        "c_p95": c95,
        "c_p99": c99,
        "cpu_ms": cpu_ms,  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--max-batch-size", type=int, default=None)
    args = parser.parse_args()

    settings = load_settings()
    registry = registry_for(settings.registry)
    version = registry.aliases().get(PRODUCTION)
    if version is None:
        raise SystemExit(f"no production model in the registry under {settings.home}")
    images_dir = args.images or (SHARED_DATA if SHARED_DATA.exists() else None)
    if images_dir is None:
        raise SystemExit("pass --images DIR (the shared Kaggle copy is not here)")
    files = expand_inputs([images_dir])
    rng = np.random.default_rng(0)
    chosen = [files[i] for i in rng.choice(len(files), size=min(300, len(files)), replace=False)]
    payloads = [path.read_bytes() for path in chosen]

    predictor = Predictor(
        registry.download(version), model_version=version, precision=args.precision
    )
    payloads, refused = accepted_by_the_gate(predictor, payloads)
    if not payloads:
        raise SystemExit(f"the model's input gate refuses every image in {images_dir}: {refused}")
    batch = args.max_batch_size or settings.serving.service_max_batch_size
    raw = raw_figures(predictor, payloads, batch)
    del predictor

    with tempfile.TemporaryDirectory() as scratch:
        env = {
            "CXR_HOME": str(settings.home),
            # The benchmark's requests must not pollute the deployment's inference log.
            "CXR_INFERENCE_LOG_URL": f"sqlite:///{scratch}/bench_log.db",
            "CXR_SERVICE_PRECISION": args.precision,
        }
        if args.max_batch_size:
            env["CXR_SERVICE_MAX_BATCH_SIZE"] = str(args.max_batch_size)
        with ServiceProcess(env=env, log_path=Path(scratch) / "service.log") as service:
            assert service.process is not None
            served = service_figures(
                service.url, payloads, args.requests, args.concurrency, service.process.pid
            )

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; model "
        f"v{version} ({args.precision}); {len(payloads)} distinct images from {images_dir.name}; "
        f"max batch {batch}"
    )
    if refused:
        print(f"left out, refused by the model's input gate: {refused}")
    print(
        f"raw ONNX Runtime, prepared input: {raw['latency_ms']:.1f} ms/image at batch 1, "
        f"{raw['throughput']:.1f} img/s at its best batch size ({raw['best_batch']})"
    )
    print(
        f"raw in-process from bytes (decode+preprocess+ORT): {raw['full_latency_ms']:.1f} ms, "
        f"{raw['full_throughput']:.1f} img/s"
    )
    print(
        f"service c=1:  p50 {served['p50']:.1f} ms  p95 {served['p95']:.1f} ms  "
        f"p99 {served['p99']:.1f} ms"
    )
    print(
        f"service c={args.concurrency}: {served['throughput']:.1f} img/s  (p50 "
        f"{served['c_p50']:.1f} ms, p95 {served['c_p95']:.1f} ms, p99 {served['c_p99']:.1f} ms)"
    )
    accounting = ", ".join(f"{role} {ms:.1f}" for role, ms in sorted(served["cpu_ms"].items()))
    raw_cpu_ms = 1000.0 * (os.cpu_count() or 1) / raw["throughput"]
    service_cpu_ms = sum(ms for role, ms in served["cpu_ms"].items() if role != "load generator")
    print(
        f"CPU per request at c={args.concurrency} (core-ms): {accounting}; raw ONNX Runtime "
        f"needs {raw_cpu_ms:.1f} per image, so the service spends "
        f"{raw_cpu_ms / service_cpu_ms:.0%} of its CPU in the model"
    )
    print(
        f"ratios: c=1 p50 / raw latency = {served['p50'] / raw['latency_ms']:.2f}x "
        f"(target <= 1.5x); c={args.concurrency} throughput / raw = "
        f"{served['throughput'] / raw['throughput']:.0%} (target >= 85%); "
        f"vs in-process from bytes = {served['throughput'] / raw['full_throughput']:.0%}"
    )


if __name__ == "__main__":
    main()

"""The HTTP service against raw in-process ONNX Runtime, for the production model.

In one run:
  (a) raw: the production model's ONNX Runtime session in this process, on images already
      prepared (the pure model cost), and the full in-process path from file bytes (decode,
      preprocessing, ONNX Runtime) that the service wraps;
  (b) the live service (``bentoml serve`` started here, same model), by each way of sending
      (``--modes``): ``multipart`` (POST /predict, the form upload), ``body`` (POST /predict with
      the image as an octet-stream body) and ``batch`` (POST /predict/batch, ``--batch-images``
      a request): latency p50/p95/p99 at concurrency 1, throughput at ``--concurrency``, and the
      CPU the service's process spends per image above what raw ONNX Runtime needs for it (the
      overhead, in core-ms).
With ``--profile``, py-spy samples the service's process during each concurrent phase and the
samples are put into stages (the model, decoding, the input gate, drift features, the log, the
HTTP server, BentoML, ...), in core-ms per image.

Ratios are service / raw. The load generator runs on the same machine and takes CPU from the
service, so on a small machine the figures are a lower bound for the service.

    CXR_HOME=<home with a production model> .venv/bin/python benchmarks/serve_load.py
        [--images DIR] [--requests 200] [--concurrency 16] [--precision fp32|int8]
        [--modes multipart body batch] [--batch-images 16] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
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


# Stages of the service's work, by the frames a sample's stack holds: the innermost frame that
# matches names the stage (so PIL inside the decoder counts as decoding).
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model (ONNX Runtime)", ("onnxruntime",)),
    ("drift features", ("cxr_platform/data/features.py",)),
    ("input gate", ("model_version/input_gate.py",)),
    ("preprocessing", ("data/preprocessing.py",)),
    ("decoding", ("data/imaging.py", "data/dicom_pixels.py", "data/decoded.py")),
    ("inference log (SQL)", ("inference/log.py",)),
    ("inputs kept for feedback", ("inference/retained.py",)),
    ("batcher and scoring core", ("inference/scoring.py", "serving/batching.py")),
    ("edge middleware", ("serving/edge.py",)),
    ("form parsing, temporary file", ("formparsers", "multipart", "tempfile")),
    ("metrics", ("prometheus",)),
    ("logging", ("logging/",)),
    ("service handlers", ("serving/service.py", "serving/answers.py")),
    ("BentoML", ("bentoml",)),
    ("HTTP server (uvicorn)", ("uvicorn", "httptools", "h11")),
    ("Starlette", ("starlette",)),
    ("threads and event loop", ("anyio", "asyncio", "threading", "concurrent")),
)
# Leaf frames of a thread waiting for work: not CPU.
IDLE_LEAVES = (
    "Condition.wait",
    "Event.wait",
    "Runner.run (asyncio/runners.py",
    "select (selectors",
    "_worker (concurrent",
)


def stage_of(frames: list[str]) -> str | None:
    if frames[-1].startswith(IDLE_LEAVES):
        return None
    for frame in reversed(frames):
        for stage, patterns in STAGES:
            if any(pattern in frame for pattern in patterns):
                return stage
    return "other"


def profile_stages(raw_path: Path, rate: int, images: int) -> dict[str, float]:
    """core-ms per image by stage, from py-spy's raw output (one line per distinct stack)."""
    samples: collections.Counter[str] = collections.Counter()
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stage = stage_of(stack.split(";"))
        if stage is not None:
            samples[stage] += int(count)
    return {stage: n * 1000.0 / rate / images for stage, n in samples.most_common()}


class Profiler:
    """py-spy sampling one process (non-blocking: it does not pause the service)."""

    RATE = 250

    def __init__(self, pid: int, out: Path) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.out = out
        self.process = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
             "--rate", str(self.RATE), "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(1.0)  # attached before the load starts
        if self.process.poll() is not None:
            raise SystemExit(f"py-spy could not attach: {self.process.stderr.read().decode()}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)


def api_pid(root_pid: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"cxr_pneumonia" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return root_pid


class Sender:
    """One way of sending images: multipart, the body, or several to a batch request."""

    def __init__(self, mode: str, batch_images: int) -> None:
        self.mode = mode
        self.images_per_request = batch_images if mode == "batch" else 1

    def post(self, client: httpx.Client, url: str, payloads: list[bytes]) -> float:
        start = time.perf_counter()
        if self.mode == "multipart":
            response = client.post(f"{url}/predict", files={"file": ("image", payloads[0])})
        elif self.mode == "body":
            response = client.post(
                f"{url}/predict",
                content=payloads[0],
                headers={"content-type": "application/octet-stream"},
            )
        else:
            files = [("file", (f"{i}", data)) for i, data in enumerate(payloads)]
            response = client.post(f"{url}/predict/batch", files=files)
        if response.status_code != 200:
            # The gate was asked above; anything else refused here is a finding, not a crash.
            raise SystemExit(f"the service answered {response.status_code}: {response.text}")
        if self.mode == "batch":
            statuses = {answer["status"] for answer in response.json()["results"]}
            if statuses != {200}:
                raise SystemExit(f"the service refused images of a batch: {response.text}")
        return time.perf_counter() - start


def service_figures(
    url: str,
    payloads: list[bytes],
    requests: int,
    concurrency: int,
    root_pid: int,
    sender: Sender,
    profile_to: Path | None,
) -> dict[str, object]:
    per = sender.images_per_request

    def chunk(i: int) -> list[bytes]:
        return [payloads[(i * per + k) % len(payloads)] for k in range(per)]

    with httpx.Client(timeout=60) as client:
        for i in range(10):
            sender.post(client, url, chunk(i))
        sequential = [sender.post(client, url, chunk(i)) for i in range(max(20, requests // per))]

    counter = iter(range(max(2 * requests // per, 4 * concurrency)))
    lock = threading.Lock()
    concurrent_latencies: list[float] = []

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                latency = sender.post(client, url, chunk(i))
                with lock:
                    concurrent_latencies.append(latency)

    profiler = Profiler(api_pid(root_pid), profile_to) if profile_to else None
    cpu_before = process_cpu_seconds(root_pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    elapsed = time.perf_counter() - start
    cpu_after = process_cpu_seconds(root_pid)
    images = len(concurrent_latencies) * per
    stages = {}
    if profiler is not None:
        profiler.stop()
        stages = profile_stages(profiler.out, Profiler.RATE, images)
    cpu_ms = {
        role: (cpu_after[role] - cpu_before.get(role, 0.0)) / images * 1000.0 for role in cpu_after
    }
    p50, p95, p99 = percentiles(sequential)
    c50, c95, c99 = percentiles(concurrent_latencies)
    return {
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "throughput": images / elapsed,
        "c_p50": c50,
        "c_p95": c95,
        "c_p99": c99,
        "cpu_ms": cpu_ms,
        "stages": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument(
        "--modes", nargs="+", choices=["multipart", "body", "batch"], default=["multipart"]
    )
    parser.add_argument("--batch-images", type=int, default=16, help="images per batch request")
    parser.add_argument("--profile", action="store_true", help="py-spy the service by stage")
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
    arch = predictor.metadata.arch
    payloads, refused = accepted_by_the_gate(predictor, payloads)
    if not payloads:
        raise SystemExit(f"the model's input gate refuses every image in {images_dir}: {refused}")
    batch = args.max_batch_size or settings.serving.service_max_batch_size
    raw = raw_figures(predictor, payloads, batch)
    del predictor

    served: dict[str, dict] = {}
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
            for mode in args.modes:
                served[mode] = service_figures(
                    service.url,
                    payloads,
                    args.requests,
                    args.concurrency,
                    service.process.pid,
                    Sender(mode, args.batch_images),
                    Path(scratch) / f"profile-{mode}.txt" if args.profile else None,
                )

    raw_cpu_ms = 1000.0 * (os.cpu_count() or 1) / raw["throughput"]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; model "
        f"v{version} {arch} ({args.precision}); {len(payloads)} distinct images from "
        f"{images_dir.name}; max batch {batch}; concurrency {args.concurrency}"
    )
    if refused:
        print(f"left out, refused by the model's input gate: {refused}")
    print(
        f"raw ONNX Runtime, prepared input: {raw['latency_ms']:.1f} ms/image at batch 1, "
        f"{raw['throughput']:.1f} img/s at its best batch size ({raw['best_batch']}) = "
        f"{raw_cpu_ms:.2f} core-ms/image"
    )
    print(
        f"raw in-process from bytes (decode+preprocess+ORT): {raw['full_latency_ms']:.1f} ms, "
        f"{raw['full_throughput']:.1f} img/s"
    )
    print(
        "| mode | c=1 p50 ms (per request) | c=1 p50 / raw | c=N img/s | c=N / raw | "
        "service core-ms/img | overhead core-ms/img | load generator core-ms/img |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, figures in served.items():
        cpu = figures["cpu_ms"]
        service_cpu = sum(ms for role, ms in cpu.items() if role != "load generator")
        print(
            f"| {mode}{f' x{args.batch_images}' if mode == 'batch' else ''} | "
            f"{figures['p50']:.1f} | {figures['p50'] / raw['latency_ms']:.2f}x | "
            f"{figures['throughput']:.1f} | {figures['throughput'] / raw['throughput']:.0%} | "
            f"{service_cpu:.2f} | {service_cpu - raw_cpu_ms:.2f} | "
            f"{cpu.get('load generator', 0.0):.2f} |"
        )
    if args.profile:
        stages = sorted({stage for figures in served.values() for stage in figures["stages"]})
        print(f"\nwhere the service's CPU goes (py-spy, core-ms per image at c={args.concurrency})")
        print("| stage | " + " | ".join(served) + " |")
        print("| --- |" + " --- |" * len(served))
        rows = sorted(
            stages, key=lambda stage: -max(f["stages"].get(stage, 0.0) for f in served.values())
        )
        for stage in rows:
            cells = " | ".join(f"{f['stages'].get(stage, 0.0):.2f}" for f in served.values())
            print(f"| {stage} | {cells} |")
        totals = " | ".join(f"{sum(f['stages'].values()):.2f}" for f in served.values())
        print(f"| all sampled | {totals} |")


if __name__ == "__main__":
    main()

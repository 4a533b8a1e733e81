"""The scoring core in process, against raw ONNX Runtime on the same images, in one run.

Separates what ``inference.scoring`` costs (decode, preprocessing, input features, the log
transaction, retained inputs) from what the HTTP service adds on top of it
(``benchmarks/serve_load.py``). Figures are CPU time per image (all threads of this process),
so they do not depend on how busy the machine is.

    CXR_HOME=<home with a production model> .venv/bin/python benchmarks/scoring_core.py
        [--images DIR] [--n 320] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from cxr_platform.deployment.registry import registry_for
from cxr_platform.inference.batch import expand_inputs
from cxr_platform.inference.live import LiveModels
from cxr_platform.inference.log import InferenceLog
from cxr_platform.inference.retained import RetainedInputs
from cxr_platform.inference.scoring import request_for, score_and_log
from cxr_platform.settings import load_settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kaggle-chest-xray-224"


def cpu_ms_per_image(work, n_images: int) -> float:
    start = time.process_time()
    work()
    return (time.process_time() - start) / n_images * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=SHARED_DATA / "train")
    parser.add_argument("--n", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    settings = load_settings()
    serving = settings.serving
    models = LiveModels(
        registry_for(settings.registry),
        threads=serving.service_threads,
        max_pixels=serving.max_image_pixels,
    )
    models.refresh()
    snapshot = models.current()
    production = snapshot.production
    if production is None:
        raise SystemExit("no production model in this home: run `cxr demo` first")
    payloads = [path.read_bytes() for path in expand_inputs([args.images])[: args.n]]
    scratch = Path(tempfile.mkdtemp(prefix="cxr-scoring-core-"))
    inference_log = InferenceLog(f"sqlite:///{scratch}/inference.db")
    retained = RetainedInputs(scratch / "retained")

    def core(retain: RetainedInputs | None) -> None:
        for i in range(0, len(payloads), args.batch):
            requests = [
                request_for(
                    snapshot,
                    data,
                    max_pixels=serving.max_image_pixels,
                    uid_salt=b"benchmark",
                    started=time.perf_counter(),
                    source="http",
                )
                for data in payloads[i : i + args.batch]
            ]
            score_and_log(inference_log, requests, retain)

    prepared = np.stack([production.prepare(data).pixels for data in payloads])

    def raw() -> None:
        for i in range(0, len(prepared), args.batch):
            production.logits(prepared[i : i + args.batch])

    core(None)  # warm-up: sessions, the SQLite schema
    raw()
    n = len(payloads)
    raw_ms = cpu_ms_per_image(raw, n)
    core_ms = cpu_ms_per_image(lambda: core(None), n)
    retained_ms = cpu_ms_per_image(lambda: core(retained), n)
    print(
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
        f"model v{production.model_version}; {n} images, batches of {args.batch}"
    )
    print(f"raw ONNX Runtime on prepared pixels: {raw_ms:.2f} CPU-ms/image")
    print(
        f"scoring core (decode, preprocess, features, score, log): {core_ms:.2f} CPU-ms/image "
        f"= {raw_ms / core_ms:.0%} of its CPU in the model"
    )
    print(
        f"  with retained inputs written too: {retained_ms:.2f} CPU-ms/image "
        f"= {raw_ms / retained_ms:.0%}"
    )


if __name__ == "__main__":
    main()

"""PACS round trip: from a modality's C-STORE into Orthanc until the SR, SEG and secondary
capture are stored in Orthanc, through the shipped Lua routing and the DICOM node.

A real Orthanc (``deploy/orthanc/`` configuration and routing script) and the node run on this
machine against the production model of ``CXR_HOME`` (``make demo`` makes one). Each image is a
realistic CR (12-bit, rescale and window, MONOCHROME1) built from a fresh synthetic patient at a
detector-sized matrix.

- sequential: one image at a time, the next once the previous one's results are in PACS (the
  latency a radiologist sees when studies trickle in);
- burst: all images in one association, each timed from its own C-STORE (a backlog).

The baseline, measured in the same run, is the C-STORE of the same image into Orthanc alone
(the modality's own cost, no AI); the node's share is its processing time per image.

    CXR_HOME=<home> .venv/bin/python benchmarks/pacs_roundtrip.py [--n 50] [--rows 2000]
        [--columns 1700] [--modes sequential burst]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from cxr_platform.data.sources import discover_images
from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset
from cxr_platform.deployment.registry import registry_for
from cxr_platform.pacs import build_node
from cxr_platform.pacs.orthanc import NodeAddress, OrthancProcess
from cxr_platform.pacs.synthetic_dicom import RadiographSpec, radiograph_dataset
from cxr_platform.ports import free_port
from cxr_platform.settings import load_settings

MODALITY = "BENCH_MODALITY"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def study_series_count(orthanc: OrthancProcess, study_id: str) -> int:
    response = httpx.get(f"{orthanc.url}/studies/{study_id}", timeout=10)
    return len(response.json().get("Series", [])) if response.status_code == 200 else 0


def orthanc_study_id(orthanc: OrthancProcess, study_uid: str) -> str | None:
    found = httpx.post(f"{orthanc.url}/tools/lookup", content=study_uid, timeout=10).json()
    ids = [item["ID"] for item in found if item["Type"] == "Study"]
    return ids[0] if ids else None


def wait_complete(
    orthanc: OrthancProcess, study_uids: list[str], timeout: float = 300.0
) -> dict[str, float]:
    """perf_counter() when each study first holds the source and the three result series
    (every pending study is polled in turn, so an early finisher is not timed late)."""
    deadline = time.perf_counter() + timeout
    ids: dict[str, str] = {}
    done: dict[str, float] = {}
    while len(done) < len(study_uids):
        if time.perf_counter() > deadline:
            raise TimeoutError(
                f"{len(study_uids) - len(done)} studies incomplete after {timeout} s"
            )
        for uid in study_uids:
            if uid in done:
                continue
            if uid not in ids:
                found = orthanc_study_id(orthanc, uid)
                if found is None:
                    continue
                ids[uid] = found
            if study_series_count(orthanc, ids[uid]) >= 4:
                done[uid] = time.perf_counter()
        time.sleep(0.01)
    return done


def make_images(n: int, rows: int, columns: int, workdir: Path) -> list:
    root = generate_synthetic_dataset(
        workdir / "synthetic",
        SyntheticSpec(n_patients=max(4, n // 2 + 2), seed=4242),
        progress=False,
    )
    paths = discover_images(root).records["path"].tolist()[:n]
    datasets = []
    for index, path in enumerate(paths):
        gray = Image.open(path).convert("L").resize((columns, rows), Image.Resampling.BILINEAR)
        spec = RadiographSpec(photometric="MONOCHROME1", patient_id=f"BENCH-{index:04d}")
        datasets.append(radiograph_dataset(np.asarray(gray), spec))
    return datasets


def modality_ae() -> AE:
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def c_store(orthanc: OrthancProcess, datasets: list) -> list[tuple[float, float]]:
    """(start, acknowledged) perf_counter() pairs, one association for all of them."""
    assoc = modality_ae().associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    if not assoc.is_established:
        raise RuntimeError("Orthanc refused the benchmark modality's association")
    times = []
    try:
        for ds in datasets:
            start = time.perf_counter()
            status = assoc.send_c_store(ds)
            if not status or int(status.Status) != 0:
                raise RuntimeError(f"Orthanc refused a C-STORE: {status}")
            times.append((start, time.perf_counter()))
    finally:
        assoc.release()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--columns", type=int, default=1700)
    parser.add_argument("--modes", nargs="+", default=["sequential", "burst"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    settings = load_settings()
    work = Path(tempfile.mkdtemp(prefix="cxr-pacs-bench-"))
    try:
        run(args, settings, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, settings, work: Path) -> None:
    datasets = make_images(args.n * len(args.modes) + args.n, args.rows, args.columns, work)
    baseline_images = datasets[: args.n]

    node_port, orthanc_port = free_port(), free_port()
    modality = NodeAddress(MODALITY, "127.0.0.1", free_port())
    orthanc = OrthancProcess(
        work / "orthanc",
        NodeAddress("CXR_AI", "127.0.0.1", node_port),
        dicom_port=orthanc_port,
        modalities={"bench": modality},
    )
    # Baseline: the same kind of image into Orthanc with routing off (no AI at all).
    baseline = OrthancProcess(
        work / "orthanc-baseline",
        NodeAddress("CXR_AI", "127.0.0.1", node_port),
        routing=False,
        modalities={"bench": modality},
    )
    with baseline:
        store_seconds = [end - start for start, end in c_store(baseline, baseline_images)]

    dicom = dataclasses.replace(
        settings.dicom,
        dicom_port=node_port,
        dicom_host="127.0.0.1",
        dicom_destination=f"ORTHANC@127.0.0.1:{orthanc_port}",
        dicom_allowed_aets=("ORTHANC",),
    )
    node = build_node(dicom, registry_for(settings.registry), state_dir=work / "node")
    production = node.processor.models.current().production
    if production is None:
        raise SystemExit(f"{settings.home} has no production model: run `make demo` first")
    processing: list[float] = []
    process = node.processor.process

    def timed(data, dataset=None, **kwargs):
        result = process(data, dataset, **kwargs)
        processing.append(result.seconds)
        return result

    node.processor.process = timed  # measure the node's share without touching its code

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; model "
        f"{production.model_name} v{production.model_version} ({production.metadata.arch}, "
        f"{production.preprocessing.image_size} px); CR {args.rows}x{args.columns} 12-bit "
        f"MONOCHROME1; {args.n} images per mode"
    )
    store_p50, store_p95 = percentile(store_seconds, 50), percentile(store_seconds, 95)
    print(f"baseline C-STORE into Orthanc alone: p50 {store_p50:.3f} s  p95 {store_p95:.3f} s")
    print(f"{'mode':<11} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'p95/baseline':>13} "
          f"{'node p50 s':>11} {'node p95 s':>11}")  # fmt: skip
    with orthanc, node:
        time.sleep(2.0)  # the node's warm-up (Grad-CAM network) happens before traffic
        offset = args.n
        for mode in args.modes:
            images = datasets[offset : offset + args.n]
            offset += args.n
            processing.clear()
            latencies = []
            if mode == "sequential":
                for ds in images:
                    ((start, _),) = c_store(orthanc, [ds])
                    uid = str(ds.StudyInstanceUID)
                    latencies.append(wait_complete(orthanc, [uid])[uid] - start)
            elif mode == "burst":
                starts = c_store(orthanc, images)
                uids = [str(ds.StudyInstanceUID) for ds in images]
                finished = wait_complete(orthanc, uids)
                latencies = [finished[u] - s for u, (s, _) in zip(uids, starts, strict=True)]
            else:
                raise SystemExit(f"unknown mode {mode}")
            p95 = percentile(latencies, 95)
            print(
                f"{mode:<11} {percentile(latencies, 50):7.3f} {p95:7.3f} {max(latencies):7.3f} "
                f"{p95 / store_p95:12.1f}x {percentile(processing, 50):11.3f} "
                f"{percentile(processing, 95):11.3f}"
            )
    print(f"node: {node.counters}")


if __name__ == "__main__":
    main()

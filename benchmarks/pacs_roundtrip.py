"""PACS round trip: from a modality's C-STORE into Orthanc until the node's results (SR, SEG,
parametric map, secondary capture: as configured) are stored in Orthanc, through the shipped
Lua routing and the DICOM node.

A real Orthanc (``deploy/orthanc/`` configuration and routing script) and the node run on this
machine against the production model of ``CXR_HOME`` (``make demo`` makes one). Each image is a
realistic CR (12-bit, rescale and window, MONOCHROME1) built from a fresh synthetic patient at a
detector-sized matrix.

- sequential: one image at a time, the next once the previous one's results are in PACS (the
  latency a radiologist sees when studies trickle in);
- burst: all images in one association, each timed from its own C-STORE (a backlog).

A setup ending in ``@dicomweb`` routes over DICOMweb instead of DIMSE: a second Orthanc with its
DICOMweb plugin pushes each image to the node by STOW-RS (the shipped DICOMweb routing script)
and takes the results back by STOW-RS; the modality still C-STOREs into Orthanc, as it would.

The baseline, measured in the same run, is the C-STORE of the same image into Orthanc alone
(the modality's own cost, no AI). Each setup (which results, compressed or not) runs on a fresh
node against the same Orthanc; the last lines say where the node's time goes, per stage.

    CXR_HOME=<home> .venv/bin/python benchmarks/pacs_roundtrip.py [--n 50] [--rows 2000]
        [--columns 1700] [--modes sequential burst]
        [--setups sr,seg,sc:raw sr,seg,pmap,sc:seg,pmap sr,seg,pmap,sc:seg,pmap@dicomweb]
        [--workers 1 2] [--lung-fields with without]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage

# The Orthanc and DICOM fixtures live with the tests, beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_platform.data.sources import discover_images  # noqa: E402
from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset  # noqa: E402
from cxr_platform.pacs import build_node  # noqa: E402
from cxr_platform.ports import free_port  # noqa: E402
from cxr_platform.settings import load_settings  # noqa: E402
from cxr_platform_tests.orthanc import DicomWebPeer, NodeAddress, OrthancProcess  # noqa: E402
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset  # noqa: E402

MODALITY = "BENCH_MODALITY"
STOW_KEY = "bench-stow-key"


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
    orthanc: OrthancProcess, study_uids: list[str], n_series: int, timeout: float = 300.0
) -> dict[str, float]:
    """perf_counter() when each study first holds ``n_series`` series (the source and each
    result; every pending study is polled in turn, so an early finisher is not timed late)."""
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
            if study_series_count(orthanc, ids[uid]) >= n_series:
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


def store_files(port: int, aet: str, paths: list[str]) -> list[tuple[float, float]]:
    """(start, acknowledged) pairs on the system's monotonic clock (what perf_counter reads on
    Linux, so the parent can compare them), one association for all of them."""
    datasets = [pydicom.dcmread(path) for path in paths]
    assoc = modality_ae().associate("127.0.0.1", port, ae_title=aet)
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


class Modality:
    """The modality in its own process, as in a hospital: its sending does not compete with
    the node for the interpreter (the node's threads share one)."""

    def __init__(self, work: Path) -> None:
        self.folder = work / "modality"
        self.folder.mkdir()
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def store(self, orthanc: OrthancProcess, datasets: list) -> list[tuple[float, float]]:
        paths = []
        for ds in datasets:
            path = self.folder / f"{ds.SOPInstanceUID}.dcm"
            if not path.exists():
                ds.save_as(path, enforce_file_format=True)
            paths.append(str(path))
        return self.pool.submit(store_files, orthanc.dicom_port, orthanc.aet, paths).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--columns", type=int, default=1700)
    parser.add_argument("--modes", nargs="+", default=["sequential", "burst"])
    parser.add_argument(
        "--setups",
        nargs="+",
        default=["sr,seg,pmap,sc:seg,pmap", "sr,seg,pmap,sc:seg,pmap@dicomweb"],
        help="node setups to compare, RESULTS:COMPRESSED[@dicomweb] (the kinds sent in JPEG-LS; "
        "raw: none; @dicomweb: routed and returned by STOW-RS)",
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        type=int,
        default=None,
        help="the node's scoring processes to compare (CXR_DICOM_WORKERS; 0: the node's own "
        "thread); default: the setting (the cores)",
    )
    parser.add_argument(
        "--lung-fields",
        nargs="+",
        choices=["with", "without"],
        default=["with"],
        help="with: the home's lung fields version in production draws the SEG's second segment "
        "(as deployed); without: the node loads none. Both: the segmenter's cost in one run",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    settings = load_settings()
    work = Path(tempfile.mkdtemp(prefix="cxr-pacs-bench-"))
    try:
        run(args, settings, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class NodeSetup:
    """One way to run the node: which results it returns, and which of them travel compressed
    (RESULTS:COMPRESSED, e.g. ``sr,seg,pmap,sc:seg,pmap``; ``raw`` after the colon for none)."""

    results: tuple[str, ...]
    compress: tuple[str, ...]
    transport: str = "dimse"  # or "dicomweb"

    @classmethod
    def parse(cls, text: str) -> NodeSetup:
        text, _, transport = text.partition("@")
        kinds, _, compressed = text.partition(":")
        compress = () if compressed in ("", "raw") else tuple(compressed.split(","))
        if transport not in ("", "dimse", "dicomweb"):
            raise SystemExit(f"unknown transport {transport!r}: dimse or dicomweb")
        return cls(tuple(kinds.split(",")), compress, transport or "dimse")

    def __str__(self) -> str:
        name = f"{','.join(self.results)}:{','.join(self.compress) or 'raw'}"
        return name + ("@dicomweb" if self.transport == "dicomweb" else "")


class StageTimes:
    """Where the node's time goes: its own stages per image, writing results to the outbox, and
    sending each study's results to PACS."""

    def __init__(self) -> None:
        self.stages: dict[str, list[float]] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.stages.setdefault(stage, []).append(seconds)

    def clear(self) -> None:
        self.stages.clear()

    def report(self) -> str:
        return "  ".join(
            f"{stage} {percentile(values, 50) * 1000:.0f}" for stage, values in self.stages.items()
        )


def instrument(node, times: StageTimes) -> None:
    """Time the node's stages without touching its code: each outcome carries its stages,
    whether the node's own thread or a worker process scored it."""
    finish, put = node._finish, node.storage.put_encoded

    def timed_finish(path, dataset, outcome):
        for stage, seconds in getattr(outcome, "stages", {}).items():
            times.add(stage, seconds)
        if hasattr(outcome, "seconds"):
            times.add("node total", outcome.seconds)
        return finish(path, dataset, outcome)

    def timed_put(study_uid, sop_uid, data):
        start = time.perf_counter()
        path = put(study_uid, sop_uid, data)
        times.add("write outbox (per object)", time.perf_counter() - start)
        return path

    node._finish = timed_finish
    node.storage.put_encoded = timed_put
    if node.sender is not None:
        send = node.sender._send_study

        def timed_send(study_uid, files, report):
            start = time.perf_counter()
            done = send(study_uid, files, report)
            times.add("send study to PACS", time.perf_counter() - start)
            return done

        node.sender._send_study = timed_send


def run(args: argparse.Namespace, settings, work: Path) -> None:
    setups = [NodeSetup.parse(text) for text in args.setups]
    worker_counts = args.workers or [settings.dicom.dicom_workers]
    runs = [
        (setup, workers, lungs)
        for workers in worker_counts
        for setup in setups
        for lungs in args.lung_fields
    ]
    per_setup = args.n * len(args.modes)
    datasets = make_images(per_setup * len(runs) + args.n, args.rows, args.columns, work)
    baseline_images = datasets[: args.n]

    node_port, orthanc_port, stow_port = free_port(), free_port(), free_port()
    modality = NodeAddress(MODALITY, "127.0.0.1", free_port())
    orthanc = OrthancProcess(
        work / "orthanc",
        NodeAddress("CXR_AI", "127.0.0.1", node_port),
        dicom_port=orthanc_port,
        modalities={"bench": modality},
    )
    web_orthanc = OrthancProcess(
        work / "orthanc-dicomweb",
        NodeAddress("CXR_AI", "127.0.0.1", node_port),
        modalities={"bench": modality},
        dicomweb=DicomWebPeer(f"http://127.0.0.1:{stow_port}/dicom-web", STOW_KEY),
    )
    # Baseline: the same kind of image into Orthanc with routing off (no AI at all).
    baseline = OrthancProcess(
        work / "orthanc-baseline",
        NodeAddress("CXR_AI", "127.0.0.1", node_port),
        routing=False,
        modalities={"bench": modality},
    )
    modality_process = Modality(work)
    with baseline:
        stored = modality_process.store(baseline, baseline_images)
        store_seconds = [end - start for start, end in stored]

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"CR {args.rows}x{args.columns} 12-bit MONOCHROME1; {args.n} images per mode and setup"
    )
    store_p50, store_p95 = percentile(store_seconds, 50), percentile(store_seconds, 95)
    print(f"baseline C-STORE into Orthanc alone: p50 {store_p50:.3f} s  p95 {store_p95:.3f} s")
    offset = args.n
    stage_lines: list[str] = []
    cpu_lines: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(orthanc)
        if any(setup.transport == "dicomweb" for setup in setups):
            stack.enter_context(web_orthanc)
        for setup, workers, lungs in runs:
            label = f"{setup} w{workers}" + (" +lungs" if lungs == "with" else " -lungs")
            # A registered model name nobody registers: the node finds no lung fields version.
            registry = (
                settings.registry
                if lungs == "with"
                else dataclasses.replace(
                    settings.registry, registry_lung_model_name="cxr-lung-fields-none"
                )
            )
            pacs = web_orthanc if setup.transport == "dicomweb" else orthanc
            routes = (
                {
                    "dicom_web_port": stow_port,
                    "dicom_web_keys": f"orthanc={STOW_KEY}",
                    "dicom_destination_dicomweb": f"{web_orthanc.url}/dicom-web",
                }
                if setup.transport == "dicomweb"
                else {"dicom_destination": f"ORTHANC@127.0.0.1:{orthanc_port}"}
            )
            dicom = dataclasses.replace(
                settings.dicom,
                dicom_port=node_port,
                dicom_host="127.0.0.1",
                dicom_allowed_aets=("ORTHANC",),
                dicom_results=setup.results,
                dicom_compress_results=setup.compress,
                dicom_workers=workers,
                **routes,
            )
            state = work / f"node-{len(stage_lines)}"
            node = build_node(dicom, registry, state_dir=state)
            current = node.processor.models.current()
            production = current.production
            if production is None:
                raise SystemExit(f"{settings.home} has no production model: run `make demo`")
            if lungs == "with" and current.lung_fields is None:
                raise SystemExit(f"{settings.home} has no lung fields version in production")
            if lungs == "with":
                print(f"{label}: lung fields version {current.lung_fields_version}")
            if not stage_lines:
                print(
                    f"model {production.model_name} v{production.model_version} "
                    f"({production.metadata.arch}, {production.preprocessing.image_size} px)"
                )
                print(f"{'setup, workers':<34} {'mode':<11} {'p50 s':>7} {'p95 s':>7} {'max s':>7} "
                      f"{'p95/baseline':>13} {'images/s':>9}")  # fmt: skip
            times = StageTimes()
            instrument(node, times)
            with node:
                # The node's warm-up (workers started, Grad-CAM network loaded) before traffic.
                time.sleep(2.0 + 4.0 * workers)
                for mode in args.modes:
                    images = datasets[offset : offset + args.n]
                    offset += args.n
                    cpu_before = cpu_by_role(node, pacs)
                    latencies, elapsed = measure(
                        modality_process, pacs, images, mode, len(setup.results)
                    )
                    cpu_after = cpu_by_role(node, pacs)
                    cpu_ms = {
                        role: (cpu_after[role] - cpu_before[role]) / len(images) * 1000
                        for role in cpu_after
                    }
                    cpu_lines.append(
                        f"{label} {mode}: "
                        + ", ".join(f"{role} {ms:.0f}" for role, ms in cpu_ms.items())
                        + f"; all {sum(cpu_ms.values()):.0f} core-ms per image, so "
                        f"{os.cpu_count()} cores allow at most "
                        f"{1000 * (os.cpu_count() or 1) / sum(cpu_ms.values()):.2f} images/s"
                    )
                    p95 = percentile(latencies, 95)
                    print(
                        f"{label:<34} {mode:<11} {percentile(latencies, 50):7.3f} "
                        f"{p95:7.3f} {max(latencies):7.3f} {p95 / store_p95:12.1f}x "
                        f"{len(images) / elapsed:9.2f}"
                    )
            stage_lines.append(f"{label}: {times.report()}")
            counters = node.counters
            if counters.failed or counters.processed != len(args.modes) * args.n:
                raise SystemExit(f"{label}: not every image was processed: {counters}")
    modality_process.pool.shutdown()
    print("where the time goes (median ms per image; writes per object; sends per study):")
    for line in stage_lines:
        print(f"  {line}")
    print("CPU per image by party (core-ms, user + system):")
    for line in cpu_lines:
        print(f"  {line}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (those that ended count nothing)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def cpu_by_role(node, pacs: OrthancProcess) -> dict[str, float]:
    """CPU seconds so far of each party on this machine: PACS, the node's own process
    (associations, spool, sender; this benchmark's polling too), its workers, the modality."""
    workers = node.pool.pids() if node.pool is not None else []
    others = [c.pid for c in multiprocessing.active_children() if c.pid not in workers]
    assert pacs.process is not None
    return {
        "Orthanc": cpu_seconds([pacs.process.pid]),
        "node process": cpu_seconds([os.getpid()]),
        "node workers": cpu_seconds(workers),
        "modality": cpu_seconds([pid for pid in others if pid is not None]),
    }


def measure(
    modality: Modality, orthanc: OrthancProcess, images: list, mode: str, n_results: int
) -> tuple[list[float], float]:
    """Per-image latency from its C-STORE until its results are in Orthanc, and the seconds
    from the first C-STORE until the last study was complete."""
    latencies = []
    if mode == "sequential":
        first = time.perf_counter()
        for ds in images:
            ((start, _),) = modality.store(orthanc, [ds])
            uid = str(ds.StudyInstanceUID)
            latencies.append(wait_complete(orthanc, [uid], 1 + n_results)[uid] - start)
        return latencies, time.perf_counter() - first
    if mode == "burst":
        starts = modality.store(orthanc, images)
        uids = [str(ds.StudyInstanceUID) for ds in images]
        finished = wait_complete(orthanc, uids, 1 + n_results)
        latencies = [finished[u] - s for u, (s, _) in zip(uids, starts, strict=True)]
        return latencies, max(finished.values()) - starts[0][0]
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()

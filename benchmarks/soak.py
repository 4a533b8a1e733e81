"""Soak: the HTTP service and the DICOM node under sustained load together, for N minutes.

Both run as they are deployed, in their own processes (``bentoml serve`` and ``cxr dicom-node``)
on the production model of ``CXR_HOME``, sharing one inference log and one scratch home (the
deployment's own log and stores are not touched). The load is open-loop, as traffic is: HTTP
requests leave at a fixed rate whether or not earlier ones were answered, and a modality
process sends DICOM radiographs at its own rate, one association each. The node's results go to
a storage SCP in a third process that discards them.

Reported: errors by kind, inference-log rows against requests answered (each answered request
must have exactly one row), latency p50/p99 against the same service idle (the baseline,
measured first in the same run), the node's backlog at the end, and disk growth per store.

    CXR_HOME=<home with a production model> .venv/bin/python benchmarks/soak.py
        [--minutes 3] [--http-rate 20] [--dicom-rate 0.5] [--retain-max-mb 25]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

# The Orthanc and DICOM fixtures live with the tests, beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_platform.data.sources import discover_images  # noqa: E402
from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset  # noqa: E402
from cxr_platform.deployment.registry import PRODUCTION, registry_for  # noqa: E402
from cxr_platform.disk import MEGABYTE, folder_bytes  # noqa: E402
from cxr_platform.pacs.sender import RESULT_SOP_CLASSES  # noqa: E402
from cxr_platform.ports import free_port  # noqa: E402
from cxr_platform.serving.process import ServiceProcess  # noqa: E402
from cxr_platform.settings import load_settings  # noqa: E402
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset  # noqa: E402

NODE_AET = "CXR_AI"
MODALITY_AET = "SOAK_MODALITY"
SINK_AET = "SOAK_PACS"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# -- the PACS that takes the node's results (its own process) ----------------------------------


def run_sink(port: int, ready, stop, received) -> None:
    ae = AE(ae_title=SINK_AET)
    for sop_class in RESULT_SOP_CLASSES:
        ae.add_supported_context(sop_class)

    def on_store(event) -> int:
        with received.get_lock():
            received.value += 1
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    ready.set()
    stop.wait()
    server.shutdown()


# -- the modality (its own process) ------------------------------------------------------------


def run_modality(port: int, paths: list[str], rate: float, seconds: float, results) -> None:
    """Sends at ``rate`` instances/s for ``seconds``, cycling through ``paths`` with fresh
    UIDs; appends (status, latency) per instance to ``results``."""
    ae = AE(ae_title=MODALITY_AET)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    datasets = [pydicom.dcmread(path) for path in paths]
    start = time.perf_counter()
    n = 0
    while True:
        due = start + n / rate
        if due - start >= seconds:
            break
        time.sleep(max(0.0, due - time.perf_counter()))
        ds = datasets[n % len(datasets)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        sent = time.perf_counter()
        status = -1
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
            if assoc.is_established:
                answer = assoc.send_c_store(ds)
                status = int(answer.Status) if answer else -2
                assoc.release()
            else:
                status = -3  # association refused
        except Exception:  # noqa: BLE001 - counted as an error, the soak goes on
            status = -4
        results.append((status, time.perf_counter() - sent))
        n += 1


def wait_for_node(port: int, node: subprocess.Popen, timeout: float = 180.0) -> None:
    ae = AE(ae_title=MODALITY_AET)
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise SystemExit(f"the DICOM node exited ({node.returncode}); see its log")
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            return
        time.sleep(1.0)
    raise SystemExit("the DICOM node did not answer C-ECHO in time")


# -- HTTP load (threads in this process) -------------------------------------------------------


class HttpLoad:
    def __init__(self, url: str, payloads: list[bytes], rate: float, concurrency: int = 32):
        self.url = url
        self.payloads = payloads
        self.rate = rate
        self.pool = ThreadPoolExecutor(concurrency)
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.local = threading.local()

    def _client(self) -> httpx.Client:
        if not hasattr(self.local, "client"):
            self.local.client = httpx.Client(timeout=60)
        return self.local.client

    def _post(self, data: bytes) -> None:
        start = time.perf_counter()
        try:
            response = self._client().post(f"{self.url}/predict", files={"file": ("x.png", data)})
            outcome = str(response.status_code)
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        elapsed = time.perf_counter() - start
        with self.lock:
            self.statuses[outcome] = self.statuses.get(outcome, 0) + 1
            if outcome == "200":
                self.latencies.append(elapsed)

    def run(self, seconds: float) -> int:
        start = time.perf_counter()
        n = 0
        while (due := start + n / self.rate) - start < seconds:
            time.sleep(max(0.0, due - time.perf_counter()))
            self.pool.submit(self._post, self.payloads[n % len(self.payloads)])
            n += 1
        self.pool.shutdown(wait=True)
        return n


def idle_latencies(url: str, payloads: list[bytes], n: int = 50) -> list[float]:
    latencies = []
    with httpx.Client(timeout=60) as client:
        for i in range(n):
            start = time.perf_counter()
            client.post(f"{url}/predict", files={"file": ("x.png", payloads[i % len(payloads)])})
            latencies.append(time.perf_counter() - start)
    return latencies


# -- measuring ---------------------------------------------------------------------------------


def log_rows(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as connection:
        rows = dict(
            connection.execute("SELECT source, COUNT(*) FROM inference_records GROUP BY source")
        )
        refusals = connection.execute("SELECT COUNT(*) FROM inference_refusals").fetchone()[0]
    return {**rows, "refusals": refusals}


def ledger_counts(state: Path) -> dict[str, int]:
    with sqlite3.connect(state / "ledger.sqlite") as connection:
        return dict(connection.execute("SELECT status, COUNT(*) FROM instances GROUP BY status"))


def disk(home: Path, state: Path, db: Path) -> dict[str, int]:
    return {
        "retained inputs": folder_bytes(home / "retained"),
        "inference log": sum(
            p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file()
        ),
        "node spool": folder_bytes(state / "spool"),
        "node outbox": folder_bytes(state / "outbox"),
        "node ledger": sum(p.stat().st_size for p in state.glob("ledger.sqlite*")),
    }


def metric(text: str, name: str) -> float:
    total = 0.0
    for match in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M):
        total += float(match.group(1))
    return total


def make_inputs(work: Path, rows: int, columns: int) -> tuple[list[bytes], list[str]]:
    """Fresh synthetic patients (the demo model's own kind of image, so the input gate admits
    them): PNGs for HTTP, detector-sized 12-bit CR for DICOM."""
    root = generate_synthetic_dataset(
        work / "synthetic", SyntheticSpec(n_patients=60, seed=9090), progress=False
    )
    paths = discover_images(root).records["path"].tolist()
    payloads = [Path(p).read_bytes() for p in paths]
    dicom_paths = []
    for i, path in enumerate(paths[:20]):
        gray = Image.open(path).convert("L").resize((columns, rows), Image.Resampling.BILINEAR)
        ds = radiograph_dataset(np.asarray(gray), RadiographSpec(patient_id=f"SOAK-{i:03d}"))
        target = work / f"soak-{i:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        dicom_paths.append(str(target))
    return payloads, dicom_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--http-rate", type=float, default=20.0, help="requests/s")
    parser.add_argument("--dicom-rate", type=float, default=0.5, help="instances/s")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--columns", type=int, default=1700)
    parser.add_argument("--retain-max-mb", type=float, default=25.0)
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    args = parser.parse_args()

    source = load_settings()
    registry = registry_for(source.registry)
    version = registry.aliases().get(PRODUCTION)
    if version is None:
        raise SystemExit(f"no production model in the registry under {source.home}")
    work = Path(tempfile.mkdtemp(prefix="cxr-soak-"))
    try:
        run(args, source, version, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, source, version: str, work: Path) -> None:
    home, state, db = work / "home", work / "home" / "dicom", work / "log.db"
    home.mkdir()
    payloads, dicom_paths = make_inputs(work, args.rows, args.columns)
    env = {
        **os.environ,
        "CXR_HOME": str(home),
        # The deployment's registry, read only: both edges follow its production alias.
        "CXR_MLFLOW_TRACKING_URI": source.registry.tracking_uri,
        "CXR_INFERENCE_LOG_URL": f"sqlite:///{db}",
        "CXR_RETAIN_INPUTS_MAX_MB": str(args.retain_max_mb),
        "CXR_SERVICE_THREADS": "1",
    }
    seconds = args.minutes * 60.0
    spawn = multiprocessing.get_context("spawn")
    sink_port, node_port = free_port(), free_port()
    ready, stop = spawn.Event(), spawn.Event()
    received = spawn.Value("i", 0)
    sink = spawn.Process(target=run_sink, args=(sink_port, ready, stop, received), daemon=True)
    sink.start()
    ready.wait(30)
    node_log = open(work / "node.log", "wb")  # noqa: SIM115 - closed in finally
    node = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("cxr")),
            "dicom-node",
            "--host",
            "127.0.0.1",
            "--port",
            str(node_port),
            "--ae-title",
            NODE_AET,
            "--destination",
            f"{SINK_AET}@127.0.0.1:{sink_port}",
        ],
        env={**env, "CXR_SERVICE_THREADS": "1"},
        stdout=node_log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_node(node_port, node)
        with ServiceProcess(env=env, log_path=work / "service.log") as service:
            baseline = idle_latencies(service.url, payloads)
            before = disk(home, state, db)
            rows_before = log_rows(db)
            metrics_before = httpx.get(f"{service.url}/metrics").text
            manager = spawn.Manager()
            dicom_results = manager.list()
            modality = spawn.Process(
                target=run_modality,
                args=(node_port, dicom_paths, args.dicom_rate, seconds, dicom_results),
            )
            load = HttpLoad(service.url, payloads, args.http_rate)
            started = time.perf_counter()
            modality.start()
            sent_http = load.run(seconds)
            modality.join()
            soaked = time.perf_counter() - started
            metrics = httpx.get(f"{service.url}/metrics").text
            # The node's backlog at the end of the load, then how long it takes to clear.
            backlog = len(list((state / "spool").glob("*.dcm")))
            drain_start = time.perf_counter()
            stored = [r for r in dicom_results if r[0] == 0]
            while time.perf_counter() - drain_start < args.drain_timeout:
                done = sum(ledger_counts(state).values())
                if done >= len(stored) and not any((state / "outbox").rglob("*.dcm")):
                    break
                time.sleep(0.5)
            drained = time.perf_counter() - drain_start
            after = disk(home, state, db)
            rows_after = log_rows(db)
            ledger = ledger_counts(state)
    finally:
        node.terminate()
        node.wait(30)
        node_log.close()
        stop.set()
        sink.join(10)

    answered = load.statuses.get("200", 0)
    refused_http = load.statuses.get("422", 0)
    service_rows = rows_after.get("http", 0) - rows_before.get("http", 0)
    dicom_rows = rows_after.get("dicom", 0) - rows_before.get("dicom", 0)
    refusal_rows = rows_after["refusals"] - rows_before["refusals"]
    dicom_statuses: dict[int, int] = {}
    for status, _ in dicom_results:
        dicom_statuses[status] = dicom_statuses.get(status, 0) + 1
    c_store = [latency for status, latency in dicom_results if status == 0]

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; model "
        f"v{version}; {args.minutes:g} min offered at {args.http_rate:g} HTTP requests/s and "
        f"{args.dicom_rate:g} DICOM instances/s ({args.columns}x{args.rows} CR); retention "
        f"budget {args.retain_max_mb:g} MiB (0: none)"
    )
    errors = {k: v for k, v in load.statuses.items() if k not in ("200", "422")}
    print(
        f"HTTP: {sent_http} offered over {seconds / 60:g} min, all done after "
        f"{soaked / 60:.1f} min ({sent_http / soaked:.1f}/s completed), {answered} answered 200, "
        f"{refused_http} refused 422 by the input gate, errors {errors or 'none'}"
    )
    print(
        f"HTTP latency under load p50 {percentile(load.latencies, 50) * 1000:.0f} ms, p99 "
        f"{percentile(load.latencies, 99) * 1000:.0f} ms; idle (baseline, same run) p50 "
        f"{percentile(baseline, 50) * 1000:.0f} ms, p99 {percentile(baseline, 99) * 1000:.0f} ms; "
        f"ratio p50 {percentile(load.latencies, 50) / percentile(baseline, 50):.1f}x, "
        f"p99 {percentile(load.latencies, 99) / percentile(baseline, 99):.1f}x"
    )
    print(
        f"log rows: service {service_rows} for {answered} answered (difference "
        f"{service_rows - answered}); refusals {refusal_rows} for {refused_http} refused + "
        f"those of DICOM; dicom {dicom_rows} for {ledger.get('processed', 0)} processed"
    )
    print(
        f"DICOM: {len(dicom_results)} sent, statuses {dicom_statuses}; C-STORE p50 "
        f"{percentile(c_store, 50) * 1000:.0f} ms, p99 {percentile(c_store, 99) * 1000:.0f} ms; "
        f"spool backlog at the end {backlog}, cleared in {drained:.0f} s; ledger {ledger}; "
        f"{received.value} results at the PACS"
    )
    kept = metric(metrics, "cxr_retained_inputs_evicted_total") - metric(
        metrics_before, "cxr_retained_inputs_evicted_total"
    )
    skipped = metric(metrics, "cxr_retained_inputs_skipped_total") - metric(
        metrics_before, "cxr_retained_inputs_skipped_total"
    )
    print(f"retention: {kept:.0f} unlabeled inputs evicted, {skipped:.0f} not kept")
    total_requests = max(1, answered + len(stored))
    for name in before:
        growth = after[name] - before[name]
        print(
            f"disk {name:<16} {before[name] / MEGABYTE:8.1f} -> {after[name] / MEGABYTE:8.1f} "
            f"MiB ({growth / MEGABYTE:+.1f} MiB, {growth / total_requests / 1024:+.1f} KiB per "
            "request)"
        )


if __name__ == "__main__":
    main()

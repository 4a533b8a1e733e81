"""No patient data in any process's log, with failures forced so that tracebacks are written.

Every process that handles images runs here as its own process on one home: the HTTP service,
`cxr predict`, a Dagster run of the batch job, and the DICOM node with its sender. Each gets a
radiograph whose patient and study fields carry a marker, and a header value pydicom warns about
(quoting it). The inference log is made to fail by a trigger in the database, whose error
quotes patient values and a source UID, as a driver's or a library's error would: every process
then logs a traceback on the way. The node's results are refused by the PACS (a real DICOM
listener answering "out of resources"), so the sender logs too. No marker and no source UID may
appear in any of their output.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

from cxr_platform.deployment.pipeline import register_exported, registry_for
from cxr_platform.ports import free_port
from cxr_platform.serving.process import ServiceProcess
from cxr_platform.settings import load_settings
from cxr_platform_tests.synthetic_dicom import RadiographSpec

from ..deployment.conftest import export_for_registry
from .conftest import radiograph, wait_for
from .scu import send

MARK = "ZQXMARK"
API_KEY = "key-for-the-log-test-5d1e"
NODE_AET = "CXR_AI"


def marked(png: Path, n: int) -> Dataset:
    """A child's radiograph (the model's intended use) with a marker in every identifying field."""
    ds = radiograph(png, RadiographSpec(patient_age="004Y"))
    ds.PatientName = f"{MARK}{n}^DOE"
    ds.PatientID = f"{MARK}{n}ID"
    ds.AccessionNumber = f"{MARK}{n}A"
    ds.StudyDescription = f"{MARK}{n} chest"
    ds.ReferringPhysicianName = f"{MARK}{n}^REF"
    ds.InstitutionName = f"{MARK}{n} HOSPITAL"
    ds.PatientBirthDate = f"{MARK}{n}"  # not a date: pydicom warns, quoting it
    return ds


def force_log_failures(log_db: Path, source: Dataset) -> None:
    """Every insert into the inference log fails while `forced_failure.fail` is 1, with an error
    that quotes the patient's name and a source UID."""
    quoted = f"'{source.PatientName}' study {source.StudyInstanceUID}".replace("'", "''")
    with sqlite3.connect(log_db) as db:
        db.execute("CREATE TABLE forced_failure (fail INTEGER)")
        db.execute("INSERT INTO forced_failure VALUES (1)")
        for table in ("inference_records", "inference_refusals"):
            db.execute(
                f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
                "WHEN (SELECT fail FROM forced_failure) = 1 "
                f"BEGIN SELECT RAISE(ABORT, 'cannot store row for {quoted}'); END"
            )


def set_failing(log_db: Path, failing: bool) -> None:
    with sqlite3.connect(log_db) as db:
        db.execute("UPDATE forced_failure SET fail = ?", (int(failing),))


class RefusingPacs:
    """A DICOM listener that refuses every C-STORE with 0xA700 (out of resources)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.refused = 0
        ae = AE(ae_title="ORTHANC")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        self.refused += 1
        return 0xA700

    def stop(self) -> None:
        self.server.shutdown()


def _run(argv: list[str], env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run(
        argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )
    return done.stdout + done.stderr


_DAGSTER_RUN = """
import sys
import dagster as dg
from cxr_platform.defs.batch_assets import BATCH_JOB
from cxr_platform.defs.definitions import build_definitions

result = build_definitions().resolve_job_def(BATCH_JOB).execute_in_process(
    run_config={"ops": {"batch_predictions": {"config": {"inputs": [sys.argv[1]]}}}},
    instance=dg.DagsterInstance.ephemeral(),
    raise_on_error=False,
)
print("dagster run finished, success:", result.success)
"""


def test_no_process_logs_patient_data_even_when_it_fails(
    trained_checkpoint, learnable_cache, other_population, chest_pngs, tmp_path
):
    home = tmp_path / "home"
    settings = load_settings(home=home)
    exported = export_for_registry(
        settings, trained_checkpoint, learnable_cache, tmp_path / "x", "cxr", other_population
    )
    version = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
    registry_for(settings.registry).promote(version.version, triggered_by="test")
    sources = [marked(png, n) for n, png in enumerate(chest_pngs[:4])]
    folder = tmp_path / "to-score"
    folder.mkdir()
    for n, ds in enumerate(sources[:2]):
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
    from cxr_platform.inference.log import InferenceLog

    InferenceLog(settings.serving.inference_log_uri).dispose()  # its tables, for the trigger
    log_db = home / "inference_log.db"
    force_log_failures(log_db, sources[0])
    env = {"CXR_HOME": str(home), "CXR_SERVICE_API_KEY": API_KEY, "CXR_SERVICE_THREADS": "1"}
    outputs: dict[str, str] = {}

    # The HTTP service: the log fails, so the answer is withheld (503), with a traceback logged.
    service_log = tmp_path / "service.log"
    with ServiceProcess(env=env, log_path=service_log) as service:
        answer = httpx.post(
            f"{service.url}/predict",
            headers={"X-API-Key": API_KEY},
            files={"file": ("0.dcm", (folder / "0.dcm").read_bytes(), "application/dicom")},
            timeout=120,
        )
        assert answer.status_code == 503, answer.text
    outputs["service"] = service_log.read_text()

    # `cxr predict` and a Dagster run of the batch job: their batches fail the same way.
    cli = [sys.executable, "-m", "cxr_platform.cli"]
    outputs["cxr predict"] = _run([*cli, "predict", str(folder)], env)
    outputs["dagster run"] = _run([sys.executable, "-c", _DAGSTER_RUN, str(folder)], env)
    assert "dagster run finished" in outputs["dagster run"], outputs["dagster run"][-3000:]

    # The node: the first instance's log write fails; the second is processed and its results
    # are refused by PACS, so the sender reports them.
    pacs = RefusingPacs()
    port = free_port()
    node_env = {
        **env,
        "CXR_DICOM_DESTINATION": f"ORTHANC@127.0.0.1:{pacs.port}",
        "CXR_DICOM_RETRY_INITIAL_SECONDS": "0.2",
        "CXR_DICOM_RETRY_MAX_SECONDS": "0.5",
    }
    lines: list[str] = []
    node = subprocess.Popen(
        [*cli, "dicom-node", "--port", str(port), "--host", "127.0.0.1", "--allow", "MODALITY"],
        env={**os.environ, **node_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = threading.Thread(target=lambda: lines.extend(node.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("on port" in line for line in lines), 120, "the node to start")
        assert send(port, [sources[2]], called=NODE_AET).statuses == [0x0000]
        wait_for(lambda: "Traceback" in "".join(lines), 120, "the node's failed log write")
        set_failing(log_db, False)
        assert send(port, [sources[3]], called=NODE_AET).statuses == [0x0000]
        wait_for(lambda: pacs.refused >= 4, 120, "PACS to refuse the node's results")
        time.sleep(1.0)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
        reader.join(timeout=10)
        pacs.stop()
    outputs["dicom node and sender"] = "".join(lines)

    uids = {str(ds.get(k)) for ds in sources for k in ("StudyInstanceUID", "SOPInstanceUID")}
    for process, output in outputs.items():
        # Each process did fail with a traceback: what the test reads is not a quiet log.
        assert "Traceback" in output, (process, output[-3000:])
        # Redaction leaves every formatter working (uvicorn's access log unpacks arguments).
        assert "--- Logging error ---" not in output, (process, output[-3000:])
        assert MARK not in output, (
            process,
            [line for line in output.splitlines() if MARK in line][:3],
        )
        leaked = [uid for uid in uids if uid in output]
        assert not leaked, (process, leaked)
    assert "refused uid:" in outputs["dicom node and sender"]  # results named by tag


def test_the_reading_room_logs_no_identifiers(tmp_path, chest_pngs):
    """The viewer's nginx, asked what OHIF asks (a worklist search filtered by patient name,
    patient id and accession number; a study's series, metadata and frames) and what it refuses
    (STOW-RS, the DICOMweb client's peers), then with the PACS gone (an upstream error): neither
    its access log nor its error output holds a marker or a UID."""
    from cxr_platform.pacs.storage import encode_dataset
    from cxr_platform.pacs.viewer import ViewerError, nginx_binary
    from cxr_platform_tests.orthanc import NodeAddress, OrthancProcess

    from .conftest import tls_viewer

    try:
        nginx_binary()
    except ViewerError as exc:
        pytest.skip(str(exc))
    source = marked(chest_pngs[0], 7)
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        NodeAddress(NODE_AET, "127.0.0.1", free_port()),
        routing=False,
        dicomweb_root=True,
    ).start()
    viewer = tls_viewer(tmp_path, orthanc.url)
    study, series, instance = (
        str(source.StudyInstanceUID),
        str(source.SeriesInstanceUID),
        str(source.SOPInstanceUID),
    )
    try:
        orthanc.upload(encode_dataset(source))

        def ask(method: str, path: str, **kwargs) -> int:
            url = f"{viewer.url}/dicom-web{path}"
            return httpx.request(method, url, verify=False, timeout=30, **kwargs).status_code

        worklist = {
            "PatientName": f"{MARK}7*",
            "PatientID": source.PatientID,
            "AccessionNumber": source.AccessionNumber,
            "StudyInstanceUID": study,
        }
        assert ask("GET", "/studies", params=worklist) == 200
        assert ask("GET", f"/studies/{study}/series") == 200
        assert ask("GET", f"/studies/{study}/series/{series}/metadata") == 200
        frames = f"/studies/{study}/series/{series}/instances/{instance}/frames/1"
        assert ask("GET", frames) == 200
        assert ask("POST", f"/studies/{study}", content=b"x") == 405
        assert ask("GET", f"/servers/{MARK}peer") == 403
        orthanc.stop()
        assert ask("GET", "/studies", params=worklist) == 502  # the PACS is gone
    finally:
        viewer.stop()
        orthanc.stop()
    written = {
        path.name: path.read_text(errors="replace")
        for path in (tmp_path / "viewer").glob("*")
        if path.suffix in (".log", ".out")
    }
    assert "nginx.out" in written and "GET /dicom-web/studies 502" in written["nginx.out"]
    for name, text in written.items():
        for secret in (MARK, study, series, instance):
            assert secret not in text, f"{name} holds {secret}"

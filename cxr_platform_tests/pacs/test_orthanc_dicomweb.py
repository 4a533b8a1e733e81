"""DICOMweb both ways with a real Orthanc and its DICOMweb plugin (Debian orthanc-dicomweb),
configured from ``deploy/orthanc/``: an X-ray uploaded to PACS is pushed to the node by the
shipped DICOMweb routing script (Orthanc's STOW-RS client), and the node returns its SR, SEG,
parametric map and secondary capture by STOW-RS into the same study."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

from cxr_platform.inference.log import InferenceLog
from cxr_platform.pacs import build_node
from cxr_platform.ports import free_port
from cxr_platform.sections import sqlite_url
from cxr_platform_tests.orthanc import DicomWebPeer, NodeAddress, OrthancProcess

from .conftest import VARIANTS, radiograph_bytes, wait_for
from .test_orthanc import CR, DX, RESULTS, Pacs

KEY = "orthanc-stow-key-0042"


@pytest.fixture(scope="module")
def dicomweb_pacs(pacs_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("pacs-dicomweb")
    stow_port, http_port = free_port(), free_port()
    orthanc = OrthancProcess(
        base / "orthanc",
        NodeAddress("CXR_AI", "127.0.0.1", free_port()),  # no C-STORE path in this setup
        http_port=http_port,
        dicomweb=DicomWebPeer(f"http://127.0.0.1:{stow_port}/dicom-web", KEY),
    ).start()
    dicom = replace(
        pacs_model.settings.dicom,
        dicom_port=0,
        dicom_host="127.0.0.1",
        dicom_web_port=stow_port,
        dicom_web_keys=f"orthanc={KEY}",
        dicom_destination_dicomweb=f"{orthanc.url}/dicom-web",
        dicom_retry_initial_seconds=0.5,
        dicom_retry_max_seconds=2.0,
        inference_log_url=sqlite_url(base / "log.db"),
    )
    node = build_node(dicom, pacs_model.settings.registry, state_dir=base / "node")
    node.start()
    yield Pacs(orthanc, node)
    node.stop()
    orthanc.stop()


def test_pushed_over_dicomweb_and_results_returned_over_dicomweb(dicomweb_pacs, chest_pngs):
    pacs = dicomweb_pacs
    sources = []
    for index, variant in enumerate(("cr-mono2-12bit", "dx-mono1")):
        source, data = radiograph_bytes(chest_pngs[20 + index], VARIANTS[variant])
        pacs.orthanc.upload(data)
        image_class = DX if variant.startswith("dx") else CR
        pacs.wait_for_results(source.StudyInstanceUID, [image_class, *RESULTS], timeout=90)
        sources.append(source)
    node = pacs.node
    assert node.counters.received == 2 and node.counters.processed == 2
    assert node.storage.outbox() == []  # every result acknowledged by Orthanc's STOW-RS
    # Orthanc's DICOMweb client presented its key: the log names it as the site.
    records = InferenceLog(node.processor.inference_log.url).records()
    assert list(records["site"]) == ["orthanc", "orthanc"]

    # Orthanc's jobs say the pushes succeeded (and there were only the two: the results were
    # never pushed back). A job is marked done a moment after its request was answered.
    def stow_jobs() -> list[dict]:
        jobs = [
            httpx.get(f"{pacs.orthanc.url}/jobs/{job}", timeout=10).json()
            for job in httpx.get(f"{pacs.orthanc.url}/jobs", timeout=10).json()
        ]
        return [job for job in jobs if "Stow" in job.get("Type", "") or "stow" in str(job)]

    wait_for(
        lambda: all(job["State"] in ("Success", "Failure") for job in stow_jobs()),
        timeout=30,
        what="Orthanc's STOW-RS jobs to finish",
    )
    jobs = stow_jobs()
    assert len(jobs) == 2 and all(job["State"] == "Success" for job in jobs), jobs


def test_a_client_without_the_key_is_refused(dicomweb_pacs):
    answer = httpx.post(
        f"{dicomweb_pacs.node.dicomweb_url}/studies",
        content=b"--x\r\n\r\nDICM\r\n--x--\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'},
    )
    assert answer.status_code == 401

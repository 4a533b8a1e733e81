"""A silent trial against a real Orthanc serving DICOMweb behind basic authentication: study
dates as Dagster partitions, a day run again, a study whose WADO-RS answer is cut short (by a
real HTTP proxy in front of Orthanc), and the archive's failures as typed errors."""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import replace
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import httpx
import numpy as np
import pytest
from PIL import Image

from cxr_platform.calibration.site_trial import archive_for, opened_trial, run_archive_day
from cxr_platform.calibration.trial_sources import (
    ArchiveAuthError,
    ArchiveResponseError,
    ArchiveUnreachableError,
)
from cxr_platform.defs.definitions import build_definitions
from cxr_platform.defs.trial_assets import TRIAL_JOB, TRIAL_REPORT_JOB
from cxr_platform.deployment.pipeline import register_exported, registry_for
from cxr_platform.inference.log import InferenceLog
from cxr_platform.ports import free_port
from cxr_platform.settings import load_settings
from cxr_platform_tests.deployment.conftest import export_for_registry
from cxr_platform_tests.orthanc import NodeAddress, OrthancProcess
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset

SITE = "east"
USER, PASSWORD = "trial", "archive-pass-0042"
DAY_ONE, DAY_TWO = date(2026, 3, 2), date(2026, 3, 3)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class CuttingProxy:
    """A real HTTP server in front of Orthanc that cuts short the WADO-RS answers of one study
    (a connection dropped mid-transfer) or strips StudyInstanceUID from QIDO-RS answers."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.cut_study: str | None = None
        self.strip_study_uid = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                answer = httpx.get(proxy.upstream + self.path, headers=headers, timeout=60)
                body = answer.content
                if proxy.strip_study_uid and answer.headers.get("content-type", "").startswith(
                    "application/dicom+json"
                ):
                    found = json.loads(body)
                    body = json.dumps(
                        [{k: v for k, v in a.items() if k != "0020000D"} for a in found]
                    ).encode()
                # /dicom-web/studies/<uid>/series/<uid>: a WADO-RS retrieval, not the search
                path = urlsplit(self.path).path.rstrip("/")
                cut = bool(proxy.cut_study) and path.startswith(
                    f"/dicom-web/studies/{proxy.cut_study}/series/"
                )
                self.send_response(answer.status_code)
                for name in ("content-type", "www-authenticate"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if cut else body)
                if cut:
                    self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def __enter__(self) -> CuttingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def upload_site_archive(orthanc: OrthancProcess, tiny_synthetic: Path) -> dict[str, str]:
    """Day one: a child's two-image CR study and a DX study. Day two: a CR study, and one whose
    retrieval will be cut short. Returns the study UIDs by name."""
    normal = sorted((tiny_synthetic / "NORMAL").glob("*.png"))
    sick = sorted((tiny_synthetic / "PNEUMONIA").glob("*.png"))
    plan = {
        "two_images": (DAY_ONE, "CR", [normal[0], sick[0]]),
        "dx": (DAY_ONE, "DX", [sick[1]]),
        "day_two": (DAY_TWO, "CR", [normal[1]]),
        "cut": (DAY_TWO, "CR", [sick[2]]),
    }
    studies = {}
    for n, (name, (day, modality, pngs)) in enumerate(plan.items()):
        uid = f"1.2.826.0.1.3680043.10.998.{n + 1}"
        studies[name] = uid
        for png in pngs:
            pixels = np.asarray(Image.open(png).convert("L"))
            spec = RadiographSpec(
                modality=modality, study_instance_uid=uid, accession_number=f"ACC-{n}"
            )
            dataset = radiograph_dataset(pixels, spec)
            dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = day.strftime("%Y%m%d")
            buffer = BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            orthanc.upload(buffer.getvalue())
    return studies


@pytest.fixture()
def archive_site(tmp_path, trained_checkpoint, learnable_cache, other_population, tiny_synthetic):
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        NodeAddress("CXR_AI", "127.0.0.1", free_port()),
        routing=False,
        archive_users={USER: PASSWORD},
    ).start()
    try:
        studies = upload_site_archive(orthanc, tiny_synthetic)
        with CuttingProxy(orthanc.url) as proxy:
            settings = load_settings(
                home=tmp_path / "home",
                site_archive_url=proxy.url,
                site_archive_auth=basic(USER, PASSWORD),
                silent_trial_site=SITE,
                silent_trial_start_date="2026-03-01",
            )
            exported = export_for_registry(
                settings,
                trained_checkpoint,
                learnable_cache,
                tmp_path / "x",
                "cxr",
                other_population,
            )
            info = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
            registry_for(settings.registry).promote(info.version, triggered_by="test")
            yield settings, studies, proxy, orthanc
    finally:
        orthanc.stop()


def test_study_dates_run_as_dagster_partitions_idempotently_with_a_cut_study_recorded(
    archive_site, monkeypatch
):
    settings, studies, proxy, _ = archive_site
    # A secret reaches a Dagster run from the environment, never from its run config.
    monkeypatch.setenv("CXR_SITE_ARCHIVE_AUTH", basic(USER, PASSWORD))
    proxy.cut_study = studies["cut"]
    definitions = build_definitions(settings)
    job = definitions.resolve_job_def(TRIAL_JOB)
    instance = dg.DagsterInstance.ephemeral()

    def day(partition: date) -> dict:
        result = job.execute_in_process(partition_key=partition.isoformat(), instance=instance)
        assert result.success
        (materialization,) = result.asset_materializations_for_node("silent_trial_partition")
        return {key: value.value for key, value in materialization.metadata.items()}

    first = day(DAY_ONE)
    assert (first["images"], first["scored"], first["failed"], first["resumed"]) == (3, 3, 0, 0)
    second = day(DAY_TWO)
    assert (second["images"], second["scored"], second["failed"]) == (1, 1, 1)
    (record,) = (settings.home / "silent_trials").rglob(f"{DAY_TWO.isoformat()}.jsonl")
    failed = [json.loads(line) for line in record.read_text().splitlines()]
    failed = [row for row in failed if row["outcome"] == "failed"]
    assert [row["reason"] for row in failed] == ["retrieve_failed"]
    assert "WADO-RS" in failed[0]["detail"]
    assert not any(uid in record.read_text() for uid in studies.values())  # hashed, never named
    log = InferenceLog(settings.serving.inference_log_uri)
    assert len(log.records(site=SITE)) == 4

    # Day two again, with the archive answering in full this time: what was scored is read
    # back, the study that failed is scored now, nothing is written twice.
    proxy.cut_study = None
    retried = day(DAY_TWO)
    assert (retried["images"], retried["scored"], retried["failed"], retried["resumed"]) == (
        2,
        2,
        0,
        1,
    )
    again = day(DAY_ONE)
    assert (again["scored"], again["resumed"]) == (3, 3)
    rows = log.records(site=SITE)
    assert len(rows) == 5 and rows["request_id"].is_unique
    assert set(rows["study_uid_hash"].dropna()) and rows["study_uid_hash"].nunique() == 4
    log.dispose()

    # A backfill's run takes a range of days (a week at most): both days in one run, again
    # nothing scored twice.
    ranged = job.execute_in_process(
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": DAY_ONE.isoformat(),
            "dagster/asset_partition_range_end": DAY_TWO.isoformat(),
        },
    )
    assert ranged.success
    materializations = ranged.asset_materializations_for_node("silent_trial_partition")
    assert {m.partition for m in materializations} == {DAY_ONE.isoformat(), DAY_TWO.isoformat()}
    metadata = materializations[0].metadata
    assert (metadata["days"].value, metadata["images"].value, metadata["resumed"].value) == (
        2,
        5,
        5,
    )

    report = definitions.resolve_job_def(TRIAL_REPORT_JOB).execute_in_process(instance=instance)
    assert report.success
    (materialization,) = report.asset_materializations_for_node("silent_trial_report")
    assert materialization.metadata["images"].value == 5
    assert materialization.metadata["verdict"].value == "more_labels"  # no labels were given


def test_the_archive_failures_are_typed_errors_and_leave_no_record(archive_site):
    settings, studies, proxy, orthanc = archive_site
    section = settings.site_trial

    def run(trial_section) -> None:
        with opened_trial(trial_section, settings.registry, SITE) as (trial, _):
            run_archive_day(trial, archive_for(trial_section), DAY_ONE)

    with pytest.raises(ArchiveAuthError, match="refused the credentials \\(401\\)"):
        run(replace(section, site_archive_auth=basic(USER, "wrong")))
    with pytest.raises(ArchiveAuthError):
        run(replace(section, site_archive_auth=None))
    with pytest.raises(ArchiveUnreachableError, match="cannot be reached"):
        run(replace(section, site_archive_url=f"http://127.0.0.1:{free_port()}/dicom-web"))
    with pytest.raises(ArchiveUnreachableError, match="certificate"):
        # Orthanc speaks plain HTTP: a TLS handshake with it fails, and is never skipped.
        run(
            replace(section, site_archive_url=orthanc.url.replace("http:", "https:") + "/dicom-web")
        )
    proxy.strip_study_uid = True
    with pytest.raises(ArchiveResponseError, match="without StudyInstanceUID"):
        run(section)
    # None of them left a partition record, a log row or a half-written report.
    assert not list((settings.home / "silent_trials").rglob("*.jsonl"))
    assert InferenceLog(settings.serving.inference_log_uri).records().empty

    # An empty day is a partition with nothing in it, not an error.
    proxy.strip_study_uid = False
    with opened_trial(section, settings.registry, SITE) as (trial, _):
        empty = run_archive_day(trial, archive_for(section), date(2026, 3, 9))
    assert (empty.images, empty.failed) == (0, 0)

"""The node's results sent by STOW-RS, against a real HTTP(S) server answering what archives
answer: 200, 202 with warnings, 409, a partial failure, 413, and TLS on either side.

The server here is a plain ``http.server`` that decodes each multipart/related request and
answers per instance in DICOM JSON (PS3.18 10.5.3), with the status the test sets: no archive
installed here (Orthanc included) can be made to answer 202, 409 or 413 on request.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage

from cxr_platform.pacs.sender import DicomWebDestination, ResultSender
from cxr_platform.pacs.storage import NodeStorage, encode_dataset
from cxr_platform.pacs.stow import split_multipart_related
from cxr_platform.ports import free_port

from .conftest import VARIANTS, radiograph, self_signed, wait_for
from .test_stow import KEYS, multipart

STUDY = generate_uid()[:50].rstrip(".")  # room for the results' own ".n"
KEY = "Bearer archive-key-3c9d"


def result(n: int) -> Dataset:
    """A stand-in result (an SR with no content is enough for what the sender does)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = f"{STUDY}.{n + 1}"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = STUDY
    ds.Modality = "SR"
    return ds


@dataclass
class Archive:
    """What the archive answers next: an HTTP status, and per-instance outcomes."""

    status: int = 200
    failed: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> FailureReason
    unlisted: set[str] = field(default_factory=set)  # neither referenced nor failed
    warning: str | None = None
    requests: list[dict] = field(default_factory=list)

    def answer(self, uids: list[str]) -> tuple[int, dict, dict]:
        referenced = [u for u in uids if u not in self.failed and u not in self.unlisted]
        body: dict = {}
        if referenced:
            body["00081199"] = {
                "vr": "SQ",
                "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in referenced],
            }
        if self.failed:
            body["00081198"] = {
                "vr": "SQ",
                "Value": [
                    {
                        "00081155": {"vr": "UI", "Value": [u]},
                        "00081197": {"vr": "US", "Value": [reason]},
                    }
                    for u, reason in self.failed.items()
                    if u in uids
                ],
            }
        headers = {"Warning": self.warning} if self.warning else {}
        return self.status, headers, body


class _Handler(http.server.BaseHTTPRequestHandler):
    archive: Archive

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        parts = split_multipart_related(self.headers["Content-Type"], body)
        uids = [str(pydicom.dcmread(io.BytesIO(part)).SOPInstanceUID) for part in parts]
        self.archive.requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "uids": uids}
        )
        status, headers, answer = self.archive.answer(uids)
        payload = json.dumps(answer).encode() if answer else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def archive_server(tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, Archive]]:
    archive = Archive()
    handler = type("Handler", (_Handler,), {"archive": archive})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}/dicom-web", archive
    finally:
        server.shutdown()
        server.server_close()


def sender_for(url: str, storage: NodeStorage, tls: ssl.SSLContext | None = None, **options):
    return ResultSender(
        storage,
        DicomWebDestination.parse(url, KEY),
        calling_ae_title="CXR_AI",
        retry_initial_seconds=0.0,
        tls=tls,
        compress=(),
        **options,
    )


@pytest.fixture()
def outbox(tmp_path) -> Iterator[tuple[NodeStorage, list[Dataset]]]:
    storage = NodeStorage(tmp_path / "node")
    results = [result(n) for n in range(3)]
    for ds in results:
        storage.put_result(ds)
    yield storage, results
    storage.close()


def remaining(storage: NodeStorage) -> set[str]:
    return {path.stem for study in storage.outbox() for path in study.files}


def test_200_stores_the_study_in_one_request_with_the_key(outbox):
    storage, results = outbox
    with archive_server() as (url, archive):
        sender = sender_for(url, storage)
        report = sender.send_due()
        sender.close()
    assert report.stored == 3 and remaining(storage) == set()
    (request,) = archive.requests
    assert request["path"] == "/dicom-web/studies" and request["auth"] == KEY
    assert sorted(request["uids"]) == sorted(str(ds.SOPInstanceUID) for ds in results)


def test_202_with_warnings_keeps_what_it_did_not_confirm_and_sends_only_that_again(outbox):
    storage, results = outbox
    unconfirmed = str(results[2].SOPInstanceUID)
    with archive_server() as (url, archive):
        archive.status, archive.warning = 202, '299 archive "coerced PatientName"'
        archive.unlisted = {unconfirmed}
        sender = sender_for(url, storage)
        first = sender.send_due()
        assert first.stored == 2 and first.retrying == 1 and remaining(storage) == {unconfirmed}
        archive.unlisted = set()
        second = sender.send_due()
        sender.close()
    assert second.stored == 1 and remaining(storage) == set()
    assert archive.requests[1]["uids"] == [unconfirmed]


def test_a_partial_failure_stores_the_rest_and_retries_the_refused_one(outbox):
    storage, results = outbox
    refused = str(results[1].SOPInstanceUID)
    with archive_server() as (url, archive):
        archive.status, archive.failed = 202, {refused: 0xA700}  # out of resources, for now
        sender = sender_for(url, storage)
        report = sender.send_due()
        assert report.stored == 2 and report.retrying == 1 and remaining(storage) == {refused}
        archive.status, archive.failed = 200, {}
        assert sender.send_due().stored == 1
        sender.close()
    assert remaining(storage) == set() and list(storage.iter_failed()) == []


def test_409_refusals_are_kept_aside_after_the_last_try_with_the_archives_reason(outbox):
    storage, results = outbox
    with archive_server() as (url, archive):
        archive.status = 409
        archive.failed = {str(ds.SOPInstanceUID): 0xC122 for ds in results}  # wrong study
        sender = sender_for(url, storage, max_refusals=2)
        assert sender.send_due().retrying == 3
        last = sender.send_due()
        sender.close()
    assert last.rejected == 3 and remaining(storage) == set()
    assert len(list(storage.iter_failed())) == 3  # for a person: `cxr dicom-retry` resends


def test_409_without_a_word_per_instance_is_a_refusal_too(outbox):
    storage, _ = outbox
    with archive_server() as (url, archive):
        archive.status = 409
        archive.unlisted = {path.stem for study in storage.outbox() for path in study.files}
        sender = sender_for(url, storage, max_refusals=1)
        assert sender.send_due().rejected == 3
        sender.close()


def test_413_stores_nothing_and_keeps_everything_for_later(outbox):
    storage, _ = outbox
    before = remaining(storage)
    with archive_server() as (url, archive):
        archive.status = 413
        sender = sender_for(url, storage)
        report = sender.send_due()
        sender.close()
    assert report.stored == 0 and report.retrying == 3 and report.errors[-1].endswith("HTTP 413")
    assert remaining(storage) == before and list(storage.iter_failed()) == []
    assert sender.seconds_until_due() is not None  # in line again, after the back-off


def test_tls_to_the_archive_is_verified(outbox, tmp_path):
    storage, _ = outbox
    cert, key = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    with archive_server(server_tls) as (url, archive):
        # Without the archive's CA the sender does not send, and says the archive is unreachable.
        untrusting = sender_for(url, storage)
        refused = untrusting.send_due()
        untrusting.close()
        assert refused.unreachable and refused.stored == 0 and archive.requests == []
        trusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        sender = sender_for(url, storage, tls=trusting)
        assert sender.send_due().stored == 3
        sender.close()
    assert remaining(storage) == set()


def test_the_nodes_own_stow_rs_speaks_tls(node_factory, chest_pngs, tmp_path):
    """The receiving side: with a certificate, STOW-RS is HTTPS only."""
    cert, key = self_signed(tmp_path)
    node = node_factory(
        dicom_web_port=0, dicom_web_keys=KEYS, dicom_tls_cert=cert, dicom_tls_key=key
    )
    node.start()
    assert node.dicomweb_url.startswith("https://")
    body, content_type = multipart(
        [encode_dataset(radiograph(chest_pngs[1], VARIANTS["cr-mono2-12bit"]))]
    )
    headers = {"Content-Type": content_type, "Authorization": "Bearer stow-key-1234"}
    answer = httpx.post(
        f"{node.dicomweb_url}/studies", content=body, headers=headers, verify=str(cert), timeout=60
    )
    assert answer.status_code == 200, answer.text
    plain = node.dicomweb_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{plain}/studies", content=body, headers=headers, timeout=10)
    wait_for(lambda: node.storage.spooled() == [], what="the instance processed")

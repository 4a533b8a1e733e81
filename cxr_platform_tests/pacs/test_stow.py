"""STOW-RS into the node over real HTTP: the same screening, spool, ledger and worker as
C-STORE, the standard per-instance response, keys per client, and clear refusals."""

from __future__ import annotations

import uuid

import httpx
import pydicom
import pytest

from cxr_platform.disk import DiskBudget, free_bytes
from cxr_platform.inference.log import InferenceLog
from cxr_platform.pacs.node import NodeConfigError
from cxr_platform.pacs.storage import encode_dataset
from cxr_platform.pacs.stow import split_multipart_related
from cxr_platform_tests.synthetic_dicom import RadiographSpec

from .conftest import VARIANTS, radiograph, sr_comment, wait_for

KEYS = "orthanc=stow-key-1234,gateway=stow-key-5678"


def multipart(parts: list[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
        for p in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def post(node, parts: list[bytes], key: str | None = "stow-key-1234", path: str = "/studies"):
    body, content_type = multipart(parts)
    headers = {"Content-Type": content_type}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{node.dicomweb_url}{path}", content=body, headers=headers, timeout=60)


@pytest.fixture()
def stow_node(node_factory, tmp_path):
    from cxr_platform.sections import sqlite_url

    node = node_factory(
        dicom_web_port=0,
        dicom_web_keys=KEYS,
        inference_log_url=sqlite_url(tmp_path / "stow_log.db"),
    )
    node.start()
    return node


def test_instances_stored_by_stow_rs_are_scored_like_c_store_ones(stow_node, chest_pngs):
    good = [radiograph(chest_pngs[i], VARIANTS["cr-mono2-12bit"]) for i in (0, 1)]
    broken = b"DICM but not really"
    answer = post(stow_node, [encode_dataset(ds) for ds in good] + [broken])
    assert answer.status_code == 202, answer.text  # some stored, one failed
    assert answer.headers["content-type"].startswith("application/dicom+json")
    response = pydicom.Dataset.from_json(answer.json())
    stored = {str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence}
    assert stored == {str(ds.SOPInstanceUID) for ds in good}
    (failed,) = response.FailedSOPSequence
    assert failed.FailureReason == 0xC000
    for ds in good:
        wait_for(lambda ds=ds: stow_node.storage.status(str(ds.SOPInstanceUID)) == "processed")
    assert len(stow_node.storage.outbox()) == 2
    # The client's name is the site, as a calling AE title is for C-STORE.
    records = InferenceLog(stow_node.processor.inference_log.url).records()
    assert set(records["site"]) == {"orthanc"} and (records["source"] == "dicom").all()

    again = post(stow_node, [encode_dataset(good[0])], key="stow-key-5678")
    assert again.status_code == 200  # a re-sent instance is acknowledged, not scored twice
    assert stow_node.counters.duplicates == 1


def test_stow_rs_refuses_a_patient_outside_the_intended_use_with_the_reason_in_words(
    stow_node, chest_pngs
):
    adult = radiograph(chest_pngs[2], RadiographSpec(patient_age="045Y"))
    child = radiograph(chest_pngs[3], RadiographSpec(patient_age="003Y"))
    answer = post(stow_node, [encode_dataset(adult), encode_dataset(child)])
    assert answer.status_code == 200, answer.text  # stored: what the node then says is a result
    wait_for(lambda: stow_node.storage.status(str(adult.SOPInstanceUID)) == "refused")
    wait_for(lambda: stow_node.storage.status(str(child.SOPInstanceUID)) == "processed")
    by_study = {study.study_uid: study.files for study in stow_node.storage.outbox()}
    (sr_path,) = by_study[adult.StudyInstanceUID]
    assert sr_comment(sr_path) == (
        "patient age 45 years (PatientAge) is outside this model's intended use: 1-5 years"
    )
    assert len(by_study[child.StudyInstanceUID]) == 4


def test_a_study_in_the_path_must_match_the_instances(stow_node, chest_pngs):
    ds = radiograph(chest_pngs[2], VARIANTS["cr-mono1-12bit"])
    answer = post(stow_node, [encode_dataset(ds)], path="/studies/1.2.3.4")
    assert answer.status_code == 409
    (failed,) = pydicom.Dataset.from_json(answer.json()).FailedSOPSequence
    assert failed.FailureReason == 0xC122
    matching = post(stow_node, [encode_dataset(ds)], path=f"/studies/{ds.StudyInstanceUID}")
    assert matching.status_code == 200


def test_bad_requests_get_a_clear_4xx(stow_node, chest_pngs):
    instance = encode_dataset(radiograph(chest_pngs[3], VARIANTS["cr-mono2-12bit"]))
    url = f"{stow_node.dicomweb_url}/studies"
    assert post(stow_node, [instance], key=None).status_code == 401
    unknown = post(stow_node, [instance], key="not-a-key")
    assert unknown.status_code == 401 and "Bearer" in unknown.headers["www-authenticate"]
    auth = {"X-API-Key": "stow-key-1234"}
    as_form = httpx.post(url, files={"file": instance}, headers=auth)
    assert as_form.status_code == 415 and "multipart/related" in as_form.json()["error"]
    body, content_type = multipart([instance])
    jpeg = content_type.replace("application/dicom", "image/jpeg")
    assert httpx.post(url, content=body, headers={**auth, "Content-Type": jpeg}).status_code == 415
    no_boundary = 'multipart/related; type="application/dicom"'
    refused = httpx.post(url, content=body, headers={**auth, "Content-Type": no_boundary})
    assert refused.status_code == 400 and "boundary" in refused.json()["error"]
    truncated = httpx.post(url, content=body[:-20], headers={**auth, "Content-Type": content_type})
    assert truncated.status_code == 400
    assert httpx.get(url, headers=auth).status_code == 405


def test_past_the_watermark_stow_rs_answers_503_with_retry_after(stow_node, chest_pngs):
    ds = radiograph(chest_pngs[4], VARIANTS["cr-mono2-12bit"])
    stow_node.storage.spool_budget = DiskBudget(
        min_free_bytes=free_bytes(stow_node.storage.spool_dir) + 2**40
    )
    busy = post(stow_node, [encode_dataset(ds)])
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) > 0
    assert stow_node.storage.spooled() == [] and stow_node.storage.status(ds.SOPInstanceUID) is None
    stow_node.storage.spool_budget = DiskBudget()  # space came back
    assert post(stow_node, [encode_dataset(ds)]).status_code == 200


def test_the_multipart_split_keeps_binary_parts_intact():
    payloads = [bytes(range(256)) * 40 + b"\r\n--almost", b"\r\n\r\n", b"x"]
    body, content_type = multipart(payloads, boundary="b0undary")
    assert split_multipart_related(content_type, body) == payloads


def test_stow_rs_on_a_network_address_needs_client_keys(node_factory):
    with pytest.raises(NodeConfigError, match="needs client keys"):
        node_factory(dicom_web_port=0, dicom_host="0.0.0.0")
    with pytest.raises(NodeConfigError, match="one destination"):
        node_factory(
            dicom_destination="PACS@127.0.0.1:4242",
            dicom_destination_dicomweb="http://127.0.0.1:8042/dicom-web",
        )

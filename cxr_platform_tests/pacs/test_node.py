"""The node over real DICOM associations (pynetdicom on both sides), without a PACS: results
wait in the outbox. Durability, de-duplication, filters, the allow-list and TLS."""

from __future__ import annotations

import io
import logging
import re
import ssl
import time
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import ParametricMapStorage, SegmentationStorage

from cxr_platform.inference.log import InferenceLog
from cxr_platform.model_version.input_gate import REASONS
from cxr_platform.pacs import build_node
from cxr_platform.pacs.node import NodeConfigError
from cxr_platform.pacs.sender import RESULT_SOP_CLASSES, Destination, DestinationError
from cxr_platform.pacs.storage import NodeStorage, encode_dataset
from cxr_platform.ports import free_port
from cxr_platform_tests.conftest import other_population_images
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset

from .conftest import (
    VARIANTS,
    dciodvfy_errors,
    radiograph,
    radiograph_bytes,
    self_signed,
    sr_comment,
    wait_for,
)
from .scu import send


def test_echo_and_the_calling_ae_allow_list(node_factory):
    node = node_factory()
    node.start()
    assert send(node.port, []).statuses == [0x0000]
    refused = send(node.port, [], calling="STRANGER")
    assert not refused.established and refused.rejected


def test_the_health_probe_passes_the_allow_list_under_the_nodes_own_title_for_echo_only(
    node_factory, chest_pngs
):
    """`cxr dicom-echo` (compose's healthcheck, Kubernetes' liveness probe) calls under the
    node's own AE title: answered for Verification, refused for storage, while a stranger is
    still rejected and the probe fails once the node is gone."""
    from cxr_platform.pacs.probe import echo_node

    node = node_factory(dicom_allowed_aets=("ORTHANC",))
    node.start()
    section = replace(node_factory.settings.dicom, dicom_port=node.port, dicom_host="0.0.0.0")
    assert echo_node(section).ok
    own = send(node.port, [radiograph(chest_pngs[0], VARIANTS["cr-mono2-12bit"])], calling="CXR_AI")
    assert own.statuses == [0x0124] and node.storage.spooled() == []
    assert not send(node.port, [], calling="MODALITY").established
    node.stop()
    stopped = echo_node(section, timeout=2)
    assert not stopped.ok and "not listening" in stopped.detail


def test_an_association_to_another_called_ae_title_is_refused(node_factory):
    """A misrouted modality finds out at once instead of having its images classified here."""
    node = node_factory()
    node.start()
    misrouted = send(node.port, [], called="OTHER")
    assert not misrouted.established and misrouted.rejected
    assert send(node.port, [], called=node.config.ae_title).statuses == [0x0000]


def test_an_instance_without_a_usable_sop_instance_uid_is_refused_on_record(
    node_factory, chest_pngs
):
    node = node_factory()
    node.start()
    source = radiograph(chest_pngs[4], VARIANTS["cr-mono2-12bit"])
    source.SOPInstanceUID = "1.2.abc"
    assert send(node.port, [source]).statuses == [0xC000]
    assert node.storage.status("1.2.abc") == "rejected"
    assert "SOPInstanceUID" in (node.storage.detail("1.2.abc") or "")
    assert node.storage.spooled() == [] and node.storage.outbox() == []


def test_a_legacy_file_without_meta_in_the_spool_is_processed(node_factory, chest_pngs, tmp_path):
    """An instance an operator drops into the spool from an old archive: no preamble, no file
    meta, implicit VR; and a header missing what results need (Type 2 and a study UID)."""
    state = tmp_path / "legacy"
    storage = NodeStorage(state)
    legacy = radiograph(chest_pngs[6], VARIANTS["cr-mono2-12bit"])
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        delattr(legacy, keyword)
    legacy.PatientAge = "62"
    del legacy.file_meta
    buffer = io.BytesIO()
    legacy.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    data = buffer.getvalue()
    assert data[128:132] != b"DICM" and b"\x02\x00\x10\x00" not in data[:12]
    (storage.spool_dir / f"{legacy.SOPInstanceUID}.dcm").write_bytes(data)
    storage.close()

    node = node_factory(state_dir=state)
    node.start()
    wait_for(lambda: node.storage.status(legacy.SOPInstanceUID) == "processed", what="processing")
    detail = node.storage.detail(legacy.SOPInstanceUID) or ""
    assert "header repaired for the results" in detail and "StudyInstanceUID" in detail
    (study,) = node.storage.outbox()
    assert len(study.files) == 4
    for path in study.files:
        assert dciodvfy_errors(path) == [], path.name
        result = pydicom.dcmread(path)
        assert result.StudyInstanceUID == study.study_uid  # one generated study for all three
        assert result.PatientID == "" and result.get("PatientAge", "062Y") == "062Y"


def test_a_stored_image_is_processed_once_and_its_results_wait_in_the_outbox(
    node_factory, chest_pngs, caplog
):
    node = node_factory()
    node.start()
    source = radiograph(chest_pngs[5], VARIANTS["cr-jpegls"])
    with caplog.at_level(logging.INFO, logger="cxr_platform.pacs"):
        assert send(node.port, [source]).statuses == [0x0000]
        wait_for(
            lambda: node.storage.status(source.SOPInstanceUID) == "processed", what="processing"
        )
        # The same instance again (a router retry, a re-sent study): no second set of results.
        assert send(node.port, [source]).statuses == [0x0000]
        wait_for(lambda: node.counters.duplicates == 1, what="the duplicate to be seen")
    studies = node.storage.outbox()
    assert [s.study_uid for s in studies] == [source.StudyInstanceUID]
    assert len(studies[0].files) == 4
    assert node.counters.processed == 1
    assert "already processed" in caplog.text
    assert node.storage.spooled() == []
    # The calling AE title names the site in the inference log.
    log = InferenceLog(node_factory.settings.dicom.inference_log_uri)
    from_modality = log.records(site="MODALITY")  # other tests here send as MODALITY too
    assert len(from_modality) >= 1 and set(from_modality["source"]) == {"dicom"}
    log.dispose()


def test_objects_that_are_not_single_frontal_images_are_acknowledged_and_ignored(
    node_factory, chest_pngs, caplog
):
    node = node_factory()
    node.start()
    lateral = radiograph(chest_pngs[0], RadiographSpec(view_position="LL"))
    report = radiograph(chest_pngs[0], RadiographSpec())
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    with caplog.at_level(logging.INFO, logger="cxr_platform.pacs"):
        assert send(node.port, [lateral, report]).statuses == [0, 0]
    assert node.counters.ignored == 2
    assert node.storage.spooled() == [] and node.storage.outbox() == []
    assert "lateral view" in caplog.text
    assert "not a radiograph: Comprehensive 3D SR" in caplog.text


def _pixels_of(kind: str) -> np.ndarray:
    from cxr_platform.data.negatives import documents, photographs

    return next(iter({"document": documents, "photograph": photographs}[kind]())).pixels


def test_the_pixels_decide_whatever_the_header_says(node_factory, chest_pngs, tmp_path):
    """A header claiming the chest does not make a document a radiograph, and a chest
    radiograph without (or with a wrong) body part is still read."""
    node = node_factory()
    node.start()
    claimed = radiograph_dataset(_pixels_of("document"), RadiographSpec(body_part="CHEST"))
    unlabeled = radiograph_dataset(_pixels_of("photograph"), RadiographSpec(body_part=""))
    mislabeled_chest = radiograph(chest_pngs[1], RadiographSpec(body_part="HAND"))
    capture = radiograph(chest_pngs[2], RadiographSpec(body_part=""))  # SC, no body part
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sent = [claimed, unlabeled, mislabeled_chest, capture]
    log = InferenceLog(node_factory.settings.dicom.inference_log_uri)
    refusals_before = len(log.refusals())
    assert send(node.port, sent).statuses == [0, 0, 0, 0]
    wait_for(lambda: node.counters.processed + node.counters.refused == 4, what="all four")

    for refused in (claimed, unlabeled):
        assert node.storage.status(refused.SOPInstanceUID) == "refused"
        detail = node.storage.detail(refused.SOPInstanceUID)
        assert detail.startswith("not_a_chest_radiograph: "), detail
    for read in (mislabeled_chest, capture):
        assert node.storage.status(read.SOPInstanceUID) == "processed"
    assert list(node.storage.iter_failed()) == []  # a refusal is not a failure: nothing kept

    # Only the image whose header claims the chest gets an answer: an SR saying it was not
    # analysed and why, and no diagnosis. The refused photograph is logged, not answered.
    by_study = {study.study_uid: study.files for study in node.storage.outbox()}
    (sr_path,) = by_study[claimed.StudyInstanceUID]
    assert unlabeled.StudyInstanceUID not in by_study
    sr = pydicom.dcmread(sr_path)
    assert sr.Modality == "SR" and "not analysed" in sr.SeriesDescription
    texts = [str(elem.value) for elem in sr.iterall() if elem.keyword == "TextValue"]
    (comment,) = [text for text in texts if text.startswith("Not analysed by the AI: ")]
    assert comment.removeprefix("Not analysed by the AI: ").split(":")[0] in REASONS
    meanings = [str(elem.value) for elem in sr.iterall() if elem.keyword == "CodeMeaning"]
    assert "Present" not in meanings and "Absent" not in meanings, meanings
    # Its one number is the probability, present only to say it was not measured: no value, and
    # the standard's qualifier for that (it anchors the report on the image in OHIF).
    (number,) = [item for item in sr.iterall() if item.keyword == "MeasuredValueSequence"]
    assert len(number.value) == 0
    assert "Measurement not attempted" in meanings
    assert not [elem for elem in sr.iterall() if elem.keyword == "NumericValue"]
    assert dciodvfy_errors(sr_path) == []
    refusals = log.refusals().iloc[refusals_before:]
    assert len(refusals) == 2 and set(refusals["source"]) == {"dicom"}


def test_a_patient_outside_the_intended_use_gets_the_reason_in_words_and_no_result(
    node_factory, chest_pngs, tiny_synthetic, tmp_path, caplog
):
    """The test model is for children of 1-5 years. An 81-year-old by PatientAge, a 17-year-old
    by birth date, and an image of the population it is not for with no age at all (refused by
    pixels): a not-analysed SR saying so in words, never SEG, map or SC. A child, and a header
    whose age cannot be read (the pixels then decide), get all four results."""
    node = node_factory()
    node.start()
    adult = radiograph(chest_pngs[3], RadiographSpec(patient_age="081Y", patient_id="A"))
    teen = radiograph(chest_pngs[4], RadiographSpec(birth_date="20000101", patient_id="T"))
    child = radiograph(chest_pngs[5], RadiographSpec(patient_age="004Y", patient_id="C"))
    unreadable_age = radiograph(chest_pngs[6], RadiographSpec(patient_age="62", patient_id="U"))
    # The test population the model is not for, no age in the header: the pixels decide.
    (other,) = sorted(other_population_images(tiny_synthetic, tmp_path / "others", 1).iterdir())
    unstated = radiograph(other, RadiographSpec(birth_date="", patient_id="O"))
    sent = [adult, teen, child, unreadable_age, unstated]
    log = InferenceLog(node_factory.settings.dicom.inference_log_uri)
    refusals_before = len(log.refusals())
    assert send(node.port, sent).statuses == [0] * 5
    wait_for(lambda: node.counters.processed + node.counters.refused == 5, what="all five")

    by_study = {study.study_uid: study.files for study in node.storage.outbox()}
    # A refusal by age names the range; one by pixels, with no age to quote, the whole
    # population the version was made for.
    for refused, words, ending in (
        (adult, "patient age 81 years (PatientAge)", "intended use: 1-5 years"),
        (teen, "(PatientBirthDate) is outside", "intended use: 1-5 years"),
        (
            unstated,
            "looks like a patient this model was not made for",
            "ages 1-5 years; projection AP/PA",
        ),
    ):
        assert node.storage.status(refused.SOPInstanceUID) == "refused"
        detail = node.storage.detail(refused.SOPInstanceUID)
        assert detail.startswith("outside_intended_use: ")
        if refused is not unstated:
            # The ledger names the range an age fell outside, never the age (the SR says it).
            assert "the stated age is outside this model's intended use: 1-5 years" in detail
            assert not re.search(r"\d", detail.replace("1-5", "")), detail
        (sr_path,) = by_study[refused.StudyInstanceUID]  # the SR only
        comment = sr_comment(sr_path)
        assert words in comment and comment.endswith(ending), comment
        assert dciodvfy_errors(sr_path) == []
    for read in (child, unreadable_age):
        assert node.storage.status(read.SOPInstanceUID) == "processed"
        assert len(by_study[read.StudyInstanceUID]) == 4
    refusals = log.refusals().iloc[refusals_before:]
    assert list(refusals["reason"]) == ["outside_intended_use"] * 3
    # The log names the range the two stated ages fell outside, never an age.
    by_age = [str(d) for d in refusals["detail"] if str(d).startswith("patient_age")]
    assert (
        by_age
        == ["patient_age: the stated age is outside this model's intended use: 1-5 years"] * 2
    )
    # Nor does the node's own log say the age.
    assert not any("81 years" in record.getMessage() for record in caplog.records)


def test_the_not_analysed_sr_can_be_turned_off(node_factory):
    node = node_factory(dicom_refusal_sr=False)
    node.start()
    claimed = radiograph_dataset(_pixels_of("document"), RadiographSpec(body_part="CHEST"))
    assert send(node.port, [claimed]).statuses == [0]
    wait_for(lambda: node.counters.refused == 1, what="the refusal")
    assert node.storage.outbox() == []


def test_an_image_that_cannot_be_decoded_is_kept_with_its_reason(node_factory, chest_pngs):
    node = node_factory()
    node.start()
    broken = radiograph(chest_pngs[0], VARIANTS["cr-mono2-12bit"])
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 3]  # truncated in transit
    assert send(node.port, [broken]).statuses == [0x0000]
    wait_for(lambda: node.storage.status(broken.SOPInstanceUID) == "failed", what="the failure")
    kept = list(node.storage.iter_failed())
    assert [p.stem for p in kept] == [broken.SOPInstanceUID]
    assert node.storage.outbox() == []

    # An operator puts it back in line (say, after fixing the cause); the running node tries
    # again, and since this file is still broken it fails again, still losing nothing.
    failures = node.counters.failed
    assert node.storage.requeue_failed() == (1, 0)
    wait_for(lambda: node.counters.failed == failures + 1, what="the second attempt")
    assert [p.stem for p in node.storage.iter_failed()] == [broken.SOPInstanceUID]


def test_a_restart_processes_what_the_last_run_left_in_the_spool(
    node_factory, chest_pngs, tmp_path
):
    """A crash after C-STORE succeeded but before processing: the instance is in the spool,
    possibly next to a half-written temporary file. The next start processes the former and
    ignores the latter."""
    state = tmp_path / "crashed"
    storage = NodeStorage(state)
    pending, _ = radiograph_bytes(chest_pngs[2], VARIANTS["dx-mono1"])
    pending.InstitutionName = "St. Elsewhere <ED>"
    data = encode_dataset(pending)
    storage.spool(pending.SOPInstanceUID, data)  # no association: no calling AE title
    (storage.spool_dir / f".{pending.SOPInstanceUID}.dcm.1.2.tmp").write_bytes(data[:100])
    storage.close()

    node = node_factory(state_dir=state)
    node.start()
    wait_for(lambda: node.storage.status(pending.SOPInstanceUID) == "processed", what="recovery")
    assert len(node.storage.outbox()[0].files) == 4
    # The ledger says processed a moment before the spool file goes.
    wait_for(lambda: node.storage.spooled() == [], what="the spool to empty")
    # Without a calling AE title the image's InstitutionName names the site, made plain.
    log = InferenceLog(node_factory.settings.dicom.inference_log_uri)
    assert log.records(site="St. Elsewhere ED")["source"].tolist() == ["dicom"]
    log.dispose()


def test_bad_configuration_is_refused_with_a_reason(pacs_model, tmp_path):
    with pytest.raises(DestinationError, match="AET@HOST:PORT"):
        Destination.parse("PACS-at-host")
    dicom, registry = pacs_model.settings.dicom, pacs_model.settings.registry
    with pytest.raises(NodeConfigError, match="AE title"):
        build_node(replace(dicom, dicom_ae_title="A" * 17), registry, state_dir=tmp_path / "n")
    with pytest.raises(NodeConfigError, match="certificate and its key"):
        build_node(
            replace(dicom, dicom_tls_cert=tmp_path / "c.pem"), registry, state_dir=tmp_path / "n"
        )


def test_tls_both_ways(node_factory, tmp_path, chest_pngs):
    """Incoming associations need TLS; results go to a PACS that requires mutual TLS."""
    cert, key = self_signed(tmp_path)
    received: list[str] = []

    def on_store(event):
        received.append(str(event.dataset.SOPClassUID))
        return 0x0000

    pacs = AE(ae_title="TLS_PACS")
    for sop_class in RESULT_SOP_CLASSES:
        pacs.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(cert))
    server_tls.load_cert_chain(cert, key)
    server_tls.verify_mode = ssl.CERT_REQUIRED  # the node must present its certificate
    pacs_port = free_port()
    server = pacs.start_server(
        ("127.0.0.1", pacs_port),
        block=False,
        ssl_context=server_tls,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        node = node_factory(
            dicom_tls_cert=cert,
            dicom_tls_key=key,
            dicom_destination=f"TLS_PACS@127.0.0.1:{pacs_port}",
            dicom_destination_tls_ca=cert,
        )
        node.start()
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        assert send(node.port, [], tls=client).statuses == [0x0000]
        assert not send(node.port, []).established  # no plain associations to a TLS node
        source = radiograph(chest_pngs[6], VARIANTS["cr-mono2-12bit"])
        assert send(node.port, [source], tls=client).statuses == [0x0000]
        wait_for(lambda: len(received) == 4, what="the results at the TLS PACS")
        assert sorted(received) == sorted(str(c) for c in RESULT_SOP_CLASSES)
        wait_for(lambda: node.storage.outbox() == [], what="an empty outbox")
    finally:
        server.shutdown()


def test_results_travel_compressed_where_the_destination_accepts_it(node_factory, chest_pngs):
    """Every image kind is set to travel compressed, but the PACS here takes compressed syntaxes
    (deflate) only for SEG and the parametric map, and JPEG-LS for nothing: the secondary
    capture goes uncompressed, all of them whole."""
    received: dict[str, tuple[str, np.ndarray | None]] = {}

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        pixels = ds.pixel_array if {"PixelData", "FloatPixelData"} & set(ds.dir()) else None
        received[str(ds.SOPClassUID)] = (str(event.context.transfer_syntax), pixels)
        return 0x0000

    pacs = AE(ae_title="PACS")
    for sop_class in RESULT_SOP_CLASSES:
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        if sop_class in (SegmentationStorage, ParametricMapStorage):
            syntaxes = [DeflatedExplicitVRLittleEndian, *syntaxes]
        pacs.add_supported_context(sop_class, syntaxes)
    pacs_port = free_port()
    server = pacs.start_server(
        ("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        node = node_factory(
            dicom_destination=f"PACS@127.0.0.1:{pacs_port}",
            dicom_compress_results=("seg", "pmap", "sc"),
        )
        node.start()
        source = radiograph(chest_pngs[8], VARIANTS["cr-mono1-12bit"])
        assert send(node.port, [source]).statuses == [0x0000]
        wait_for(lambda: len(received) == 4, what="the results at the PACS")
    finally:
        server.shutdown()
    assert received[str(SegmentationStorage)][0] == DeflatedExplicitVRLittleEndian
    assert received[str(ParametricMapStorage)][0] == DeflatedExplicitVRLittleEndian
    assert received[str(SecondaryCaptureImageStorage)][0] == ExplicitVRLittleEndian
    sc_pixels = received[str(SecondaryCaptureImageStorage)][1]
    assert sc_pixels.shape == (int(source.Rows), int(source.Columns), 3)
    assert (sc_pixels[: int(source.Rows) // 20] == 255).all(axis=-1).any()  # the caption
    pmap_pixels = received[str(ParametricMapStorage)][1]
    assert pmap_pixels.dtype == np.float32 and 0 < pmap_pixels.max() <= 1


def test_images_wait_in_the_spool_until_a_model_is_promoted(
    trained_checkpoint, learnable_cache, chest_pngs, tmp_path
):
    from cxr_platform.deployment.pipeline import register_exported, registry_for
    from cxr_platform.settings import load_settings

    from ..deployment.conftest import export_for_registry

    settings = load_settings(home=tmp_path / "home")
    exported = export_for_registry(
        settings, trained_checkpoint, learnable_cache, tmp_path / "x", "m"
    )
    registered = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
    node = build_node(
        replace(
            settings.dicom,
            dicom_port=free_port(),
            dicom_host="127.0.0.1",
            service_refresh_seconds=0.5,
        ),
        settings.registry,
        state_dir=tmp_path / "node",
    )
    try:
        node.start()
        source = radiograph(chest_pngs[4], VARIANTS["cr-mono2-12bit"])
        assert send(node.port, [source]).statuses == [0x0000]  # accepted without a model
        time.sleep(2.0)
        assert [p.stem for p in node.storage.spooled()] == [source.SOPInstanceUID]
        registry_for(settings.registry).promote(registered.version, triggered_by="test")
        wait_for(
            lambda: node.storage.status(source.SOPInstanceUID) == "processed",
            timeout=60,
            what="processing after the promotion",
        )
        assert len(node.storage.outbox()[0].files) == 4
    finally:
        node.stop()

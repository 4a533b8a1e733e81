"""End to end with a real Orthanc (the Debian package) configured from ``deploy/orthanc/``:
an X-ray uploaded to PACS is routed by the shipped Lua script to the node, and its SR, SEG,
parametric map and secondary capture come back into the same study."""

from __future__ import annotations

import io
import time
from dataclasses import replace

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from cxr_platform.deployment.registry import registry_for
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.pacs import build_node
from cxr_platform.pacs.storage import encode_dataset
from cxr_platform.ports import free_port
from cxr_platform_tests.orthanc import NodeAddress, OrthancProcess

from .conftest import VARIANTS, radiograph_bytes, wait_for
from .scu import send

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
PMAP = "1.2.840.10008.5.1.4.1.1.30"
RESULTS = [SR, SEG, PMAP, SC]


class Pacs:
    def __init__(self, orthanc: OrthancProcess, node) -> None:
        self.orthanc = orthanc
        self.node = node

    def classes(self, study_uid: str) -> list[str]:
        return sorted(i["SOPClassUID"] for i in self.orthanc.study_instances(study_uid))

    def wait_for_results(self, study_uid: str, expected: list[str], timeout: float = 60) -> None:
        wait_for(
            lambda: self.classes(study_uid) == sorted(expected),
            timeout,
            f"{expected} in Orthanc (have {self.classes(study_uid)})",
        )


@pytest.fixture(scope="module")
def pacs(pacs_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("pacs-e2e")
    node_port, orthanc_port = free_port(), free_port()
    orthanc = OrthancProcess(
        base / "orthanc", NodeAddress("CXR_AI", "127.0.0.1", node_port), dicom_port=orthanc_port
    ).start()
    dicom = replace(
        pacs_model.settings.dicom,
        dicom_port=node_port,
        dicom_host="127.0.0.1",
        dicom_destination=f"ORTHANC@127.0.0.1:{orthanc_port}",
        dicom_allowed_aets=("ORTHANC", "MODALITY"),
        dicom_retry_initial_seconds=0.5,
        dicom_retry_max_seconds=2.0,
    )
    node = build_node(dicom, pacs_model.settings.registry, state_dir=base / "node")
    node.start()
    yield Pacs(orthanc, node)
    node.stop()
    orthanc.stop()


def test_an_uploaded_xray_is_routed_and_its_four_results_land_in_the_same_study(
    pacs, pacs_model, chest_pngs
):
    folder = registry_for(pacs_model.settings.registry).download(pacs_model.version)
    predictor = Predictor(folder)
    for index, variant in enumerate(("cr-mono1-12bit", "dx-mono1", "cr-jpegls")):
        source, data = radiograph_bytes(chest_pngs[10 + index], VARIANTS[variant])
        pacs.orthanc.upload(data)
        image_class = DX if variant.startswith("dx") else CR
        pacs.wait_for_results(source.StudyInstanceUID, [image_class, *RESULTS])
        if index == 0:
            # SEG and the map went over, and are kept, deflated (Orthanc accepts it); the SC,
            # not compressed by default, as it was.
            expected = {
                SEG: DeflatedExplicitVRLittleEndian,
                PMAP: DeflatedExplicitVRLittleEndian,
                SC: ExplicitVRLittleEndian,
            }
            for instance in pacs.orthanc.study_instances(source.StudyInstanceUID):
                if instance["SOPClassUID"] in expected:
                    stored = pydicom.dcmread(
                        io.BytesIO(pacs.orthanc.instance_file(instance["ID"])),
                        stop_before_pixels=True,
                    )
                    syntax = stored.file_meta.TransferSyntaxUID
                    assert syntax == expected[instance["SOPClassUID"]]

        (sr_instance,) = [
            i for i in pacs.orthanc.study_instances(source.StudyInstanceUID)
            if i["SOPClassUID"] == SR
        ]  # fmt: skip
        sr = hd.sr.Comprehensive3DSR.from_dataset(
            pydicom.dcmread(io.BytesIO(pacs.orthanc.instance_file(sr_instance["ID"])))
        )
        (group,) = sr.content.get_image_measurement_groups()
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(predictor.predict(data).probability, abs=1e-6)

    # The results went into Orthanc, but the routing script never sent them back to the node.
    time.sleep(1.5)
    assert pacs.node.counters.received == 3
    assert pacs.node.counters.ignored == 0


def test_a_chest_radiograph_stored_as_secondary_capture_is_routed_too(pacs, chest_pngs):
    """A film digitiser's (or an archive's) secondary capture: the routing script forwards it
    and the node judges it by its pixels, so its results come back beside it."""
    source, _ = radiograph_bytes(chest_pngs[14], VARIANTS["cr-mono2-12bit"])
    source.SOPClassUID = SC
    source.file_meta.MediaStorageSOPClassUID = SC
    source.ConversionType = "DI"  # digitised film
    pacs.orthanc.upload(encode_dataset(source))
    pacs.wait_for_results(source.StudyInstanceUID, [SC, *RESULTS])


def test_a_re_uploaded_xray_adds_no_duplicate_results(pacs, chest_pngs):
    source, data = radiograph_bytes(chest_pngs[20], VARIANTS["cr-mono2-12bit"])
    pacs.orthanc.upload(data)
    pacs.wait_for_results(source.StudyInstanceUID, [CR, *RESULTS])
    duplicates = pacs.node.counters.duplicates
    pacs.orthanc.upload(data)  # Orthanc stores it again and routes it again
    wait_for(lambda: pacs.node.counters.duplicates == duplicates + 1, what="the re-sent copy")
    time.sleep(1.0)
    assert pacs.classes(source.StudyInstanceUID) == sorted([CR, *RESULTS])


def test_results_made_while_pacs_is_down_arrive_after_it_restarts(pacs, chest_pngs):
    pacs.orthanc.stop()
    try:
        source, _ = radiograph_bytes(chest_pngs[25], VARIANTS["cr-mono2-12bit"])
        # A modality sends straight to the node while PACS is down.
        assert send(pacs.node.port, [source], calling="MODALITY").statuses == [0x0000]
        wait_for(
            lambda: pacs.node.storage.status(source.SOPInstanceUID) == "processed",
            what="processing",
        )
        time.sleep(1.5)  # at least one failed send-back attempt
        assert len(pacs.node.storage.outbox()[0].files) == 4
    finally:
        pacs.orthanc.start()
    pacs.wait_for_results(source.StudyInstanceUID, RESULTS)
    wait_for(lambda: pacs.node.storage.outbox() == [], what="an empty outbox")


def test_orthanc_may_associate_and_strangers_may_not(pacs):
    assert pacs.orthanc.echo_node()
    refused = send(pacs.node.port, [], calling="STRANGER")
    assert not refused.established and refused.rejected


def test_the_routing_script_never_forwards_what_the_node_sent(pacs, chest_pngs):
    """Even a CR image (a class the script routes) is not forwarded when it arrives from the
    node's AE title: the Lua rule on RemoteAET, independent of the node's own screening."""
    received = pacs.node.counters.received
    source, _ = radiograph_bytes(chest_pngs[30], VARIANTS["cr-mono2-12bit"])
    stored = send(pacs.orthanc.dicom_port, [source], calling="CXR_AI", called="ORTHANC")
    assert stored.statuses == [0x0000]
    pacs.wait_for_results(source.StudyInstanceUID, [CR], timeout=10)
    # A routed image reaches the node within a second in the other tests; give it three.
    time.sleep(3.0)
    assert pacs.node.counters.received == received

"""The sender's studies at once: a burst's studies go over several associations together, each
result once, and a PACS that refuses one study does not hold back the others."""

from __future__ import annotations

import threading
import time

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage

from cxr_platform.pacs.sender import RESULT_SOP_CLASSES, Destination, ResultSender
from cxr_platform.pacs.storage import NodeStorage
from cxr_platform.ports import free_port


def sr(study: str, n: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.{n}"
    ds.StudyInstanceUID = study
    ds.Modality = "SR"
    return ds


class SlowPacs:
    """A real Storage SCP that takes 0.3 s a store and counts associations open at once."""

    def __init__(self, refuse_study: str | None = None) -> None:
        self.received: list[str] = []
        self.open = self.most_open = 0
        self.lock = threading.Lock()
        self.refuse_study = refuse_study
        self.ae = AE(ae_title="PACS")
        for sop_class in RESULT_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, [ExplicitVRLittleEndian])
        self.port = free_port()

    def _opened(self, event) -> None:
        with self.lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)

    def _closed(self, event) -> None:
        with self.lock:
            self.open -= 1

    def _store(self, event) -> int:
        time.sleep(0.3)
        if str(event.dataset.StudyInstanceUID) == self.refuse_study:
            return 0xA700
        with self.lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def __enter__(self) -> SlowPacs:
        handlers = [
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_ACCEPTED, self._opened),
            (evt.EVT_RELEASED, self._closed),
            (evt.EVT_ABORTED, self._closed),
        ]
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers
        )
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("associations", [1, 4])
def test_a_burst_of_studies_goes_over_several_associations_at_once(tmp_path, associations):
    storage = NodeStorage(tmp_path / "node")
    studies = [generate_uid()[:50].rstrip(".") for _ in range(8)]
    for study in studies:
        for n in (1, 2):
            storage.put_result(sr(study, n))
    with SlowPacs(refuse_study=studies[0]) as pacs:
        sender = ResultSender(
            storage,
            Destination("PACS", "127.0.0.1", pacs.port),
            calling_ae_title="CXR_AI",
            associations=associations,
        )
        try:
            started = time.perf_counter()
            report = sender.send_due()
            elapsed = time.perf_counter() - started
        finally:
            sender.close()
    # Every result of the seven other studies once; the refused study waits for its retry.
    expected = sorted(f"{study}.{n}" for study in studies[1:] for n in (1, 2))
    assert sorted(pacs.received) == expected
    assert report.stored == 14 and report.retrying == 2
    assert [s.study_uid for s in storage.outbox()] == [studies[0]]
    assert pacs.most_open == associations
    if associations > 1:
        assert elapsed < 16 * 0.3 / 2  # at least twice as fast as one study after another

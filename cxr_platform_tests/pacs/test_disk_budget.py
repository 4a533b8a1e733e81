"""The node under a full disk: back-pressure through DICOM statuses, never a lost instance.

A destination that is down fills the outbox; past its budget the worker stops scoring, the spool
fills, and C-STORE answers 0xA700 (out of resources). Once PACS is back, everything accepted is
scored and delivered, and the refused instances are accepted when sent again.
"""

from __future__ import annotations

import logging

from pynetdicom import AE, evt

from cxr_platform.disk import MEGABYTE, DiskBudget, free_bytes
from cxr_platform.pacs.node import STATUS_OUT_OF_RESOURCES
from cxr_platform.pacs.sender import RESULT_SOP_CLASSES
from cxr_platform.ports import free_port

from .conftest import VARIANTS, radiograph_bytes, wait_for
from .scu import send


def test_a_full_outbox_pauses_scoring_and_a_full_spool_refuses_until_pacs_is_back(
    node_factory,
    chest_pngs,
    caplog,
):
    sources = [radiograph_bytes(chest_pngs[i], VARIANTS["cr-mono2-12bit"]) for i in range(5)]
    instance_bytes = max(len(data) for _, data in sources)
    pacs_port = free_port()
    node = node_factory(
        dicom_destination=f"PACS@127.0.0.1:{pacs_port}",  # nothing listens there yet
        dicom_retry_initial_seconds=0.2,
        dicom_retry_max_seconds=0.5,
        dicom_spool_max_mb=2.5 * instance_bytes / MEGABYTE,  # room for two instances
        dicom_outbox_max_mb=1 / MEGABYTE,  # one instance's results already fill it
    )
    caplog.set_level(logging.INFO, logger="cxr_platform.pacs.node")
    node.start()
    datasets = [dataset for dataset, _ in sources]
    assert send(node.port, datasets[:1]).statuses == [0x0000]
    wait_for(lambda: node.storage.status(datasets[0].SOPInstanceUID) == "processed")
    statuses = send(node.port, datasets[1:]).statuses
    assert statuses == [0x0000, 0x0000, STATUS_OUT_OF_RESOURCES, STATUS_OUT_OF_RESOURCES]
    assert node.counters.out_of_space == 2
    waiting = sorted(path.stem for path in node.storage.spooled())
    assert waiting == sorted(str(ds.SOPInstanceUID) for ds in datasets[1:3])
    messages = [record.getMessage() for record in caplog.records]
    assert sum("outbox full" in message for message in messages) == 1
    assert sum("refused (out of resources)" in message for message in messages) == 2

    received: list[str] = []
    pacs = AE(ae_title="PACS")
    for sop_class in RESULT_SOP_CLASSES:
        pacs.add_supported_context(sop_class)
    server = pacs.start_server(
        ("127.0.0.1", pacs_port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda event: received.append(1) or 0x0000)],
    )
    try:
        # The destination is back: the outbox drains, scoring resumes, the spool empties...
        wait_for(lambda: not node.storage.spooled(), what="the spool to drain")
        # ... and the refused instances are taken when the modality tries again.
        assert send(node.port, datasets[3:]).statuses == [0x0000, 0x0000]
        wait_for(lambda: len(received) == 20, what="all results at the PACS")
    finally:
        server.shutdown()
    assert all(node.storage.status(str(ds.SOPInstanceUID)) == "processed" for ds in datasets)
    assert any("scoring resumes" in record.getMessage() for record in caplog.records)


def test_below_the_free_space_watermark_c_store_answers_out_of_resources(
    node_factory,
    chest_pngs,
):
    node = node_factory()
    node.start()
    dataset, _ = radiograph_bytes(chest_pngs[0], VARIANTS["cr-mono2-12bit"])
    # A watermark above what the filesystem has free: the real disk answers.
    node.storage.spool_budget = DiskBudget(
        min_free_bytes=free_bytes(node.storage.spool_dir) + 2**40
    )
    assert send(node.port, [dataset]).statuses == [STATUS_OUT_OF_RESOURCES]
    assert node.storage.spooled() == [] and node.storage.status(dataset.SOPInstanceUID) is None
    node.storage.spool_budget = DiskBudget(min_free_bytes=MEGABYTE)  # space came back
    assert send(node.port, [dataset]).statuses == [0x0000]
    wait_for(lambda: node.storage.status(dataset.SOPInstanceUID) == "processed")

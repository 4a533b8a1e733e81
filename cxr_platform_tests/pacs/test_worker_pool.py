"""The node's worker processes: every instance ends in the ledger once, whichever worker scored
it, and a worker killed mid-image loses nothing (``kill -9``, as the kernel's OOM killer would)."""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

import pydicom

from cxr_platform.inference.log import InferenceLog

from .conftest import VARIANTS, dciodvfy_errors, radiograph, wait_for
from .scu import send


def _new_worker(node, known: set[int], timeout: float = 90.0) -> int:
    """A worker process id not seen before (the pool starts them on demand)."""
    found: list[int] = []

    def appeared() -> bool:
        found[:] = [pid for pid in node.pool.pids() if pid not in known]
        return bool(found)

    wait_for(appeared, timeout=timeout, what="a new scoring worker")
    return found[0]


def test_two_workers_score_a_burst_and_a_killed_worker_loses_nothing(
    node_factory, chest_pngs, caplog
):
    node = node_factory(dicom_workers=2)
    assert node.pool is not None and node.pool.workers == 2
    node.start()
    variants = [VARIANTS["cr-mono2-12bit"], VARIANTS["cr-jpegls"]]
    sources = [radiograph(chest_pngs[i % len(chest_pngs)], variants[i % 2]) for i in range(16)]
    log = InferenceLog(node_factory.settings.dicom.inference_log_uri)
    rows_before = len(log.records(site="MODALITY"))
    with caplog.at_level(logging.INFO, logger="cxr_platform.pacs"):
        assert send(node.port, sources).statuses == [0x0000] * len(sources)
        wait_for(lambda: node.counters.processed >= 1, what="the first result")
        still_spooled = len(node.storage.spooled())
        assert still_spooled > 0, "the burst finished before a worker could be killed"
        victim = node.pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        uids = [source.SOPInstanceUID for source in sources]
        wait_for(
            lambda: _settled(node, processed=uids),
            timeout=180,
            what="every instance processed after the kill",
        )
    assert victim not in node.pool.pids()
    assert "a scoring worker died" in caplog.text
    assert node.counters.failed == 0 and node.counters.processed == len(sources)
    assert node.storage.spooled() == [] and not any(node.storage.failed_dir.glob("*.dcm"))
    # Four results for each instance, once each, valid; the killed worker's instance among them.
    results = [path for study in node.storage.outbox() for path in study.files]
    assert len(results) == 4 * len(sources)
    assert _reported(results) == Counter(uids)
    assert dciodvfy_errors(results[0]) == []
    # Every image was scored and logged once, the ones out when their worker died too (an
    # instance scored again by the same version is the same request).
    _assert_logged_once(node, log, uids)
    assert len(log.records(site="MODALITY")) - rows_before == len(sources)
    log.dispose()


def _settled(node, processed: list[str], failed: list[str] = ()) -> bool:
    """Every instance's outcome recorded, counted and out of the spool. The node writes the
    status first (the durable record), then removes the spool file and counts, so a reader that
    waited on the status alone can see the counter one short."""
    return (
        all(node.storage.status(uid) == "processed" for uid in processed)
        and all(node.storage.status(uid) == "failed" for uid in failed)
        and node.counters.processed == len(processed)
        and node.counters.failed == len(failed)
        and not node.storage.spooled()
    )


def _reported(results) -> Counter:
    """How many of the results' SRs report on each source instance."""
    reported: Counter = Counter()
    for path in results:
        result = pydicom.dcmread(path)
        if result.Modality == "SR":
            evidence = result.CurrentRequestedProcedureEvidenceSequence[0]
            series = evidence.ReferencedSeriesSequence[0]
            reported[series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID] += 1
    return reported


def _assert_logged_once(node, log: InferenceLog, uids: list[str]) -> None:
    from cxr_platform.redaction import hash_uid

    logged = log.records()["sop_instance_uid_hash"].tolist()
    hashes = [hash_uid(str(uid), node.processor.uid_salt) for uid in uids]
    assert [logged.count(h) for h in hashes] == [1] * len(uids)


def test_an_image_that_kills_its_worker_is_kept_aside_and_no_other(node_factory, chest_pngs):
    """Two workers, eight instances, one of which kills whichever worker takes it, every time.
    Python's pool fails every call it had out when that happens, innocent ones too: a death is
    charged only to an instance that was out alone, so the poison ends in the failed folder and
    each of the seven others is processed, with its four results and one log row."""
    from .poison import POISON, score_or_die

    node = node_factory(dicom_workers=2)
    node.pool.task = score_or_die
    node.start()
    sources = [
        radiograph(chest_pngs[i % len(chest_pngs)], VARIANTS["cr-mono2-12bit"]) for i in range(8)
    ]
    poisoned = sources[2]
    poisoned.SeriesDescription = POISON
    innocent = [str(source.SOPInstanceUID) for source in sources if source is not poisoned]
    log = InferenceLog(node_factory.settings.dicom.inference_log_uri)
    assert send(node.port, sources).statuses == [0x0000] * len(sources)
    wait_for(
        lambda: _settled(node, processed=innocent, failed=[str(poisoned.SOPInstanceUID)]),
        timeout=400,
        what="the poison kept aside and the others processed",
    )
    assert "died each of the 3 times" in (node.storage.detail(poisoned.SOPInstanceUID) or "")
    assert [p.stem for p in node.storage.failed_dir.glob("*.dcm")] == [poisoned.SOPInstanceUID]
    assert node.counters.failed == 1 and node.counters.processed == len(innocent)
    assert node.storage.spooled() == []
    studies = node.storage.outbox()
    assert all(len(study.files) == 4 for study in studies)  # SR, SEG, map, capture of one source
    assert _reported(path for study in studies for path in study.files) == Counter(innocent)
    _assert_logged_once(node, log, innocent)
    _assert_never_logged(node, log, str(poisoned.SOPInstanceUID))
    log.dispose()


def _assert_never_logged(node, log: InferenceLog, uid: str) -> None:
    from cxr_platform.redaction import hash_uid

    logged = log.records()["sop_instance_uid_hash"].tolist()
    assert logged.count(hash_uid(uid, node.processor.uid_salt)) == 0  # it died before scoring


def test_an_instance_out_at_every_worker_death_is_kept_aside_and_the_node_goes_on(
    node_factory, chest_pngs
):
    """Three deaths with the same instance out (a decoder that crashes on it would do that):
    it goes to the failed folder with the reason, and the next instance is processed."""
    node = node_factory(dicom_workers=1)
    node.start()
    poisoned = radiograph(chest_pngs[0], VARIANTS["cr-mono2-12bit"])
    assert send(node.port, [poisoned]).statuses == [0x0000]
    seen: set[int] = set()
    for _ in range(3):
        worker = _new_worker(node, seen)
        seen.add(worker)
        os.kill(worker, signal.SIGKILL)
    wait_for(lambda: node.storage.status(poisoned.SOPInstanceUID) == "failed", what="quarantine")
    assert "died each of the 3 times" in (node.storage.detail(poisoned.SOPInstanceUID) or "")
    assert [p.stem for p in node.storage.failed_dir.glob("*.dcm")] == [poisoned.SOPInstanceUID]
    healthy = radiograph(chest_pngs[1], VARIANTS["cr-mono2-12bit"])
    assert send(node.port, [healthy]).statuses == [0x0000]
    wait_for(
        lambda: node.storage.status(healthy.SOPInstanceUID) == "processed",
        timeout=120,
        what="the next instance",
    )


def test_a_node_stopped_mid_burst_records_what_its_workers_hold_and_a_restart_finishes(
    node_factory, chest_pngs, tmp_path
):
    """Stopped while instances are spooled and out: what the workers had in hand is recorded
    (not scored and logged again after the restart), the rest waits in the spool, and a new
    node on the same folder finishes them; every instance is logged exactly once."""
    state = tmp_path / "state"
    node = node_factory(state_dir=state, dicom_workers=1)
    node.start()
    sources = [
        radiograph(chest_pngs[i % len(chest_pngs)], VARIANTS["cr-mono2-12bit"]) for i in range(8)
    ]
    uids = [str(source.SOPInstanceUID) for source in sources]
    assert send(node.port, sources).statuses == [0x0000] * len(sources)
    wait_for(lambda: node.counters.processed >= 1, timeout=120, what="the first result")
    node.stop()
    statuses = [node.storage.status(uid) for uid in uids]
    spooled = {path.stem for path in node.storage.spooled()}
    assert all(
        status == "processed" or uid in spooled for uid, status in zip(uids, statuses, strict=True)
    ), (statuses, spooled)
    assert spooled, "the burst finished before the node was stopped"

    again = node_factory(state_dir=state, dicom_workers=1)
    again.start()
    wait_for(
        lambda: all(again.storage.status(uid) == "processed" for uid in uids),
        timeout=180,
        what="the restarted node to finish the spool",
    )
    log = InferenceLog(node_factory.settings.dicom.inference_log_uri)
    _assert_logged_once(again, log, uids)
    log.dispose()

"""The DICOM node: a Storage SCP that PACS routes chest radiographs to, and that sends the
results back.

Three kinds of thread share the durable state in :class:`NodeStorage`:
- pynetdicom's association threads screen each C-STORE and spool accepted instances before
  answering success (so a crash after "success" loses nothing);
- one worker thread hands the oldest spooled instances to the scoring processes
  (:mod:`~cxr_platform.pacs.workers`; or scores them itself without any) and writes what comes
  back: results to the outbox, then the ledger, then the spool file goes;
- the sender empties the outbox into PACS, one association per study, several studies at once,
  with backoff.
"""

from __future__ import annotations

import io
import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from cxr_platform.errors import CxrError
from cxr_platform.http_keys import KeyRing
from cxr_platform.pacs.processing import InstanceProcessor, Processed, TransientProcessingError
from cxr_platform.pacs.sanitize import is_valid_uid
from cxr_platform.pacs.screening import screen
from cxr_platform.pacs.sender import Destination, DicomWebDestination, ResultSender
from cxr_platform.pacs.statuses import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_NOT_AUTHORIZED,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
)
from cxr_platform.pacs.storage import REFUSED, NodeStorage
from cxr_platform.pacs.stow import StowServer, stow_app
from cxr_platform.pacs.workers import Failure, ScoringPool, score_spooled
from cxr_platform.redaction import redact, uid_tag

log = logging.getLogger(__name__)

# What modalities and PACS send radiographs in: uncompressed, and the lossless and lossy
# compressions the platform's decoders (pylibjpeg, pyjpegls, openjpeg, RLE) handle.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    ExplicitVRBigEndian,  # retired, but older modalities and archives still send it
]

MAX_PDU_BYTES = 131072
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
TRANSIENT_RETRY_SECONDS = 10.0
MAX_WORKER_DEATHS = 3
STOP_GRACE_SECONDS = 30.0  # what a stopping node waits for the images its workers have in hand


# What the workers have in hand: each call, with the spool file and header it is about.
InFlight = dict[Future[Processed | Failure], tuple[Path, Dataset]]


def _died(future: Future) -> bool:
    """The call failed because its worker process died (or the pool was restarted under it)."""
    if future.cancelled():
        return True
    return isinstance(future.exception(), BrokenProcessPool)


class NodeConfigError(CxrError):
    """A node configuration that cannot work (bad AE title, TLS files missing, ...)."""


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    ca: Path | None = None  # when set, callers must present a certificate it signed

    def server_context(self) -> ssl.SSLContext:
        for path in (self.cert, self.key, self.ca):
            if path is not None and not Path(path).is_file():
                raise NodeConfigError(f"TLS file {path} does not exist")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            context.load_verify_locations(self.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def client_tls_context(ca: Path, cert: Path | None = None, key: Path | None = None):
    """For the send-back association: verify PACS against ``ca``; present our certificate when
    PACS asks for one (mutual TLS)."""
    for path in (ca, cert, key):
        if path is not None and not Path(path).is_file():
            raise NodeConfigError(f"TLS file {path} does not exist")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "CXR_AI"
    host: str = "0.0.0.0"
    port: int = 11112
    destination: Destination | DicomWebDestination | None = None
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 10
    accept_lateral: bool = False
    tls: TlsConfig | None = None
    destination_tls_ca: Path | None = None  # set: results go to PACS over TLS
    retry_initial_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    idle_poll_seconds: float = 1.0
    compress_results: tuple[str, ...] = ("seg", "pmap")  # kinds sent compressed where accepted
    send_associations: int = 4  # studies sent to the destination at once
    # STOW-RS in: None keeps it off; 0 lets the system pick a port.
    dicomweb_port: int | None = None
    dicomweb_keys: dict[str, str] = field(default_factory=dict)  # key -> client name
    dicomweb_max_body_bytes: int = 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        if (
            self.dicomweb_port is not None
            and not self.dicomweb_keys
            and self.host not in LOOPBACK_HOSTS
        ):
            # Anyone who can reach the port could store images and have them classified.
            raise NodeConfigError(
                "STOW-RS on a network address needs client keys (CXR_DICOM_WEB_KEYS "
                "name=key,...); without keys it listens on 127.0.0.1 only"
            )
        for title in (self.ae_title, *self.allowed_calling_aets):
            if not title or len(title) > 16 or "\\" in title:
                raise NodeConfigError(f"AE title {title!r} must be 1-16 characters, no backslash")


@dataclass
class NodeCounters:
    received: int = 0
    ignored: int = 0
    duplicates: int = 0
    processed: int = 0
    refused: int = 0  # by the input gate
    failed: int = 0
    sent: int = 0
    out_of_space: int = 0  # C-STORE answered 0xA700: spool budget or disk watermark

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # association threads count concurrently

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)


class DicomNode:
    def __init__(
        self,
        config: NodeConfig,
        processor: InstanceProcessor,
        storage: NodeStorage,
        pool: ScoringPool | None = None,
    ) -> None:
        """``pool``: worker processes that score and build results; without one the node's
        own worker thread does (one core)."""
        self.config = config
        self.processor = processor
        self.storage = storage
        self.pool = pool
        # Spool file name -> worker deaths while it was the only instance out.
        self._deaths: dict[str, int] = {}
        # Spool files that were out, with others, when a worker died: each goes out alone before
        # a death is charged to it (dict: in the order they were suspected).
        self._suspects: dict[str, Path] = {}
        self.counters = NodeCounters()
        self.sender = (
            ResultSender(
                storage,
                config.destination,
                calling_ae_title=config.ae_title,
                uid_salt=processor.uid_salt,
                compress=config.compress_results,
                associations=config.send_associations,
                retry_initial_seconds=config.retry_initial_seconds,
                retry_max_seconds=config.retry_max_seconds,
                tls=client_tls_context(
                    config.destination_tls_ca,
                    config.tls.cert if config.tls else None,
                    config.tls.key if config.tls else None,
                )
                if config.destination_tls_ca is not None
                else None,
            )
            if config.destination is not None
            else None
        )
        self._stop = threading.Event()
        self._work = threading.Event()
        self._outbox_ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._paused_until = 0.0
        self._outbox_full: str | None = None
        self._server = None
        self._stow: StowServer | None = None
        self.ae = self._application_entity()

    # -- association side ------------------------------------------------------------------------

    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        # A modality that calls another AE title is misrouted: refuse the association so it
        # finds out at once, instead of having its images classified by the wrong node.
        ae.require_called_aet = True
        ae.maximum_associations = self.config.max_associations
        # Radiographs are megabytes: larger PDUs than pynetdicom's 16 KiB default cut the
        # per-PDU overhead of receiving one (Orthanc's MaximumPduLength goes up to 128 KiB).
        ae.maximum_pdu_size = MAX_PDU_BYTES
        if self.config.allowed_calling_aets:
            # The node's own title may call too, for Verification only (_on_store refuses its
            # stores): that is how its health probe (`cxr dicom-echo`) passes the allow-list
            # without borrowing a PACS's title.
            ae.require_calling_aet = [*self.config.allowed_calling_aets, self.config.ae_title]
        ae.add_supported_context(Verification)
        # Every storage SOP class, so a router that forwards a whole study gets success for the
        # objects the node ignores (with a logged reason) instead of failed sub-operations.
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    def _on_echo(self, event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return STATUS_SUCCESS

    def _tag(self, uid: object) -> str:
        return uid_tag(uid, self.processor.uid_salt)

    def _on_store(self, event) -> int:
        calling = str(event.assoc.requestor.ae_title).strip() or None
        if (
            self.config.allowed_calling_aets
            and calling == self.config.ae_title.strip()
            and calling not in self.config.allowed_calling_aets
        ):
            log.warning("C-STORE under the node's own AE title refused (Verification only)")
            return STATUS_NOT_AUTHORIZED
        try:
            dataset = event.dataset  # decoded here; its elements are checked by accept_instance
        except Exception as exc:
            log.error("C-STORE from %s: unreadable dataset: %s", calling, redact(str(exc)))
            return STATUS_CANNOT_UNDERSTAND
        return self.accept_instance(
            dataset,
            event.encoded_dataset,
            sender=calling,
            requested_uid=str(event.request.AffectedSOPInstanceUID or ""),
            via="C-STORE",
        )

    def accept_instance(
        self,
        dataset: Dataset,
        encoded: Callable[[], bytes],
        *,
        sender: str | None,
        requested_uid: str = "",
        via: str,
    ) -> int:
        """Screen a received instance and spool it; the DIMSE status to answer (STOW-RS maps it
        to its own response). ``encoded`` gives the Part 10 bytes to spool, only once they are
        needed; ``sender`` is the calling AE title or the DICOMweb client, logged as the site."""
        try:
            sop_uid = str(dataset.get("SOPInstanceUID", "") or "").strip()
        except Exception as exc:
            log.error("%s from %s: unreadable dataset: %s", via, sender, redact(str(exc)))
            return STATUS_CANNOT_UNDERSTAND
        self.counters.add("received")
        if not is_valid_uid(sop_uid):
            # Nothing can reference an instance without a valid UID: refuse it, and keep a
            # ledger row under whatever identifier it came with, so the refusal is on record
            # (the ledger is keyed by text; only the spool needs UIDs safe as file names).
            key = (sop_uid or requested_uid.strip())[:256] or None
            if key is not None and self.storage.status(key) is None:
                self.storage.mark(key, "rejected", detail="SOPInstanceUID missing or invalid")
            self.counters.add("failed")
            log.warning(
                "%s from %s refused (%s): SOPInstanceUID missing or invalid",
                via,
                sender,
                self._tag(key),
            )
            return STATUS_CANNOT_UNDERSTAND
        tag = self._tag(sop_uid)
        verdict = screen(
            dataset,
            accept_lateral=self.config.accept_lateral,
            own_manufacturer=self.processor.config.manufacturer,  # what it stamps on results
        )
        if not verdict.accepted:
            self.counters.add("ignored")
            log.info("ignored %s from %s: %s", tag, sender, verdict.reason)
            return STATUS_SUCCESS
        if self.storage.status(sop_uid) == "processed":
            self.counters.add("duplicates")
            log.info("ignored %s from %s: already processed (re-sent instance)", tag, sender)
            return STATUS_SUCCESS
        data = encoded()
        shortfall = self.storage.spool_shortfall(len(data))
        if shortfall is not None:
            # Refused before anything is written: the sender still holds the instance and can
            # send it again once the worker (or the destination behind it) has caught up.
            self.counters.add("out_of_space")
            log.warning(
                "%s from %s refused (out of resources): %s not spooled, %s",
                via,
                sender,
                tag,
                shortfall,
            )
            return STATUS_OUT_OF_RESOURCES
        try:
            self.storage.spool(sop_uid, data, calling_ae_title=sender)
        except ValueError as exc:
            log.error("%s from %s: %s", via, sender, redact(str(exc)))
            return STATUS_CANNOT_UNDERSTAND
        except OSError as exc:
            log.error("%s from %s: cannot spool %s: %s", via, sender, tag, exc.strerror)
            return STATUS_OUT_OF_RESOURCES
        log.info("spooled %s from %s (%s)", tag, sender, via)
        self._work.set()
        return STATUS_SUCCESS

    # -- worker ----------------------------------------------------------------------------------

    def process_spool(self) -> int:
        """Process every spooled instance once; returns how many were finished."""
        finished = 0
        for path in self.storage.spooled():
            if self._stop.is_set():
                break
            if self._outbox_is_full():
                self._paused_until = time.monotonic() + self.config.idle_poll_seconds
                return finished
            try:
                outcome = self._process_file(path)
            except TransientProcessingError as exc:
                self._pause(exc)
                return finished
            finished += outcome
        return finished

    def _outbox_is_full(self) -> bool:
        """Results waiting past the outbox budget (the destination is down or slow): stop
        scoring, so instances wait in the spool instead of piling up as results. One log line
        when that starts and one when it ends."""
        shortfall = self.storage.outbox_shortfall()
        if shortfall is not None and self._outbox_full is None:
            log.warning(
                "outbox full (%s): scoring paused, %d instances wait in the spool until the "
                "destination takes results",
                shortfall,
                len(self.storage.spooled()),
            )
        elif shortfall is None and self._outbox_full is not None:
            log.info("outbox has room again: scoring resumes")
        self._outbox_full = shortfall
        return shortfall is not None

    def _read_spooled(self, path: Path, *, header_only: bool) -> tuple[bytes, Dataset] | None:
        """The spool file's bytes (empty with ``header_only``) and its dataset; None when it is
        done with: unreadable (kept aside) or already processed (removed)."""
        try:
            if header_only:
                data = b""
                # force: an instance put in the spool by hand may be a legacy file without meta
                dataset = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            else:
                data = path.read_bytes()
                dataset = pydicom.dcmread(io.BytesIO(data), force=True)
            sop_uid = str(dataset.SOPInstanceUID)
        except FileNotFoundError:
            return None  # finished between listing the spool and reading it
        except Exception as exc:
            self._fail(path, path.stem, None, f"unreadable spool file: {type(exc).__name__}")
            return None
        if self.storage.status(sop_uid) == "processed":
            path.unlink(missing_ok=True)  # re-sent while the first copy was being processed
            return None
        return data, dataset

    def _process_file(self, path: Path) -> int:
        read = self._read_spooled(path, header_only=False)
        if read is None:
            return 1
        data, dataset = read
        sop_uid = str(dataset.SOPInstanceUID)
        outcome = score_spooled(
            self.processor, data, dataset, self.storage.calling_ae_title(sop_uid)
        )
        self._finish(path, dataset, outcome)
        return 1

    def _finish(self, path: Path, dataset: Dataset, outcome: Processed | Failure) -> None:
        """Record what became of a spooled instance: results in the outbox, then the ledger,
        then the spool file goes. Raises :class:`TransientProcessingError` for a failure worth
        retrying (the instance stays spooled)."""
        sop_uid = str(dataset.SOPInstanceUID)
        study_uid = str(dataset.get("StudyInstanceUID", "") or "")
        if isinstance(outcome, Failure):
            if outcome.kind == "transient":
                raise TransientProcessingError(outcome.reason)
            self._fail(path, sop_uid, study_uid, outcome.reason)
            return
        processed = outcome
        self._log_repairs(sop_uid, processed)
        result_uids = []
        for result in processed.outbox_files():
            self.storage.put_encoded(
                result.study_instance_uid, result.sop_instance_uid, result.data
            )
            result_uids.append(result.sop_instance_uid)
        if processed.prediction is None:
            self._refused(path, sop_uid, study_uid, processed, result_uids)
            return
        repaired = sorted({repair.keyword for repair in processed.repairs})
        self.storage.mark(
            sop_uid,
            "processed",
            study_instance_uid=study_uid,
            model_version=str(processed.prediction.model_version),
            results=result_uids,
            detail=f"{processed.prediction.label} p={processed.prediction.probability:.4f}"
            + (f"; {processed.lung.describe()}" if processed.lung else "")
            + (f"; header repaired for the results: {', '.join(repaired)}" if repaired else ""),
        )
        path.unlink(missing_ok=True)
        self.counters.add("processed")
        log.info(
            "%s: %s p=%.3f (model %s v%s) in %.0f ms; %d results queued",
            self._tag(sop_uid),
            processed.prediction.label,
            processed.prediction.probability,
            processed.prediction.model_name,
            processed.prediction.model_version,
            processed.seconds * 1000,
            len(result_uids),
        )
        self._outbox_ready.set()

    def _log_repairs(self, sop_uid: str, processed: Processed) -> None:
        if processed.repairs:
            log.warning(
                "%s: header not copied as it was: %s",
                self._tag(sop_uid),
                "; ".join(repair.describe() for repair in processed.repairs),
            )

    def _refused(
        self,
        path: Path,
        sop_uid: str,
        study_uid: str,
        processed: Processed,
        result_uids: list[str],
    ) -> int:
        """Refused by the input gate, or as outside the version's intended use: no diagnosis
        leaves; the ledger says why. The instance is not kept: it was read and judged, nothing
        went wrong."""
        verdict, refused_as = processed.refusal, processed.refused_as or "not_a_chest_radiograph"
        assert verdict is not None
        self.storage.mark(
            sop_uid,
            REFUSED,
            study_instance_uid=study_uid,
            results=result_uids,
            detail=f"{refused_as}: {processed.recorded_refusal}",
        )
        path.unlink(missing_ok=True)
        self.counters.add("refused")
        # The log line names the reason, never the patient's age it was judged by.
        log.warning(
            "%s refused: %s (%s)%s",
            self._tag(sop_uid),
            refused_as,
            verdict.reason,
            "; a not-analysed SR is queued" if result_uids else "",
        )
        return 1

    def _fail(self, path: Path, sop_uid: str, study_uid: str | None, reason: str) -> None:
        kept = self.storage.quarantine(path)
        self.storage.mark(sop_uid, "failed", study_instance_uid=study_uid, detail=reason)
        self.counters.add("failed")
        log.error("%s not processed (%s); kept in %s", self._tag(sop_uid), reason, kept.parent.name)

    def _worker_loop(self) -> None:
        if self.pool is not None:
            self._pool_loop()  # the workers warm up as they start
            return
        try:
            self.processor.warm_up()
        except Exception:
            log.exception("warm-up failed; the first image will load the explainer")
        while not self._stop.is_set():
            self._work.wait(self.config.idle_poll_seconds)
            self._work.clear()
            if time.monotonic() < self._paused_until:
                continue
            try:
                self.process_spool()
            except Exception:
                log.exception("spool worker pass failed")

    def _pool_loop(self) -> None:
        """Keep every worker busy with the oldest spooled instances (one more queued behind
        each), and record each answer as it comes back."""
        assert self.pool is not None
        out: InFlight = {}
        while not self._stop.is_set():
            try:
                self._pool_pass(out, capacity=2 * self.pool.workers)
            except BrokenProcessPool:  # a worker died while none of its calls was being waited on
                self._collect_after_death(out)
            except Exception:
                log.exception("spool worker pass failed")
                time.sleep(self.config.idle_poll_seconds)
        # Stopping: the images the workers have in hand are finished and recorded, so a
        # restart does not score (and log) them again.
        done, _ = wait(out, timeout=STOP_GRACE_SECONDS)
        for future in done:
            self._record(out, future)

    def _pool_pass(self, out: InFlight, capacity: int) -> None:
        if time.monotonic() >= self._paused_until and not self._outbox_is_full():
            self._dispatch(out, capacity)
        if not out:
            self._work.wait(self.config.idle_poll_seconds)
            self._work.clear()
            return
        # With a worker free, look at the spool again soon: an arrival should not wait for
        # another instance to finish.
        timeout = self.config.idle_poll_seconds if len(out) >= capacity else 0.1
        done, _ = wait(out, timeout=timeout, return_when=FIRST_COMPLETED)
        if any(_died(future) for future in done):
            self._collect_after_death(out)
            return
        for future in done:
            self._record(out, future)

    def _collect_after_death(self, out: InFlight) -> None:
        """Python's pool fails every call it had out when one worker dies, whichever instance
        killed it: record what finished before, then start new workers. The death is charged
        to an instance only when it was the only one out; with others, every one of them is a
        suspect and goes out alone next (:meth:`_dispatch`), so an image that kills its worker
        is found and only it is ever kept aside."""
        assert self.pool is not None
        alone = len(out) == 1
        done, _ = wait(out, timeout=60)
        lost = sum(_died(future) for future in done)
        log.error(
            "a scoring worker died; %d instances go out again to new workers%s",
            lost,
            "" if alone else ", one at a time",
        )
        self.pool.restart()
        for future in done:
            if _died(future):
                path, dataset = out.pop(future)
                if alone:
                    self._worker_died(path, dataset)
                else:
                    self._suspects.setdefault(path.name, path)
            else:
                self._record(out, future)

    def _record(self, out: InFlight, future: Future[Processed | Failure]) -> None:
        path, dataset = out.pop(future)
        try:
            self._collect(path, dataset, future)
        except Exception:
            log.exception("recording %s failed", self._tag(dataset.SOPInstanceUID))

    def _dispatch(self, out: InFlight, capacity: int) -> None:
        assert self.pool is not None
        if self._suspects:
            self._dispatch_suspect(out)
            return
        busy = {path for path, _ in out.values()}
        for path in self.storage.spooled():
            if len(out) >= capacity or self._stop.is_set():
                return
            if path in busy:
                continue
            read = self._read_spooled(path, header_only=True)
            if read is None:
                continue
            _, dataset = read
            calling = self.storage.calling_ae_title(str(dataset.SOPInstanceUID))
            out[self.pool.submit(path, calling)] = (path, dataset)

    def _dispatch_suspect(self, out: InFlight) -> None:
        """The oldest suspect, alone: nothing else goes out until it comes back."""
        assert self.pool is not None
        if out:
            return
        while self._suspects:
            name, path = next(iter(self._suspects.items()))
            read = self._read_spooled(path, header_only=True) if path.exists() else None
            if read is None:  # no longer spooled (recorded, or set aside as unreadable)
                del self._suspects[name]
                continue
            _, dataset = read
            calling = self.storage.calling_ae_title(str(dataset.SOPInstanceUID))
            out[self.pool.submit(path, calling)] = (path, dataset)
            return

    def _collect(self, path: Path, dataset: Dataset, future: Future[Processed | Failure]) -> None:
        if _died(future):
            # Out with others when the pool went (a node stopping): a suspect, not charged.
            self._suspects.setdefault(path.name, path)
            return
        self._deaths.pop(path.name, None)
        self._suspects.pop(path.name, None)
        try:
            self._finish(path, dataset, future.result())
        except TransientProcessingError as exc:
            self._pause(exc)

    def _pause(self, exc: TransientProcessingError) -> None:
        """Nothing in the spool can succeed until this clears (no production model, the
        inference log down): wait instead of retrying on every arrival."""
        self._paused_until = time.monotonic() + TRANSIENT_RETRY_SECONDS
        log.warning(
            "%d instances stay spooled (%s); retrying in %.0f s",
            len(self.storage.spooled()),
            exc,
            TRANSIENT_RETRY_SECONDS,
        )

    def _worker_died(self, path: Path, dataset: Dataset) -> None:
        """A worker died (killed, out of memory, crashed in native code) with this instance
        out alone: nothing of it was recorded, so it is still in the spool and goes out again,
        alone. One that killed its worker MAX_WORKER_DEATHS times is kept aside for a person,
        so an image that crashes its decoder cannot stop the node."""
        deaths = self._deaths.get(path.name, 0) + 1
        self._deaths[path.name] = deaths
        self._suspects.setdefault(path.name, path)  # and it goes out alone again
        if deaths < MAX_WORKER_DEATHS:
            return
        self._deaths.pop(path.name, None)
        self._suspects.pop(path.name, None)
        self._fail(
            path,
            str(dataset.SOPInstanceUID),
            str(dataset.get("StudyInstanceUID", "") or ""),
            f"a scoring worker died each of the {deaths} times it had this instance",
        )

    def _sender_loop(self) -> None:
        assert self.sender is not None
        while not self._stop.is_set():
            due = self.sender.seconds_until_due()
            wait = self.config.idle_poll_seconds if due is None else min(due, 5.0)
            if wait > 0:
                self._outbox_ready.wait(wait)
            self._outbox_ready.clear()
            if self._stop.is_set():
                break
            try:
                report = self.sender.send_due()
                self.counters.add("sent", report.stored)
            except Exception:
                log.exception("sending results failed")
                time.sleep(self.config.idle_poll_seconds)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        ssl_context = self.config.tls.server_context() if self.config.tls else None
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        self._server = self.ae.start_server(
            (self.config.host, self.config.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=ssl_context,
        )
        if self.config.dicomweb_port is not None:
            app = stow_app(
                self,
                KeyRing(None, self.config.dicomweb_keys),
                max_body_bytes=self.config.dicomweb_max_body_bytes,
            )
            tls = (self.config.tls.cert, self.config.tls.key) if self.config.tls else None
            self._stow = StowServer(app, self.config.host, self.config.dicomweb_port, tls=tls)
            self._stow.start()
            log.info(
                "STOW-RS on %s:%d/dicom-web/studies%s%s",
                self.config.host,
                self._stow.port,
                " (TLS)" if tls else "",
                "" if self.config.dicomweb_keys else "; no client keys: open to this machine only",
            )
        if self.pool is not None:
            self.pool.start()
        pending = len(self.storage.spooled())
        if pending:
            log.info("%d instances left in the spool by the last run will be processed", pending)
        self._threads = [
            threading.Thread(target=self._worker_loop, name="cxr-dicom-worker", daemon=True)
        ]
        if self.sender is not None:
            self._threads.append(
                threading.Thread(target=self._sender_loop, name="cxr-dicom-sender", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        self._work.set()
        self._outbox_ready.set()
        log.info(
            "DICOM node %s listening on %s:%d%s; results to %s",
            self.config.ae_title,
            self.config.host,
            self.config.port,
            " (TLS)" if ssl_context else "",
            self.config.destination or "nowhere (no destination)",
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def dicomweb_url(self) -> str:
        """The STOW-RS root as a client on this machine reaches it."""
        assert self._stow is not None, "STOW-RS is off (no dicomweb_port)"
        scheme = "https" if self._stow.tls else "http"
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"{scheme}://{host}:{self._stow.port}/dicom-web"

    def stop(self) -> None:
        self._stop.set()
        self._work.set()
        self._outbox_ready.set()
        if self._stow is not None:
            self._stow.stop()
            self._stow = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []
        if self.sender is not None:
            self.sender.close()
        if self.pool is not None:
            self.pool.close()
        self.processor.models.stop()

    def __enter__(self) -> DicomNode:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

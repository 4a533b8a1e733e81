"""Send the outbox to PACS: one association (C-STORE) or one STOW-RS request (DICOMweb) per
study, a file leaves the outbox only when PACS acknowledged it, and an unreachable PACS is
retried with exponential backoff.

Image results of the kinds configured to travel compressed wait in the outbox compressed (the
worker that built them did it). For those kinds each association proposes the kind's lossless
syntax (deflate for SEG and map, JPEG-LS for the SC) beside the uncompressed ones; where the
destination accepts it the file goes as it is, elsewhere decompressed
(:mod:`~cxr_platform.pacs.compression`). A result written uncompressed (before the setting
changed) is compressed on the way out where it can be."""

from __future__ import annotations

import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from cxr_platform.errors import CxrError
from cxr_platform.pacs.compression import (
    SOP_CLASS_BY_KIND,
    compress_dataset,
    compressed_syntax,
    decompress_dataset,
    is_uncompressed,
)
from cxr_platform.pacs.statuses import STATUS_CANNOT_UNDERSTAND, STORED_STATUSES
from cxr_platform.pacs.storage import NodeStorage, OutboxStudy, encode_dataset
from cxr_platform.pacs.stow import multipart_related
from cxr_platform.redaction import redact, uid_tag

log = logging.getLogger(__name__)

# A result file goes as its bytes, in PDU-sized chunks, instead of being decoded and encoded
# again (which cost up to half a second a study: a 10 MB capture, a map deflated twice). The
# sender picks the file only where the association accepted its very transfer syntax, which is
# what this mode needs; anything else goes as a dataset.
_config.STORE_SEND_CHUNKED_DATASET = True

RESULT_SOP_CLASSES = (
    Comprehensive3DSRStorage,
    SegmentationStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
)


class DestinationError(CxrError):
    """A destination string that is not AET@HOST:PORT."""


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            destination = cls(ae_title.strip(), host.strip().strip("[]"), int(port))
        except ValueError:
            raise DestinationError(
                f"destination {text!r} is not AET@HOST:PORT (for example PACS@10.0.0.5:4242)"
            ) from None
        if not destination.ae_title or len(destination.ae_title) > 16:
            raise DestinationError(f"AE title {destination.ae_title!r} must be 1-16 characters")
        if not 0 < destination.port < 65536:
            raise DestinationError(f"port {destination.port} is out of range")
        return destination

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class DicomWebDestination:
    """A DICOMweb server's root (STOW-RS goes to ``{url}/studies``), and the Authorization
    header value it wants (``Bearer ...`` or ``Basic ...``), if any."""

    url: str
    authorization: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, authorization: str | None = None) -> DicomWebDestination:
        parsed = httpx.URL(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise DestinationError(
                f"DICOMweb destination {url!r} is not an http(s) URL (for example "
                "https://pacs.example/dicom-web)"
            )
        return cls(str(parsed).rstrip("/"), authorization or None)

    def __str__(self) -> str:
        return self.url


@dataclass
class _Backoff:
    failures: int = 0
    next_attempt: float = 0.0


@dataclass
class SendReport:
    stored: int = 0
    retrying: int = 0
    rejected: int = 0
    unreachable: bool = False
    errors: list[str] = field(default_factory=list)

    def add(self, other: SendReport) -> None:
        self.stored += other.stored
        self.retrying += other.retrying
        self.rejected += other.rejected
        self.unreachable = self.unreachable or other.unreachable
        self.errors.extend(other.errors)


class ResultSender:
    def __init__(
        self,
        storage: NodeStorage,
        destination: Destination | DicomWebDestination,
        *,
        calling_ae_title: str,
        retry_initial_seconds: float = 2.0,
        retry_max_seconds: float = 300.0,
        max_refusals: int = 5,
        timeout_seconds: float = 30.0,
        tls: ssl.SSLContext | None = None,
        uid_salt: bytes = b"",
        compress: tuple[str, ...] = ("seg", "pmap"),
        associations: int = 1,
    ) -> None:
        """``associations``: studies sent at once, each over its own association (or STOW-RS
        request); a burst otherwise waits on PACS storing one study after another."""
        self.storage = storage
        self.associations = max(1, associations)
        self._pool = (
            ThreadPoolExecutor(self.associations, thread_name_prefix="cxr-dicom-send")
            if self.associations > 1
            else None
        )
        self.uid_salt = uid_salt  # study UIDs in log lines are hashed as the inference log does
        self.compressed_classes = frozenset(str(SOP_CLASS_BY_KIND[kind]) for kind in compress)
        self.destination = destination
        self.retry_initial_seconds = retry_initial_seconds
        self.retry_max_seconds = retry_max_seconds
        self.max_refusals = max_refusals
        self._backoff: dict[str, _Backoff] = {}
        self._refusals: dict[Path, int] = {}
        if isinstance(destination, DicomWebDestination):
            headers = {"Accept": "application/dicom+json"}
            if destination.authorization:
                headers["Authorization"] = destination.authorization
            self.http = httpx.Client(
                headers=headers, timeout=timeout_seconds, verify=tls if tls is not None else True
            )
            return
        self.tls_args = (tls, destination.host) if tls is not None else None
        self.ae = AE(ae_title=calling_ae_title)
        self.ae.maximum_pdu_size = 131072  # what we accept; what we send is PACS's maximum
        for sop_class in RESULT_SOP_CLASSES:
            if str(sop_class) in self.compressed_classes:
                self.ae.add_requested_context(sop_class, [compressed_syntax(sop_class)])
            # One context per syntax, so PACS accepts each it can store (offered together it
            # picks one): a file in an accepted syntax goes as its bytes, no decoding.
            for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                self.ae.add_requested_context(sop_class, [syntax])
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout_seconds

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if isinstance(self.destination, DicomWebDestination):
            self.http.close()

    def seconds_until_due(self) -> float | None:
        """None when the outbox is empty; 0 when something can be sent now."""
        studies = self.storage.outbox()
        if not studies:
            return None
        now = time.monotonic()
        waits = [
            max(0.0, self._backoff.get(s.study_uid, _Backoff()).next_attempt - now) for s in studies
        ]
        return min(waits)

    def send_due(self) -> SendReport:
        report = SendReport()
        now = time.monotonic()
        due = []
        for study in self.storage.outbox():
            backoff = self._backoff.setdefault(study.study_uid, _Backoff())
            if backoff.next_attempt > now:
                report.retrying += len(study.files)
            else:
                due.append(study)
        if self._pool is None or len(due) < 2:
            studies = [self._send_due_study(study) for study in due]
        else:
            studies = list(self._pool.map(self._send_due_study, due))
        for study_report in studies:
            report.add(study_report)
        return report

    def _send_due_study(self, study: OutboxStudy) -> SendReport:
        report = SendReport()
        backoff = self._backoff[study.study_uid]
        if self._send_study(study.study_uid, study.files, report):
            self._backoff.pop(study.study_uid, None)
        else:
            backoff.failures += 1
            delay = min(
                self.retry_max_seconds,
                self.retry_initial_seconds * 2 ** (backoff.failures - 1),
            )
            backoff.next_attempt = time.monotonic() + delay
            log.warning(
                "results of study %s not all stored in %s; retry %d in %.1f s",
                uid_tag(study.study_uid, self.uid_salt),
                self.destination,
                backoff.failures,
                delay,
            )
        return report

    def _send_study(self, study_uid: str, files: list[Path], report: SendReport) -> bool:
        if isinstance(self.destination, DicomWebDestination):
            return self._stow_study(study_uid, files, report)
        destination = self.destination
        assoc = self.ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=self.tls_args,
        )
        if not assoc.is_established:
            report.unreachable = True
            report.retrying += len(files)
            report.errors.append(f"no association with {destination}")
            return False
        complete = True
        try:
            accepted = {
                (str(context.abstract_syntax), str(context.transfer_syntax[0]))
                for context in assoc.accepted_contexts
            }
            for path in files:
                try:
                    status = assoc.send_c_store(self._as_accepted(path, accepted))
                except Exception as exc:  # the file vanished, the link dropped mid-send, ...
                    log.warning(
                        "C-STORE of %s failed: %s: %s",
                        self._tag(path),
                        type(exc).__name__,
                        redact(str(exc)),
                    )
                    complete = False
                    report.retrying += 1
                    if not assoc.is_established:
                        break
                    continue
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in STORED_STATUSES:
                    self.storage.acknowledge(path)
                    self._refusals.pop(path, None)
                    report.stored += 1
                    continue
                complete = False
                if code == -1:  # no response at all: the association failed
                    report.retrying += 1
                    break
                self._refused(path, code, report)
        finally:
            if assoc.is_established:
                assoc.release()
        return complete

    def _tag(self, path: Path) -> str:
        """How a log line names a result file: its file name is the result's SOP Instance UID."""
        return uid_tag(path.stem, self.uid_salt)

    def _refused(self, path: Path, code: int, report: SendReport) -> None:
        """PACS said no to one result: retried a few times (a PACS being reconfigured), then
        kept aside for a person."""
        refusals = self._refusals.get(path, 0) + 1
        self._refusals[path] = refusals
        if refusals >= self.max_refusals:
            self.storage.reject_result(path)
            self._refusals.pop(path, None)
            report.rejected += 1
            log.error(
                "%s refused %s %d times (status 0x%04X); kept aside (`cxr dicom-status` lists "
                "it, `cxr dicom-retry` sends it again)",
                self.destination,
                self._tag(path),
                refusals,
                code,
            )
        else:
            report.retrying += 1
            log.warning("%s refused %s (status 0x%04X)", self.destination, self._tag(path), code)

    def _stow_study(self, study_uid: str, files: list[Path], report: SendReport) -> bool:
        """One STOW-RS request for the study's results. HTTP has no transfer-syntax
        negotiation: the kinds set to travel compressed always do, so an archive that cannot
        store the compressed syntaxes needs CXR_DICOM_COMPRESS_RESULTS emptied."""
        assert isinstance(self.destination, DicomWebDestination)
        sent: dict[str, Path] = {}
        parts: list[bytes] = []
        for path in files:
            try:
                parts.append(self._part10(path))
            except FileNotFoundError:
                continue  # acknowledged by a previous pass meanwhile
            sent[path.stem] = path
        if not sent:
            return True
        body, content_type = multipart_related(parts)
        try:
            response = self.http.post(
                f"{self.destination.url}/studies",
                content=body,
                headers={"Content-Type": content_type},
            )
        except httpx.HTTPError as exc:
            report.unreachable = True
            report.retrying += len(sent)
            report.errors.append(f"{self.destination}: {type(exc).__name__}")
            return False
        if response.status_code not in (200, 202, 409):
            # Unauthorized, too large, busy: nothing was stored; try again later.
            report.retrying += len(sent)
            report.errors.append(f"{self.destination}: HTTP {response.status_code}")
            log.warning("%s answered HTTP %d to STOW-RS", self.destination, response.status_code)
            return False
        referenced, failed = _stow_outcomes(response)
        complete = True
        for sop_uid, path in sent.items():
            if sop_uid in failed:
                self._refused(path, failed[sop_uid], report)
                complete = False
            elif sop_uid in referenced or (response.status_code == 200 and not referenced):
                # 200 means all were stored, whether or not the server lists them.
                self.storage.acknowledge(path)
                self._refusals.pop(path, None)
                report.stored += 1
            elif response.status_code == 409:  # none stored, and the server did not say why
                self._refused(path, STATUS_CANNOT_UNDERSTAND, report)
                complete = False
            else:  # 202 without a word on this one: not known to be stored, so sent again
                report.retrying += 1
                complete = False
        return complete

    def _part10(self, path: Path) -> bytes:
        if str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID) in (
            self.compressed_classes
        ):
            dataset = pydicom.dcmread(path)
            if is_uncompressed(dataset.file_meta.TransferSyntaxUID):
                return encode_dataset(compress_dataset(dataset))
        return path.read_bytes()

    def _as_accepted(self, path: Path, accepted: set[tuple[str, str]]) -> Path | pydicom.Dataset:
        """The file as it waits in the outbox where the association accepted its syntax;
        decompressed where it did not (uncompressed, which every destination takes); compressed
        where it waits uncompressed but its kind travels compressed and that was accepted."""
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        sop_class, syntax = str(meta.MediaStorageSOPClassUID), meta.TransferSyntaxUID
        if (
            is_uncompressed(syntax)
            and sop_class in self.compressed_classes
            and (sop_class, str(compressed_syntax(sop_class))) in accepted
        ):
            return compress_dataset(pydicom.dcmread(path))
        if (sop_class, str(syntax)) in accepted:
            return path  # sent as its bytes (STORE_SEND_CHUNKED_DATASET)
        # Decoded, and encoded in what was accepted (pynetdicom converts between the
        # uncompressed syntaxes).
        return decompress_dataset(pydicom.dcmread(path))


def _stow_outcomes(response: httpx.Response) -> tuple[set[str], dict[str, int]]:
    """(SOP Instance UIDs the server stored, failed ones with their reason) from a STOW-RS
    response; both empty when it sent no DICOM JSON."""
    try:
        answer = pydicom.Dataset.from_json(response.text) if response.content else None
    except Exception:  # noqa: BLE001 - no DICOM JSON: the HTTP status is all there is
        answer = None
    if answer is None:
        return set(), {}
    referenced = {
        str(item.get("ReferencedSOPInstanceUID", ""))
        for item in answer.get("ReferencedSOPSequence", [])
    }
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): int(
            item.get("FailureReason", STATUS_CANNOT_UNDERSTAND)
        )
        for item in answer.get("FailedSOPSequence", [])
    }
    return referenced, failed

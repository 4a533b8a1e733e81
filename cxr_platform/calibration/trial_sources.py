"""Where a silent trial's images come from: a site's archive over DICOMweb (QIDO-RS finds the
chest radiograph studies of one study date, WADO-RS streams their instances), or a folder the
site exported.

Each source yields one :class:`TrialImage` per instance, or a :class:`StudyMiss` for a study
that could not be retrieved, so one bad study never stops a trial. What cannot be a per-study
record (the archive unreachable, credentials refused, a search answer without the attributes
every QIDO-RS answer must carry) is a typed error: the partition fails and can be retried.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
import requests

from cxr_platform.errors import CxrError
from cxr_platform.inference.batch import expand_inputs

# What a silent trial asks the archive for: the modalities of projection radiography. A chest
# radiograph stored as Secondary Capture is not searched for; the input gate judges those on the
# live routes, where PACS decides what is sent.
TRIAL_MODALITIES = ("CR", "DX")
# Retrieved in the encoding the archive stored, so it transcodes nothing; the decoder reads
# every transfer syntax PACS use.
_AS_STORED = (("application/dicom", "*"),)
QIDO_PAGE = 200  # answers per search request; a busy day is several pages


class ArchiveError(CxrError):
    """The site archive cannot be searched: the partition fails and is worth retrying."""


class ArchiveUnreachableError(ArchiveError):
    pass


class ArchiveAuthError(ArchiveError):
    """401 or 403: the credentials (CXR_SITE_ARCHIVE_AUTH) are missing or refused."""


class ArchiveResponseError(ArchiveError):
    """An answer that is not what the DICOMweb standard says it must be."""


@dataclass(frozen=True)
class TrialImage:
    data: bytes
    key: str  # the instance at the site: its SOP Instance UID, or its path in the folder
    study: str  # its study: the Study Instance UID, or for a file without one its path
    path: str | None = None  # the folder source: the path relative to the folder


@dataclass(frozen=True)
class StudyMiss:
    """A study, or part of one, that could not be retrieved: recorded, and the trial goes on."""

    study: str
    reason: str
    detail: str


TrialItem = TrialImage | StudyMiss


@dataclass(frozen=True)
class ArchiveStudy:
    study_uid: str
    accession: str | None


# A DICOM UID (dotted digits): the URLs requests names in its errors carry study UIDs.
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def _without_uids(exc: Exception) -> str:
    return _UID.sub("<uid>", str(exc))


def _http_failure(exc: Exception, what: str) -> ArchiveError:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return ArchiveAuthError(
                f"the site archive refused the credentials ({status}) for {what}; set "
                "CXR_SITE_ARCHIVE_AUTH to the Authorization header it expects"
            )
        return ArchiveError(f"the site archive answered {status} to {what}")
    if isinstance(exc, requests.exceptions.SSLError):
        return ArchiveUnreachableError(
            f"the site archive's certificate was not accepted for {what}: {_without_uids(exc)} "
            "(its CA goes in CXR_SITE_ARCHIVE_TLS_CA)"
        )
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return ArchiveUnreachableError(
            f"the site archive cannot be reached for {what}: {_without_uids(exc)}"
        )
    return ArchiveError(f"{what} failed: {_without_uids(exc)}")


class DicomWebArchive:
    """A site PACS's DICOMweb root, searched one study date at a time."""

    def __init__(
        self,
        url: str,
        *,
        authorization: str | None = None,
        ca_bundle: Path | None = None,
        timeout: float = 60.0,
    ) -> None:
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.verify = str(ca_bundle) if ca_bundle else True  # never off
        # No gzip: pixel data gains little from it, and compressing it costs the archive's CPU,
        # the one its radiologists are reading on. Orthanc took 0.49 s to send a 6.8 MB CR
        # gzipped, 0.025 s as it is (benchmarks/RESULTS.md).
        session.headers["Accept-Encoding"] = "identity"
        if authorization:
            session.headers["Authorization"] = authorization
        self.url = url.rstrip("/")
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout)
        # Retries of busy answers (429, 503, 504) stay with the client; a partition that still
        # fails is retried whole by whoever runs it.
        self.client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=200)

    def studies(self, day: date) -> list[ArchiveStudy]:
        """The studies of ``day`` with a CR or DX series, each once."""
        found: dict[str, ArchiveStudy] = {}
        for modality in TRIAL_MODALITIES:
            what = f"the {modality} studies of {day.isoformat()} (QIDO-RS)"
            answers = self._paged(
                self.client.search_for_studies,
                what,
                search_filters={
                    "StudyDate": day.strftime("%Y%m%d"),
                    "ModalitiesInStudy": modality,
                },
                fields=["AccessionNumber"],
            )
            for answer in answers:
                study = _study_of(answer, what)
                found.setdefault(study.study_uid, study)
        return list(found.values())

    def _paged(self, search: Any, what: str, **query: Any) -> list[dict[str, Any]]:
        """Every answer, a page at a time. The client's own ``get_remaining`` asks with an
        offset and no limit, which Orthanc answers with everything each time: it never ends."""
        answers: list[dict[str, Any]] = []
        previous: list[dict[str, Any]] | None = None
        while True:
            try:
                page = search(limit=QIDO_PAGE, offset=len(answers), **query)
            except Exception as exc:
                raise _http_failure(exc, what) from exc
            if page and page == previous:
                raise ArchiveResponseError(f"{what}: the archive ignores the offset of a search")
            answers += page
            if len(page) < QIDO_PAGE:
                return answers
            previous = page

    def images(self, study: ArchiveStudy) -> Iterator[TrialItem]:
        """The CR and DX instances of ``study``, streamed one at a time; a series that fails
        part way is a :class:`StudyMiss` after the instances that came."""
        what = "the series of a study (QIDO-RS)"
        try:
            series = self._paged(
                self.client.search_for_series,
                what,
                study_instance_uid=study.study_uid,
                fields=["Modality"],
            )
        except (ArchiveAuthError, ArchiveUnreachableError):
            raise
        except ArchiveError as failure:
            yield StudyMiss(study.study_uid, "retrieve_failed", str(failure))
            return
        for answer in series:
            found = pydicom.Dataset.from_json(answer)
            if str(found.get("Modality", "")) not in TRIAL_MODALITIES:
                continue
            series_uid = str(found.get("SeriesInstanceUID", ""))
            if not series_uid:
                raise ArchiveResponseError(f"{what}: an answer without SeriesInstanceUID")
            try:
                for position, dataset in enumerate(
                    self.client.iter_series(study.study_uid, series_uid, media_types=_AS_STORED)
                ):
                    # An instance without its own UID (invalid, but seen) still needs a key
                    # no other instance has, or a rerun would take it for another.
                    key = str(dataset.get("SOPInstanceUID", "") or "")
                    key = key or f"{study.study_uid}/{series_uid}/{position}"
                    yield TrialImage(_part10(dataset), key, study.study_uid)
            except Exception as exc:
                failure = _http_failure(exc, "the instances of a series (WADO-RS)")
                if isinstance(failure, ArchiveAuthError | ArchiveUnreachableError):
                    raise failure from exc
                yield StudyMiss(study.study_uid, "retrieve_failed", str(failure))

    def day(self, day: date) -> Iterator[TrialItem]:
        for study in self.studies(day):
            yield from self.images(study)


def _study_of(answer: dict[str, Any], what: str) -> ArchiveStudy:
    try:
        found = pydicom.Dataset.from_json(answer)
    except Exception as exc:
        raise ArchiveResponseError(f"{what}: an answer that is not DICOM JSON ({exc})") from exc
    uid = str(found.get("StudyInstanceUID", "") or "")
    if not uid:
        raise ArchiveResponseError(f"{what}: an answer without StudyInstanceUID")
    accession = str(found.get("AccessionNumber", "") or "") or None
    return ArchiveStudy(uid, accession)


def _part10(dataset: pydicom.Dataset) -> bytes:
    """The instance as the scoring core reads any DICOM: a Part 10 file."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def folder_images(root: Path) -> Iterator[TrialItem]:
    """Every image file under ``root`` (as ``cxr predict`` walks a folder). A DICOM file's
    study is its Study Instance UID; any other file is a study of its own."""
    from cxr_platform.data.imaging import read_dicom_header

    for path in expand_inputs([root]):
        relative = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as exc:
            yield StudyMiss(relative, "unreadable", f"cannot read the file: {exc.strerror or exc}")
            continue
        study = relative
        if data[128:132] == b"DICM":
            # An unreadable header: the scoring core reports it, in its own words.
            with contextlib.suppress(CxrError):
                study = str(read_dicom_header(data).get("StudyInstanceUID", "") or relative)
        yield TrialImage(data, relative, study, relative)

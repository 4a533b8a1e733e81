"""STOW-RS into the node (DICOM PS3.18 10.5): a DICOMweb server's "store instances" transaction
feeding the same screening, spool, ledger and worker as C-STORE.

``POST {root}studies`` (or ``{root}studies/{StudyInstanceUID}``) with a
``multipart/related; type="application/dicom"`` body, one Part 10 instance per part. The answer
is the standard STOW-RS response (DICOM JSON): each stored instance in ReferencedSOPSequence,
each refused one in FailedSOPSequence with its failure reason (the DIMSE status C-STORE would
have answered), and the HTTP status says how many made it: 200 all, 202 some, 409 none.

Before a body is read: a missing or unknown key is 401 (a client key names the client, which
the log records as the site, as a calling AE title does for C-STORE); a body over the limit is
413. A node past its spool budget or disk watermark answers 503 with ``Retry-After`` before it
parses anything, so a client retries later and nothing is half-accepted.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pydicom
from pydicom.dataset import Dataset
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cxr_platform.errors import CxrError
from cxr_platform.http_keys import KeyRing, presented_key, read_limited
from cxr_platform.pacs.statuses import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_STUDY_MISMATCH,
    STATUS_SUCCESS,
    STORED_STATUSES,
)

if TYPE_CHECKING:
    from cxr_platform.pacs.node import DicomNode

log = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
DICOM_JSON = "application/dicom+json"
RETRY_AFTER_SECONDS = 30


class StowRequestError(CxrError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _content_type_parameters(content_type: str) -> tuple[str, dict[str, str]]:
    media, *params = [piece.strip() for piece in content_type.split(";")]
    parameters = {}
    for param in params:
        name, _, value = param.partition("=")
        parameters[name.strip().lower()] = value.strip().strip('"')
    return media.lower(), parameters


def split_multipart_related(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a STOW-RS body. A hand-written split on the boundary: the standard
    library's email parser rewrites line endings inside binary parts, and the form-data
    parsers insist on Content-Disposition, which STOW-RS parts do not carry."""
    media, parameters = _content_type_parameters(content_type)
    if media != "multipart/related":
        raise StowRequestError(415, f"expected multipart/related, not {media or 'nothing'}")
    declared = parameters.get("type", DICOM_MEDIA_TYPE).lower()
    if declared != DICOM_MEDIA_TYPE:
        raise StowRequestError(
            415, f"only {DICOM_MEDIA_TYPE} parts are accepted (type={declared}); send Part 10"
        )
    boundary = parameters.get("boundary")
    if not boundary:
        raise StowRequestError(400, "multipart/related without a boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    pieces = (b"\r\n" + body).split(delimiter)
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise StowRequestError(400, "the body is not a complete multipart/related message")
    parts = []
    for number, piece in enumerate(pieces[1:-1], start=1):
        piece = piece.removeprefix(b"\r\n")
        headers, separator, payload = piece.partition(b"\r\n\r\n")
        if not separator:
            if piece.startswith(b"\r\n"):  # a part without headers: the blank line only
                headers, payload = b"", piece[2:]
            else:
                raise StowRequestError(400, f"part {number} has no header/body separator")
        part_type = DICOM_MEDIA_TYPE
        for line in headers.split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-type":
                part_type = _content_type_parameters(value)[0]
        if part_type != DICOM_MEDIA_TYPE:
            raise StowRequestError(415, f"part {number} is {part_type}, not {DICOM_MEDIA_TYPE}")
        parts.append(payload)
    if not parts:
        raise StowRequestError(400, "no instances in the request")
    return parts


def multipart_related(parts: list[bytes]) -> tuple[bytes, str]:
    """(body, Content-Type) of a STOW-RS request carrying ``parts`` (Part 10 instances): what
    :func:`split_multipart_related` reads, for the node's own sending."""
    boundary = f"cxr-{uuid.uuid4().hex}"
    body = io.BytesIO()
    for part in parts:
        body.write(f"--{boundary}\r\nContent-Type: {DICOM_MEDIA_TYPE}\r\n\r\n".encode())
        body.write(part)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f'multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary={boundary}'


@dataclass(frozen=True)
class InstanceOutcome:
    sop_class_uid: str
    sop_instance_uid: str
    status: int


def stow_response(outcomes: list[InstanceOutcome]) -> tuple[int, dict]:
    """(HTTP status, DICOM JSON body) for a STOW-RS transaction."""
    response = Dataset()
    referenced, failed = [], []
    for outcome in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = outcome.sop_class_uid or None
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid or None
        if outcome.status in STORED_STATUSES:
            if outcome.status != STATUS_SUCCESS:
                item.WarningReason = outcome.status
            referenced.append(item)
        else:
            item.FailureReason = outcome.status
            failed.append(item)
    if referenced:
        response.ReferencedSOPSequence = referenced
    if failed:
        response.FailedSOPSequence = failed
    status = 200 if not failed else 409 if not referenced else 202
    return status, response.to_json_dict()


def _dicom_json(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body), status_code=status, media_type=DICOM_JSON, headers=headers or {}
    )


def _problem(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": reason}, status_code=status, headers=headers or {})


def _outcome_of(part: bytes, node: DicomNode, client: str | None, study: str | None):
    try:
        dataset = pydicom.dcmread(io.BytesIO(part))
        sop_class = str(dataset.get("SOPClassUID", "") or "")
        sop_uid = str(dataset.get("SOPInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - anything unreadable is this instance's failure only
        return InstanceOutcome("", "", STATUS_CANNOT_UNDERSTAND)
    if study is not None and str(dataset.get("StudyInstanceUID", "")) != study:
        return InstanceOutcome(sop_class, sop_uid, STATUS_STUDY_MISMATCH)
    status = node.accept_instance(dataset, lambda: part, sender=client, via="STOW-RS")
    return InstanceOutcome(sop_class, sop_uid, status)


def stow_app(
    node: DicomNode, keys: KeyRing, *, max_body_bytes: int, root: str = "/dicom-web/"
) -> Starlette:
    root = "/" + root.strip("/") + "/" if root.strip("/") else "/"

    async def store(request: Request) -> Response:
        headers = {k.lower(): v.encode("latin-1") for k, v in request.headers.items()}
        client: str | None = None
        if keys.required:
            known, client = keys.match(presented_key(headers))
            if not known:
                return _problem(
                    401,
                    "missing or unknown key (X-API-Key or Authorization: Bearer)",
                    {"WWW-Authenticate": 'Bearer realm="cxr dicom-web"'},
                )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return _problem(413, f"the body is larger than {max_body_bytes} bytes")
        body, too_large = await read_limited(request.receive, max_body_bytes)
        if too_large:
            return _problem(413, f"the body is larger than {max_body_bytes} bytes")
        shortfall = node.storage.spool_shortfall(len(body))
        if shortfall is not None:
            node.counters.add("out_of_space")
            log.warning("STOW-RS from %s refused (out of resources): %s", client, shortfall)
            return _problem(
                503,
                "the node is out of disk space for new instances; retry later",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        try:
            parts = split_multipart_related(request.headers.get("content-type", ""), body)
        except StowRequestError as exc:
            return _problem(exc.status, exc.reason)
        study = request.path_params.get("study")
        outcomes = [
            await anyio.to_thread.run_sync(_outcome_of, part, node, client, study) for part in parts
        ]
        status, response = stow_response(outcomes)
        return _dicom_json(status, response)

    return Starlette(
        routes=[
            Route(f"{root}studies", store, methods=["POST"]),
            Route(f"{root}studies/{{study}}", store, methods=["POST"]),
        ]
    )


class StowServer:
    """Uvicorn serving :func:`stow_app` on a thread of the node's process."""

    def __init__(
        self,
        app: Starlette,
        host: str,
        port: int,
        *,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,  # the node's logging, not uvicorn's own setup
            access_log=False,
            lifespan="off",
            ssl_certfile=str(tls[0]) if tls else None,
            ssl_keyfile=str(tls[1]) if tls else None,
        )
        self.server = uvicorn.Server(config)
        self.tls = tls is not None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self.server.run, name="cxr-stow", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise CxrError("the STOW-RS endpoint did not start (is the port free?)")
            time.sleep(0.02)

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

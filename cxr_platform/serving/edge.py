"""ASGI middleware at the service's edge: the API key, the site a request comes from, the
upload size limit, and that the upload is a file (BentoML would otherwise download a URL sent in
its place).

All are checked before BentoML parses a body, so a refused request costs no decoding and an
oversized one is never buffered to disk. An upload sent as the image itself (``Content-Type:
application/octet-stream``, ``application/dicom``, ``image/png``, ``image/jpeg``) skips BentoML's
form parsing and temporary file: the edge hands the body it already holds to ``raw_body_app``.

The site: a site's own key (``CXR_SERVICE_SITE_KEYS``) names it, and a request with that key
cannot claim another; a request with the service key (a gateway in front of several sites), or
to a service without keys, names its site in ``X-CXR-Site``. Either way the service reads the
resolved name from that header, which the edge rewrites.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from cxr_platform.data.patient_age import InvalidAgeError, age_from_caller
from cxr_platform.http_keys import KeyRing, parse_client_keys, presented_key, read_limited
from cxr_platform.inference.log import InvalidSiteError, site_name

UPLOAD_FIELD = "file"
SITE_HEADER = "x-cxr-site"
# The patient's age, when the caller knows it: a form field beside the file, or this header (for
# gateways). The edge checks it and hands it on as the header; the field never reaches BentoML,
# which would read a text field as JSON.
PATIENT_AGE_FIELD = "patient_age"
PATIENT_AGE_HEADER = "x-cxr-patient-age"
# Bodies that are one image, as sent: decoded by content, like a multipart upload's file.
RAW_BODY_TYPES = frozenset(
    {b"application/octet-stream", b"application/dicom", b"image/png", b"image/jpeg"}
)
_BOUNDARY = re.compile(rb'(?i)boundary="?([^";\s]+)"?')
_DISPOSITION = re.compile(rb"(?im)^content-disposition:[^\r\n]*")
_NAME = re.compile(rb'(?i);\s*name="([^"]*)"')

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]


class EdgeMiddleware:
    def __init__(
        self,
        app: Any,
        *,
        api_key: str | None,
        max_upload_bytes: int,
        site_keys: dict[str, str] | None = None,
        protected_paths: frozenset[str],
        upload_paths: frozenset[str],
        on_reject: Callable[[str, str], None] | None = None,
        raw_body_app: Any = None,
        raw_body_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.keys = KeyRing(api_key, site_keys)
        self.max_upload_bytes = max_upload_bytes
        self.protected_paths = protected_paths
        self.upload_paths = upload_paths
        self.on_reject = on_reject
        self.raw_body_app = raw_body_app
        self.raw_body_paths = raw_body_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in self.protected_paths:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        key_site: str | None = None
        if self.keys.required:
            authorized, key_site = self._authorized(headers)
            if not authorized:
                await self._reject(send, path, 401, "unauthorized", "missing or wrong X-API-Key")
                return
        try:
            claimed = site_name(headers[SITE_HEADER].decode()) if SITE_HEADER in headers else None
        except (UnicodeDecodeError, InvalidSiteError) as exc:
            await self._reject(send, path, 400, "bad_site", f"X-CXR-Site: {exc}")
            return
        if key_site is not None and claimed is not None and claimed != key_site:
            await self._reject(
                send, path, 403, "site_mismatch", "this API key belongs to another site"
            )
            return
        scope = _with_site(scope, key_site or claimed)
        app = self.app
        if path in self.upload_paths and scope.get("method") == "POST":
            declared = headers.get("content-length")
            if declared is not None:
                try:
                    length = int(declared)
                except ValueError:
                    await self._reject(send, path, 400, "bad_request", "invalid Content-Length")
                    return
                if length > self.max_upload_bytes:
                    await self._reject(send, path, 413, "upload_too_large", self._too_large(length))
                    return
            # Read up to the limit (chunked bodies declare no length), then hand the buffered
            # body on.
            body, too_large = await read_limited(receive, self.max_upload_bytes)
            if too_large:
                await self._reject(send, path, 413, "upload_too_large", self._too_large(None))
                return
            content_type = headers.get("content-type", b"")
            if (
                self.raw_body_app is not None
                and path in self.raw_body_paths
                and media_type(content_type) in RAW_BODY_TYPES
            ):
                app = self.raw_body_app
            else:
                fields = multipart_fields(body, content_type)
                if fields is not None and any(name == PATIENT_AGE_FIELD for name, _ in fields):
                    body, stated = take_form_field(body, content_type, PATIENT_AGE_FIELD)
                    fields = [field for field in fields if field[0] != PATIENT_AGE_FIELD]
                    scope = _with_header(scope, PATIENT_AGE_HEADER, stated or "")
                    scope = _with_header(scope, "content-length", str(len(body)))
                refusal = upload_refusal(fields)
                if refusal is not None:
                    await self._reject(send, path, 400, *refusal)
                    return
            receive = _replay(body, receive)
        age = next(
            (v for k, v in scope.get("headers", []) if k.lower() == PATIENT_AGE_HEADER.encode()),
            None,
        )
        if age is not None:
            try:
                age_from_caller(age.decode("latin-1"))
            except InvalidAgeError as exc:
                await self._reject(send, path, 400, "bad_patient_age", str(exc))
                return
        await app(scope, receive, send)

    def _authorized(self, headers: dict[str, bytes]) -> tuple[bool, str | None]:
        """(whether the key is known, the site it belongs to: None for the service key)."""
        return self.keys.match(presented_key(headers))

    def _too_large(self, length: int | None) -> str:
        size = f"{length} bytes" if length is not None else "larger than the limit"
        return f"upload is {size}; this service accepts at most {self.max_upload_bytes} bytes"

    async def _reject(self, send: Send, path: str, status: int, reason: str, detail: str) -> None:
        if self.on_reject is not None:
            self.on_reject(path, reason)
        body = json.dumps({"error": reason, "detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def media_type(content_type: bytes) -> bytes:
    """``image/png; charset=x`` -> ``image/png``, lower case."""
    return content_type.split(b";", 1)[0].strip().lower()


def parse_site_keys(text: str | None) -> dict[str, str]:
    """``site=key,site2=key2`` -> {key: site}."""
    return parse_client_keys(text, "CXR_SERVICE_SITE_KEYS", "site")


def _with_header(scope: Scope, name: str, value: str | None) -> Scope:
    """``scope`` with header ``name`` replaced by ``value`` (removed when None)."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != name.encode()]
    if value is not None:
        headers.append((name.encode(), value.encode()))
    return {**scope, "headers": headers}


def _with_site(scope: Scope, site: str | None) -> Scope:
    return _with_header(scope, SITE_HEADER, site)


def take_form_field(body: bytes, content_type: bytes, name: str) -> tuple[bytes, str | None]:
    """A multipart/form-data body without its text field ``name``, and that field's value."""
    boundary = _BOUNDARY.search(content_type)
    if boundary is None:
        return body, None
    delimiter = b"--" + boundary.group(1)
    pieces = body.split(delimiter)
    kept, value = [pieces[0]], None
    for piece in pieces[1:]:
        head, _, content = piece.partition(b"\r\n\r\n")
        disposition = _DISPOSITION.search(head)
        named = _NAME.search(disposition.group(0)) if disposition else None
        is_file = disposition is not None and b"filename" in disposition.group(0).lower()
        if named and named.group(1).decode("latin-1") == name and not is_file:
            value = content.removesuffix(b"\r\n").decode("utf-8", "replace")
            continue
        kept.append(piece)
    return delimiter.join(kept), value


def multipart_fields(body: bytes, content_type: bytes) -> list[tuple[str, bool]] | None:
    """(name, is a file) of each part of a multipart/form-data body; None for other bodies."""
    if not content_type.lower().startswith(b"multipart/form-data"):
        return None
    fields = []
    for match in _DISPOSITION.finditer(body):
        line = match.group(0)
        name = _NAME.search(line)
        if name:
            fields.append((name.group(1).decode("latin-1"), b"filename" in line.lower()))
    return fields


def upload_refusal(fields: list[tuple[str, bool]] | None) -> tuple[str, str] | None:
    """(reason, detail) when an upload's form cannot be what the endpoint reads."""
    if fields is None:
        return None
    if any(name == UPLOAD_FIELD and not is_file for name, is_file in fields):
        # BentoML downloads a URL given as a text field where a file is expected; the service
        # must never fetch what a client names.
        return (
            "file_not_uploaded",
            f"'{UPLOAD_FIELD}' must be an uploaded file; URLs are not fetched",
        )
    # BentoML reads any other field as JSON and answers an image under another name with a 500.
    unexpected = sorted({name for name, _ in fields} - {UPLOAD_FIELD})
    if unexpected:
        return (
            "unexpected_field",
            f"unexpected form field(s) {', '.join(unexpected)}: send the image as the file "
            f"field '{UPLOAD_FIELD}'",
        )
    if not fields:
        return "file_missing", f"no image: send it as the file field '{UPLOAD_FIELD}'"
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

"""HTTP pieces both edges share (the model service and the DICOM node's STOW-RS endpoint): the
key a request presents, matching it against the keys a deployment gave out, and reading a body
no larger than a limit. Neither edge owns this module, so neither imports the other.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from cxr_platform.inference.log import InvalidSiteError, site_name

Receive = Callable[[], Any]


def presented_key(headers: dict[str, bytes]) -> bytes | None:
    """``X-API-Key``, else an ``Authorization: Bearer`` token (lower-case header names)."""
    given = headers.get("x-api-key")
    if given is None:
        authorization = headers.get("authorization", b"")
        if authorization.lower().startswith(b"bearer "):
            given = authorization[7:].strip()
    return given


class KeyRing:
    """A shared key (no client name) and per-client keys (each naming its client)."""

    def __init__(self, shared_key: str | None, client_keys: dict[str, str] | None = None):
        self.shared_key = shared_key.encode() if shared_key else None
        self.client_keys = [(key.encode(), name) for key, name in (client_keys or {}).items()]

    @property
    def required(self) -> bool:
        return self.shared_key is not None or bool(self.client_keys)

    def match(self, given: bytes | None) -> tuple[bool, str | None]:
        """(whether the key is known, the client it belongs to: None for the shared key)."""
        if given is None:
            return False, None
        # Every key is compared, matched or not, so the time taken says nothing about which.
        matched: tuple[bool, str | None] = (False, None)
        if self.shared_key is not None and hmac.compare_digest(given, self.shared_key):
            matched = (True, None)
        for key, name in self.client_keys:
            if hmac.compare_digest(given, key):
                matched = (True, name)
        return matched


def parse_client_keys(text: str | None, setting: str, noun: str = "client") -> dict[str, str]:
    """``name=key,name2=key2`` -> {key: name}; a malformed entry is an error naming its client
    (never its key). Names follow the inference log's site rules: they are logged as sites."""
    keys: dict[str, str] = {}
    for position, entry in enumerate((text or "").split(","), start=1):
        if not entry.strip():
            continue
        name, separator, key = entry.partition("=")
        try:
            client = site_name(name)
        except InvalidSiteError as exc:
            raise ValueError(f"{setting} entry {position}: {exc}") from None
        if not separator or client is None or not key.strip():
            # Without '=' the entry may be a bare key: it is not echoed.
            raise ValueError(f"{setting} entry {position} must be {noun}=key")
        if key.strip() in keys:
            raise ValueError(f"{setting}: {noun} {client!r} reuses another {noun}'s key")
        keys[key.strip()] = client
    return keys


async def read_limited(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The request body, or (b"", True) as soon as it passes ``limit`` bytes (chunked bodies
    declare no length, so the limit is applied while reading)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), False

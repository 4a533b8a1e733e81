"""Operational logs and records free of patient data.

Identifiers are kept only as a keyed hash (:func:`hash_uid`, with the deployment's salt from
:func:`uid_salt`): the inference log stores it, and log lines name instances by its first
characters.

Our own log lines name instances by a keyed hash (:func:`uid_tag`), never by UID or header
value. Libraries are less careful: pydicom's validation warnings and highdicom's person-name
warnings quote the offending value (``Invalid value for VR AS: '62'``, ``The string "<name>" is
unlikely to represent the intended person name``). :func:`withhold_logged_values` routes Python
warnings into logging and puts a filter on every root handler that replaces quoted text in
records from other libraries with a placeholder, so the message keeps its meaning (which check
failed, on which VR) without the value.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

WITHHELD = "<value withheld>"
# A quoted span: '...' or "..." (non-greedy, on one line). Library messages quote values this way.
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
UID_TAG_LENGTH = 16


MIN_SALT_CHARACTERS = 32


def uid_salt(home: Path, configured: str | None = None) -> bytes:
    """The deployment's secret salt: configured (``CXR_UID_SALT``, the same on every replica),
    or created once under the home (mode 0600), which suits one host with one home."""
    if configured:
        if len(configured.strip()) < MIN_SALT_CHARACTERS:
            raise ValueError(
                f"CXR_UID_SALT must be at least {MIN_SALT_CHARACTERS} characters (a short key "
                "makes the hashed UIDs guessable); make one with: openssl rand -hex 32"
            )
        return configured.strip().encode()
    path = home / "uid_salt"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"uid_salt.{os.getpid()}.tmp")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # atomic and never overwrites a salt another process made
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


def hash_uid(uid: str | None, salt: bytes) -> str | None:
    if not uid:
        return None
    return hmac.new(salt, str(uid).strip().encode(), hashlib.sha256).hexdigest()


def withhold_values(text: str) -> str:
    return _QUOTED.sub(WITHHELD, text)


def uid_tag(uid: object, salt: bytes) -> str:
    """How log lines name a DICOM instance or study: the first characters of the same keyed
    hash the inference log stores, so an operator can find its row without the UID itself."""
    hashed = hash_uid(None if uid is None else str(uid), salt)
    return f"uid:{hashed[:UID_TAG_LENGTH]}" if hashed else "uid:none"


class WithholdHeaderValues(logging.Filter):
    """Rewrites records from loggers outside ``cxr_platform`` (including ``py.warnings``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("cxr_platform"):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed library record: keep it, without arguments
            message = str(record.msg)
        record.msg, record.args = withhold_values(message), ()
        return True


def withhold_logged_values(root: logging.Logger | None = None) -> None:
    """Install the filter on the root logger's handlers and send warnings through logging.
    Idempotent; call once the process's logging is configured."""
    logging.captureWarnings(True)
    root = root or logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, WithholdHeaderValues) for f in handler.filters):
            handler.addFilter(WithholdHeaderValues())

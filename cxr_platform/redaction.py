"""Operational logs and records free of patient data.

Identifiers are kept only as a keyed hash (:func:`hash_uid`, with the deployment's salt from
:func:`uid_salt`): the inference log stores it, and log lines name instances by its first
characters (:func:`uid_tag`).

What we do not write ourselves still reaches logs: pydicom's validation warnings and
highdicom's person-name warnings quote the offending value (``Invalid value for VR AS: '62'``),
an exception's text quotes what it failed on, and a traceback repeats it.
:func:`withhold_logged_values` installs, once per process, a log record factory that every
record of every logger passes through as it is made, whatever handlers the process configured
(the CLI's, BentoML's, Dagster's):

- text in quotes, in an imaging library's message (pydicom, highdicom, pynetdicom, Pillow,
  warnings: any logger but ours and those about runs and requests, Dagster, BentoML, uvicorn,
  MLflow) or in any exception's text (our messages' own arguments included), becomes a
  placeholder, so the line keeps its meaning (which check failed, on which VR) without the
  value;
- anything shaped like a DICOM UID, except the standard's own (``1.2.840.10008.*``: SOP classes,
  transfer syntaxes), is withheld;
- the traceback is rendered then, redacted, and the raw exception dropped from the record, so
  no handler can render it again.

Every process that handles images installs it: the ``cxr`` command (node, sender, batch
scoring, silent trial), the HTTP service's module and the Dagster code location.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import traceback
from collections.abc import Mapping
from pathlib import Path

WITHHELD = "<value withheld>"
UID_WITHHELD = "<uid withheld>"
# A quoted span: '...' or "..." (non-greedy, on one line). Library messages quote values this way.
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
# A UID: a root of 0, 1 or 2 and at least four more numeric components, standing alone (IP
# addresses and version numbers have fewer, or do not start that way).
_UID = re.compile(r"(?<![\w.])[0-2](?:\.\d+){4,}(?!\w)(?!\.\d)")
STANDARD_UID_ROOT = "1.2.840.10008."
_FRAME = re.compile(r'^\s*File "[^"\n]*", line \d+, in \S+$')
REDACTING = "_cxr_redacting"
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


def withhold_uids(text: str) -> str:
    return _UID.sub(lambda m: m[0] if m[0].startswith(STANDARD_UID_ROOT) else UID_WITHHELD, text)


def redact(text: str) -> str:
    """Quoted values and UIDs withheld: what any exception or library text becomes in a log."""
    return withhold_uids(withhold_values(text))


def uid_tag(uid: object, salt: bytes) -> str:
    """How log lines name a DICOM instance or study: the first characters of the same keyed
    hash the inference log stores, so an operator can find its row without the UID itself."""
    hashed = hash_uid(None if uid is None else str(uid), salt)
    return f"uid:{hashed[:UID_TAG_LENGTH]}" if hashed else "uid:none"


# Libraries whose messages are about runs and requests, not images: their quotes (an asset's
# name, a request line) stay; UIDs in them and their exceptions' text are still withheld.
_ABOUT_RUNS_AND_REQUESTS = (
    "dagster", "bentoml", "uvicorn", "mlflow", "alembic", "httpx", "httpcore", "urllib3",
)  # fmt: skip


def _redacted_argument(argument: object) -> object:
    if isinstance(argument, BaseException):
        return redact(str(argument))  # an exception's text quotes what it failed on
    if isinstance(argument, str):
        return withhold_uids(argument)
    return argument


def _redact_record(record: logging.LogRecord) -> None:
    if record.name is None:
        # logging.makeLogRecord's blank, filled in afterwards from a record made (and so
        # redacted) earlier, in this process or another.
        return
    if record.name.startswith(("cxr_platform", *_ABOUT_RUNS_AND_REQUESTS)):
        # Redacted argument by argument: a formatter may read them (uvicorn's access log
        # unpacks its five), so they keep their places.
        if isinstance(record.msg, str):
            record.msg = withhold_uids(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted_argument(a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: _redacted_argument(v) for k, v in record.args.items()}
    else:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: keep it, without arguments
            message = str(record.msg)
        record.msg, record.args = redact(message), ()
    if record.exc_info and record.exc_info[0] is not None:
        rendered = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        # A frame's file and line are ours to read; everything else is redacted.
        record.exc_text = "\n".join(
            line if _FRAME.match(line) else redact(line) for line in rendered.split("\n")
        )
        record.exc_info = None
    if record.stack_info:
        record.stack_info = withhold_uids(record.stack_info)


def withhold_logged_values() -> None:
    """Every log record this process makes is redacted as it is made (see the module's text),
    and Python warnings go through logging too. Idempotent."""
    logging.captureWarnings(True)
    making = logging.getLogRecordFactory()
    if getattr(making, REDACTING, False):
        return

    def redacted_record(*args, **kwargs) -> logging.LogRecord:
        record = making(*args, **kwargs)
        _redact_record(record)
        return record

    setattr(redacted_record, REDACTING, True)
    logging.setLogRecordFactory(redacted_record)


def redacting() -> bool:
    return bool(getattr(logging.getLogRecordFactory(), REDACTING, False))

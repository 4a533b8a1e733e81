"""The log record factory every image-handling process installs: what it withholds, and what it
leaves for an operator to read."""

from __future__ import annotations

import io
import logging

import pytest

from cxr_platform.redaction import UID_WITHHELD, WITHHELD, redacting, withhold_logged_values

SOURCE_UID = "1.2.826.0.1.3680043.8.498.77123"
CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture()
def logged():
    withhold_logged_values()
    withhold_logged_values()  # idempotent: one factory, not two wrapped
    assert redacting()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_library_values_uids_and_tracebacks_are_withheld_but_frames_and_standard_uids_stay(
    logged,
):
    logging.getLogger("pydicom").warning("Invalid value for VR PN: 'ZQX^DOE' in %s", SOURCE_UID)
    logging.getLogger("cxr_platform.pacs.node").info("storage class %s", CR_CLASS)
    try:
        raise ValueError(f"cannot store 'ZQX^DOE' of study {SOURCE_UID}")
    except ValueError as exc:
        logging.getLogger("cxr_platform.pacs.sender").exception("send failed: %s", exc)
    text = logged.getvalue()
    assert "ZQX" not in text and SOURCE_UID not in text
    assert f"Invalid value for VR PN: {WITHHELD} in {UID_WITHHELD}" in text
    assert CR_CLASS in text  # the standard's own UIDs say what kind of object, not whose
    assert "Traceback (most recent call last)" in text
    assert 'File "' in text and __name__.rsplit(".", 1)[-1] in text  # frames stay readable
    assert f"ValueError: cannot store {WITHHELD} of study {UID_WITHHELD}" in text


def test_run_and_request_logs_keep_their_quotes_and_their_arguments(logged):
    """Dagster's and uvicorn's lines keep their quotes; uvicorn's access formatter, which
    unpacks its five arguments, still can."""
    import uvicorn.logging

    logging.getLogger("dagster").info('Execution of step "train" failed.')
    access = logging.getLogger("uvicorn.access.redaction-test")  # not uvicorn's own handlers
    own = io.StringIO()
    handler = logging.StreamHandler(own)
    handler.setFormatter(uvicorn.logging.AccessFormatter("%(request_line)s %(status_code)s"))
    access.addHandler(handler)
    access.propagate = False
    try:
        request = ("127.0.0.1:5", "POST", f"/dicom-web/studies/{SOURCE_UID}", "1.1", 200)
        access.info('%s - "%s %s HTTP/%s" %d', *request)
    finally:
        access.removeHandler(handler)
    assert 'step "train" failed' in logged.getvalue()
    assert own.getvalue().startswith(f"POST /dicom-web/studies/{UID_WITHHELD} HTTP/1.1 200")

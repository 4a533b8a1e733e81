"""`cxr dicom-node` as a PACS administrator runs it: a real process, stopped by a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from cxr_platform.ports import free_port

from .conftest import VARIANTS, cxr_process, radiograph
from .scu import send


def _node_process(home, *args) -> subprocess.Popen:
    return cxr_process(home, "dicom-node", *args)


def test_the_node_command_receives_and_stops_cleanly(pacs_model, chest_pngs, tmp_path):
    port = free_port()
    process = _node_process(
        pacs_model.settings.home,
        "--port", str(port), "--host", "127.0.0.1", "--ae-title", "CXR_CLI",
        "--allow", "MODALITY", "--results", "sr",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while send(port, [], called="CXR_CLI").statuses != [0x0000]:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the node never answered C-ECHO"
            time.sleep(0.5)
        source = radiograph(chest_pngs[7], VARIANTS["cr-mono2-12bit"])
        assert send(port, [source], called="CXR_CLI").statuses == [0x0000]
        results = pacs_model.settings.dicom.dicom_dir / "outbox" / source.StudyInstanceUID
        while not list(results.glob("*.dcm")):  # --results sr: one object, no destination
            assert time.monotonic() < deadline, "no result in the outbox"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "DICOM node CXR_CLI on port" in output
    assert "received=1" in output and "processed=1" in output
    assert len(list(results.glob("*.dcm"))) == 1

    status = subprocess.run(
        [sys.executable, "-m", "cxr_platform.cli", "dicom-status", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "CXR_HOME": str(pacs_model.settings.home)},
        check=True,
    )
    counts = json.loads(status.stdout)
    assert counts["processed"] == 1 and counts["outbox"] == 1 and counts["spooled"] == 0
    assert counts["outbox_bytes"] > 0 and counts["spool_bytes"] == 0


def test_a_bad_destination_exits_with_the_expected_form(pacs_model):
    process = _node_process(pacs_model.settings.home, "--destination", "PACS-at-host")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "AET@HOST:PORT" in output

"""Real pixel data with degraded headers, through the real node (`cxr dicom-node`, a process).

Hypothesis deletes, empties or corrupts the header fields the node reads or copies, picks the
transfer syntax (big-endian included) and adds private tags. Properties: no internal error,
every result passes dciodvfy with 0 errors and reads back, the ledger accounts for every
instance, and no patient or study value, nor a source UID, reaches the node's log output or the
inference log: every patient and study field carries a marker the test looks for.

CI runs the ``ci`` profile (40 examples); ``CXR_FUZZ_PROFILE=deep`` runs 400.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from cxr_platform.ports import free_port
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset

from ..conftest import shared_kaggle_dir
from .conftest import dciodvfy_errors

settings.register_profile(
    "ci", max_examples=40, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
settings.register_profile("deep", parent=settings.get_profile("ci"), max_examples=400)
PROFILE = settings.get_profile(os.environ.get("CXR_FUZZ_PROFILE", "ci"))

MARK = "ZQX"  # in every patient and study value; must never reach a log
NODE_AET = "CXR_FUZZ"
SYNTAXES = {
    "explicit-le": ExplicitVRLittleEndian,
    "implicit-le": ImplicitVRLittleEndian,
    "explicit-be": ExplicitVRBigEndian,
}
# Per field, the ways real headers get it wrong (each also deleted or emptied by the strategy).
# "{m}" becomes this instance's marker. Bytes values go in raw, where pydicom would refuse them.
CORRUPTIONS: dict[str, list[str | bytes]] = {
    "PatientName": [
        "{m}NAME,{m}GIVEN",
        "{m}" + "N" * 70,
        "{m}^A^B^C^D^E^F",
        "{m}\x01CTRL",
        "{m}Zoë^Ünïcode",
    ],
    "PatientID": ["{m}" + "9" * 70, "{m}\x02", "{m}ID\\SECOND"],
    "PatientBirthDate": ["1970-01-01", "19701345", "unknown"],
    "PatientSex": ["m", "MALE", "X"],
    "PatientAge": ["62", "62Y", "062", "sixty"],
    "PatientSize": [b"tall", b"-1.8"],
    "PatientWeight": [b"70 kg", b"NaN"],
    "StudyInstanceUID": ["1.2.abc", "01.2.3", "1." + "2" * 70],
    "SeriesInstanceUID": ["1.2.abc", ""],
    "StudyDate": ["2021-03-04", "20211345", "yesterday"],
    "StudyTime": ["12:30:00", "256161", "noon"],
    "AccessionNumber": ["{m}" + "7" * 30, "{m}\\X", "{m}\x1b"],
    "ReferringPhysicianName": ["{m}DOC,{m}TOR", "{m}" + "R" * 70],
    "StudyID": ["{m}" + "S" * 20, "{m}\x07"],
    "StudyDescription": ["{m}" + "D" * 80, "{m}DESC\\TWO", "{m}Ünïcödé"],
    "PatientComments": ["{m}COMMENT\\WITH\\SLASHES", "{m}" + "C" * 11000],
    "OtherPatientIDs": ["{m}OTHER\\{m}AGAIN", "{m}" + "O" * 70],
    "PixelSpacing": [b"0\\0", b"abc\\0.1", b"-0.1\\-0.1", b"0.1"],
    "ImagerPixelSpacing": [b"0\\0", b"x\\y"],
    "PatientOrientation": ["L", "left\\foot", "Q\\Z"],
    "Laterality": ["X", "left"],
    "ImageLaterality": ["X", "l"],
    "BodyPartExamined": ["chest", "CHEST " * 4, "\x01"],
    "ViewPosition": ["pa", "FRONTAL VIEW OF CHEST"],
    "SpecificCharacterSet": ["ISO-8859-1", "ISO_IR 999", "GB18030"],
    "ProcedureCodeSequence": [b"[]", b"[{}]", b"[{'CodeValue': 'X'}]"],
}
ACTIONS = ("delete", "empty", "corrupt")


@dataclass(frozen=True)
class Damage:
    fields: dict[str, tuple[str, int]]  # keyword -> (action, corruption index)
    syntax: str
    private_tags: bool
    pixels: str  # "real" (Kaggle) or "synthetic"


@st.composite
def header_damage(draw) -> Damage:
    keywords = draw(st.lists(st.sampled_from(sorted(CORRUPTIONS)), unique=True, max_size=10))
    fields = {}
    for keyword in keywords:
        action = draw(st.sampled_from(ACTIONS))
        index = draw(st.integers(0, len(CORRUPTIONS[keyword]) - 1))
        fields[keyword] = (action, index)
    return Damage(
        fields,
        draw(st.sampled_from(sorted(SYNTAXES))),
        draw(st.booleans()),
        draw(st.sampled_from(["real", "synthetic"])),
    )


def pixels_of(path: Path) -> np.ndarray:
    gray = Image.open(path).convert("L")
    return np.asarray(gray.resize((560, 640), Image.Resampling.BILINEAR))


def real_radiograph(fallback: Path) -> Path:
    """A real radiograph from the shared Kaggle split when present, else ``fallback`` (the data
    is not in every checkout). The test model, trained on synthetic images, has its input gate
    refuse real ones: they exercise the not-analysed SR, synthetic ones the full results."""
    root = shared_kaggle_dir() / "train"
    found = sorted(root.glob("*/*.jp*g"))[:1] if root.is_dir() else []
    return found[0] if found else fallback


def marked_source(pixels: np.ndarray, n: int) -> Dataset:
    m = f"{MARK}{n:04d}"
    spec = RadiographSpec(
        patient_id=f"{m}PID",
        patient_name=f"{m}FAMILY^{m}GIVEN",
        accession_number=f"{m}ACC",
    )
    ds = radiograph_dataset(pixels, spec)
    ds.ReferringPhysicianName = f"{m}REF^DOC"
    ds.StudyID = f"{m}S"
    ds.StudyDescription = f"{m} XR CHEST"
    ds.PatientComments = f"{m} comment"
    ds.OtherPatientIDs = [f"{m}OTHER"]
    ds.PatientAge = "004Y"  # a child, as the demo models are for
    ds.PatientSize, ds.PatientWeight = "1.75", "70"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "RPID16", "RADLEX", "XR CHEST"
    ds.ProcedureCodeSequence = [code]
    ds.PixelSpacing = [0.15, 0.15]
    return ds


def damaged(ds: Dataset, damage: Damage, n: int) -> tuple[Dataset, dict[bytes, bytes]]:
    """Apply ``damage``; values pydicom will not hold are written as placeholders and swapped
    for the raw bytes after encoding (returned as placeholder -> raw)."""
    m = f"{MARK}{n:04d}"
    raw: dict[bytes, bytes] = {}
    for keyword, (action, index) in damage.fields.items():
        tag = tag_for_keyword(keyword)
        vr = dictionary_VR(keyword)
        if action == "delete":
            if tag in ds:
                del ds[tag]
            continue
        if action == "empty":
            ds.add_new(tag, vr, [] if vr == "SQ" else "")
            continue
        value = CORRUPTIONS[keyword][index]
        if vr == "SQ":
            items = []
            for spec in eval(value.decode()):  # noqa: S307 - a literal from this file
                item = Dataset()
                for key, item_value in spec.items():
                    setattr(item, key, item_value)
                items.append(item)
            ds.add_new(tag, vr, items)
        elif isinstance(value, bytes):
            # An even-length number with a minus sign: valid for DS, and no UID contains "-".
            padded = value + b" " * (len(value) % 2)
            placeholder = ("-" + str(len(raw) + 1) + "0" * len(padded))[: len(padded)]
            ds.add_new(tag, vr, placeholder)
            raw[placeholder.encode()] = padded
        else:
            ds.add_new(tag, vr, value.replace("{m}", m))
    if damage.private_tags:
        block = ds.private_block(0x0029, "ZQX VENDOR", create=True)
        block.add_new(0x10, "LO", f"{m} private patient note")
        block.add_new(0x11, "OB", b"\x00\x01" * 64)
    return ds, raw


class NodeProcess:
    """`cxr dicom-node` over a home with a production model; its output is kept line by line."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.home = home
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cxr_platform.cli", "dicom-node", "--port", str(self.port),
             "--host", "127.0.0.1", "--ae-title", NODE_AET, "--allow", "MODALITY"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "CXR_HOME": str(home)},
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "".join(self.lines)
            if any("DICOM node" in line and "on port" in line for line in self.lines):
                return
            time.sleep(0.2)
        raise AssertionError("the node did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        self._reader.join(timeout=10)

    def ledger(self, sop_uid: str) -> tuple[str, str, str] | None:
        with sqlite3.connect(self.home / "dicom" / "ledger.sqlite") as db:
            return db.execute(
                "SELECT status, detail, results FROM instances WHERE sop_instance_uid = ?",
                (sop_uid,),
            ).fetchone()


def store(port: int, ds: Dataset, syntax: str, raw: dict[bytes, bytes]) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage, [SYNTAXES[syntax]])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ds.file_meta.TransferSyntaxUID = SYNTAXES[syntax]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test writes invalid values on purpose
        ds.save_as(
            buffer, implicit_vr=syntax == "implicit-le", little_endian=syntax != "explicit-be"
        )
    encoded = buffer.getvalue()
    for placeholder, value in raw.items():
        assert encoded.count(placeholder) == 1, "placeholders must be unique in the encoding"
        encoded = encoded.replace(placeholder, value)
    wire = pydicom.dcmread(io.BytesIO(encoded), force=True)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(wire)
    finally:
        assoc.release()
    return int(status.Status) if status else -1


@pytest.fixture(scope="module")
def fuzz_node(pacs_model):
    node = NodeProcess(pacs_model.settings.home)
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def test_degraded_headers_give_valid_results_and_no_patient_data_in_logs(
    fuzz_node, pacs_model, chest_pngs
):
    pixels = {
        "real": pixels_of(real_radiograph(chest_pngs[3])),
        "synthetic": pixels_of(chest_pngs[3]),
    }
    counter = itertools.count()
    sent: list[Dataset] = []
    outcomes: dict[str, int] = {}
    checked: list[str] = []  # result files dciodvfy passed
    outbox = pacs_model.settings.dicom.dicom_dir / "outbox"

    @settings(PROFILE)
    @given(damage=header_damage())
    def one(damage: Damage) -> None:
        n = next(counter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source, raw = damaged(marked_source(pixels[damage.pixels], n), damage, n)
        sent.append(source)
        assert store(fuzz_node.port, source, damage.syntax, raw) == 0x0000
        deadline = time.monotonic() + 60
        row = None
        while time.monotonic() < deadline:
            row = fuzz_node.ledger(str(source.SOPInstanceUID))
            if row is not None:
                break
            time.sleep(0.05)
        assert row is not None, "the ledger says nothing of the instance"
        status, detail, results = row
        assert status in ("processed", "refused"), f"{status}: {detail}"
        outcomes[status] = outcomes.get(status, 0) + 1
        for uid in filter(None, results.split(",")):
            (path,) = outbox.glob(f"*/{uid}.dcm")
            assert dciodvfy_errors(path) == [], (damage, path.name)
            pydicom.dcmread(path)  # and reads back
            checked.append(path.name)

    one()
    assert sum(outcomes.values()) == len(sent) >= 1
    print(f"header fuzz: {len(sent)} instances {outcomes}; {len(checked)} results, dciodvfy clean")

    log_output = "".join(fuzz_node.lines)
    assert MARK not in log_output, [line for line in fuzz_node.lines if MARK in line][:3]
    for source in sent:
        for uid in (source.SOPInstanceUID, source.get("StudyInstanceUID")):
            if uid and len(str(uid)) > 20:
                assert str(uid) not in log_output
    # The log's rows through SQLite itself, and its write-ahead log as bytes. Never the database
    # or its -shm with open() and close(): closing any descriptor of a file drops every POSIX
    # lock this process holds on it, its open log connections' included, and another process
    # may then rebuild the shared index under them (the session's log, malformed).
    database = pacs_model.settings.home / "inference_log.db"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        assert MARK not in "\n".join(connection.iterdump())
    wal = database.with_name(database.name + "-wal")
    if wal.exists():
        assert MARK.encode() not in wal.read_bytes()

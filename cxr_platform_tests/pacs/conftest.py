"""Fixtures for the DICOM node: a registry with a trained production model, realistic chest
radiograph DICOM files built from the synthetic generator, and the external DICOM tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from cxr_platform.data.sources import discover_images
from cxr_platform.deployment.pipeline import (
    register_exported,
    registry_for,
    write_monitoring_reference,
)
from cxr_platform.pacs import build_node
from cxr_platform.pacs.storage import encode_dataset
from cxr_platform.ports import free_port
from cxr_platform.settings import CxrSettings, load_settings
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset

from ..deployment.conftest import export_for_registry

# The variants a PACS really sends: 12-bit with rescale and window in both photometric
# interpretations, DX, and a lossless compressed transfer syntax.
VARIANTS = {
    "cr-mono2-12bit": RadiographSpec(modality="CR", photometric="MONOCHROME2"),
    "cr-mono1-12bit": RadiographSpec(modality="CR", photometric="MONOCHROME1"),
    "dx-mono1": RadiographSpec(modality="DX", photometric="MONOCHROME1"),
    "cr-jpegls": RadiographSpec(modality="CR", photometric="MONOCHROME2", compression="jpeg-ls"),
}


def require_tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed (.ci/run installs dcmtk and dicom3tools)")
    return found


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (warnings are not errors). dicom3tools cannot read
    Deflated Explicit VR Little Endian, the syntax the node keeps SEG and maps in: such a file
    is checked as the same object inflated (what a PACS stores after reading it)."""
    tool = require_tool("dciodvfy")
    with tempfile.TemporaryDirectory() as scratch:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        if meta.TransferSyntaxUID.is_deflated:
            inflated = pydicom.dcmread(path)
            inflated.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = Path(scratch) / path.name
            inflated.save_as(path, enforce_file_format=True)
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@dataclass
class PacsModel:
    settings: CxrSettings
    version: str


@pytest.fixture(scope="session")
def pacs_model(
    trained_checkpoint, learnable_cache, other_population, tmp_path_factory
) -> PacsModel:
    """A registry whose production model is the trained baseline (96 px)."""
    base = tmp_path_factory.mktemp("pacs-model")
    settings = load_settings(home=base / "home")
    exported = export_for_registry(
        settings, trained_checkpoint, learnable_cache, base / "x", "cxr", other_population
    )
    write_monitoring_reference(exported.directory, learnable_cache)  # as a release writes it
    registered = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
    registry_for(settings.registry).promote(registered.version, triggered_by="test")
    return PacsModel(settings, registered.version)


@pytest.fixture(scope="session")
def chest_pngs(tiny_synthetic) -> list[Path]:
    frame = discover_images(tiny_synthetic).records
    return [Path(p) for p in frame["path"].tolist()]


def radiograph(png: Path, spec: RadiographSpec, size: tuple[int, int] = (640, 560)) -> Dataset:
    """A DICOM radiograph of a synthetic chest image at a detector-like (non-square) size."""
    gray = Image.open(png).convert("L").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return radiograph_dataset(np.asarray(gray), spec)


def radiograph_bytes(png: Path, spec: RadiographSpec, **kwargs) -> tuple[Dataset, bytes]:
    ds = radiograph(png, spec, **kwargs)
    return ds, encode_dataset(ds)


def sr_comment(path: Path) -> str:
    """The words of a not-analysed SR: why the AI did not analyse the image."""
    sr = pydicom.dcmread(path)
    assert sr.Modality == "SR" and "not analysed" in sr.SeriesDescription
    texts = [str(elem.value) for elem in sr.iterall() if elem.keyword == "TextValue"]
    (comment,) = [text for text in texts if text.startswith("Not analysed by the AI: ")]
    return comment.removeprefix("Not analysed by the AI: ")


def cxr_process(
    home: Path, command: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``cxr COMMAND ARGS`` as an administrator runs it: its own process, CXR_HOME set (and
    ``env``), output as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "cxr_platform.cli", command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "CXR_HOME": str(home), **(env or {})},
    )


def viewer_dist() -> Path:
    """The pinned OHIF build, fetched and verified into the machine's cache on first use."""
    from cxr_platform.pacs.viewer import OHIF, ohif_dist

    cache = load_settings().viewer.viewer_cache_dir
    if shutil.which("npm") is None and not (cache / OHIF.version / "dist").exists():
        pytest.skip("npm is not installed to fetch OHIF (.ci/run installs it)")
    return ohif_dist(cache)


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture()
def node_factory(pacs_model, tmp_path):
    nodes = []

    def make(state_dir: Path | None = None, **overrides):
        options = {
            "dicom_port": free_port(),
            "dicom_host": "127.0.0.1",
            "dicom_allowed_aets": ("MODALITY", "ROUTER"),
        }
        options.update(overrides)
        node = build_node(
            replace(pacs_model.settings.dicom, **options),
            pacs_model.settings.registry,
            state_dir=state_dir or tmp_path / "node",
        )
        nodes.append(node)
        return node

    make.settings = pacs_model.settings
    yield make
    for node in nodes:
        node.stop()


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, signed by its own key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make the test certificate")
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def tls_viewer(folder: Path, pacs_url: str):
    """The viewer as a deployment serves it (HTTPS, a certificate made here) over ``pacs_url``,
    started; the caller stops it."""
    from cxr_platform.pacs.viewer import ViewerServer
    from cxr_platform.sections import ViewerSection

    cert, key = self_signed(folder)
    section = ViewerSection(
        home=folder,
        viewer_pacs_url=pacs_url,
        viewer_port=free_port(),
        viewer_tls_cert=cert,
        viewer_tls_key=key,
    )
    return ViewerServer(section, folder / "viewer", dist=viewer_dist()).start()

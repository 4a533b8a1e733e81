"""Fixtures for the DICOM node: a registry with a trained production model, realistic chest
radiograph DICOM files built from the synthetic generator, and the external DICOM tools."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from cxr_platform.data.sources import discover_images
from cxr_platform.deployment.pipeline import register_exported, registry_for
from cxr_platform.pacs.storage import encode_dataset
from cxr_platform.pacs.synthetic_dicom import RadiographSpec, radiograph_dataset
from cxr_platform.settings import CxrSettings, load_settings

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
    """dciodvfy's error lines for a file (warnings are not errors)."""
    run = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@dataclass
class PacsModel:
    settings: CxrSettings
    version: str


@pytest.fixture(scope="session")
def pacs_model(trained_checkpoint, learnable_cache, tmp_path_factory) -> PacsModel:
    """A registry whose production model is the trained baseline (96 px)."""
    base = tmp_path_factory.mktemp("pacs-model")
    settings = load_settings(home=base / "home")
    exported = export_for_registry(settings, trained_checkpoint, learnable_cache, base / "x", "cxr")
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

"""A registered version's files with another operating point: the same weights and graphs, the
calibration and threshold refitted for a site.

Every file that carries the metadata gets the new operating point (ONNX ``metadata_props`` of
the fp32 and INT8 graphs, the TorchScript extra file, ``metadata.json``), so whichever one a
process loads says the same thing. The source version's folder is never touched: the copy is a
new version's artifact.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cxr_platform.calibration.refit import reference_logits
from cxr_platform.deployment.reference import (
    PREDICTED,
    PROBABILITY,
    load_reference,
    write_reference,
)
from cxr_platform.model_version.files import (
    INT8_ONNX_FILE,
    METADATA_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    TORCHSCRIPT_METADATA_FILE,
    ModelMetadata,
    read_onnx_metadata,
    write_onnx_metadata,
)
from cxr_platform.model_version.operating_point import OperatingPoint


def _with_operating_point(
    metadata: ModelMetadata, operating_point: OperatingPoint, metrics: dict[str, float]
) -> ModelMetadata:
    return replace(
        metadata,
        operating_point=operating_point.to_dict(),
        metrics=dict(metrics),
        exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def write_recalibrated(
    source: Path, out_dir: Path, operating_point: OperatingPoint, metrics: dict[str, float]
) -> ModelMetadata:
    """Copy the version folder ``source`` to ``out_dir`` with ``operating_point`` in every
    file's metadata; returns the fp32 model's new metadata."""
    import torch

    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(source, out_dir)
    metadata = _with_operating_point(
        read_onnx_metadata(out_dir / ONNX_FILE), operating_point, metrics
    )
    write_onnx_metadata(out_dir / ONNX_FILE, metadata)
    int8 = out_dir / INT8_ONNX_FILE
    if int8.exists():
        write_onnx_metadata(
            int8, _with_operating_point(read_onnx_metadata(int8), operating_point, metrics)
        )
    torchscript = out_dir / TORCHSCRIPT_FILE
    if torchscript.exists():
        tmp = torchscript.with_name(torchscript.name + ".tmp")
        with warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export; the export still ships it.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(torchscript), map_location="cpu")
            torch.jit.save(
                module, str(tmp), _extra_files={TORCHSCRIPT_METADATA_FILE: metadata.to_json()}
            )
        tmp.replace(torchscript)
    (out_dir / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2) + "\n")
    _moved_reference(source, out_dir, operating_point)
    return metadata


def _moved_reference(source: Path, out_dir: Path, operating_point: OperatingPoint) -> None:
    """The drift reference's probabilities and calls in the new operating point: drift compares
    them with what this version logs, so they must be in its calibration."""
    reference = load_reference(out_dir)
    if reference is None:
        return
    scored = reference[PROBABILITY].notna()
    before = read_onnx_metadata(source / ONNX_FILE).calibration
    logits = reference_logits(reference.loc[scored], before)
    probabilities = operating_point.probabilities(logits)
    reference.loc[scored, PROBABILITY] = probabilities
    reference.loc[scored, PREDICTED] = np.where(
        probabilities >= operating_point.threshold, "PNEUMONIA", "NORMAL"
    )
    write_reference(out_dir, reference)

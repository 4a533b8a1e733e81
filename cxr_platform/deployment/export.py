"""Export a trained checkpoint to ONNX and TorchScript that carry everything needed to serve it.

The preprocessing config, the operating point (Platt calibration and threshold), the
architecture and the training run id travel inside each file: ONNX ``metadata_props`` and a
TorchScript extra file. A model file alone therefore reproduces the platform's predictions.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from cxr_platform.model_version.files import (
    FEATURES_NAME,
    METADATA_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    TORCHSCRIPT_METADATA_FILE,
    WEIGHTS_FILE,
    ExportError,
    ModelMetadata,
    onnx_session,
    write_onnx_metadata,
)
from cxr_platform.model_version.input_gate import InputGate
from cxr_platform.model_version.intended_use import IntendedUse
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.model_version.population_check import PopulationCheck
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.zoo import WithFeatures

log = logging.getLogger(__name__)

DEFAULT_PARITY_TOLERANCE = 1e-4


class ParityError(ExportError):
    """An exported model's logits differ from PyTorch's by more than the tolerance."""


def metadata_for_checkpoint(
    checkpoint: Checkpoint,
    operating_point: OperatingPoint,
    *,
    model_name: str,
    mlflow_run_id: str | None,
    manifest_hash: str | None,
    git_commit: str | None,
    metrics: dict[str, float] | None = None,
    input_gate: InputGate | None = None,
    intended_use: IntendedUse | None = None,
    population_check: PopulationCheck | None = None,
) -> ModelMetadata:
    return ModelMetadata(
        model_name=model_name,
        arch=checkpoint.arch,
        preprocessing=dict(checkpoint.preprocessing),
        operating_point=operating_point.to_dict(),
        mlflow_run_id=mlflow_run_id,
        manifest_hash=manifest_hash,
        git_commit=git_commit,
        metrics={k: float(v) for k, v in (metrics or {}).items() if v is not None},
        exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        test_time_augmentation="flip" if checkpoint.flip_averaged else "none",
        input_gate=input_gate.to_dict() if input_gate is not None else None,
        intended_use=intended_use.to_dict() if intended_use is not None else None,
        population_check=population_check.to_dict() if population_check is not None else None,
        features_name=FEATURES_NAME,
    )


def _example_input(metadata: ModelMetadata, batch: int = 2) -> torch.Tensor:
    size = metadata.preprocessing_config.image_size
    return torch.zeros(batch, 1, size, size)


def export_onnx(model: nn.Module, metadata: ModelMetadata, path: Path) -> Path:
    """ONNX through the maintained ``torch.export`` based exporter, with a dynamic batch axis.

    ``model`` returns the logit, or the logit and the penultimate features
    (:class:`~cxr_platform.models.zoo.WithFeatures`), named as the metadata says."""
    model = model.eval().cpu()
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (_example_input(metadata),),
            input_names=[metadata.input_name],
            output_names=[metadata.output_name]
            + ([metadata.features_name] if metadata.features_name else []),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(tmp))
    write_onnx_metadata(tmp, metadata)
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)
    return path


def export_torchscript(model: nn.Module, metadata: ModelMetadata, path: Path) -> Path:
    model = model.eval().cpu()
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript is in maintenance mode; it still works
        traced = torch.jit.trace(model, _example_input(metadata))
        torch.jit.save(
            traced, str(tmp), _extra_files={TORCHSCRIPT_METADATA_FILE: metadata.to_json()}
        )
    os.replace(tmp, path)
    return path


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, ModelMetadata]:
    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[TORCHSCRIPT_METADATA_FILE]:
        raise ExportError(f"{path}: TorchScript model without {TORCHSCRIPT_METADATA_FILE}")
    return module.eval(), ModelMetadata.from_json(extra[TORCHSCRIPT_METADATA_FILE])


@dataclass(frozen=True)
class ParityResult:
    n_images: int
    onnx_max_abs_diff: float
    torchscript_max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return max(self.onnx_max_abs_diff, self.torchscript_max_abs_diff) <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def parity_check(
    model: nn.Module,
    onnx_path: Path,
    torchscript_path: Path,
    images: torch.Tensor,
    *,
    tolerance: float = DEFAULT_PARITY_TOLERANCE,
) -> ParityResult:
    """Max |logit difference| of ONNX Runtime and TorchScript against eager PyTorch (CPU fp32)."""
    model = model.eval().cpu()
    images = images.float().cpu()
    with torch.no_grad():
        reference = model(images).numpy()
        scripted, _ = load_torchscript(torchscript_path)
        torchscript = scripted(images).numpy()
    session = onnx_session(onnx_path)
    onnx_logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    return ParityResult(
        n_images=len(images),
        onnx_max_abs_diff=float(np.abs(onnx_logits - reference).max()),
        torchscript_max_abs_diff=float(np.abs(torchscript - reference).max()),
        tolerance=tolerance,
    )


@dataclass(frozen=True)
class ExportedModel:
    directory: Path
    metadata: ModelMetadata
    parity: ParityResult
    int8: Any = None  # quantize.Int8Decision when an INT8 variant was tried

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_FILE

    @property
    def torchscript_path(self) -> Path:
        return self.directory / TORCHSCRIPT_FILE

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_FILE


def export_checkpoint(
    checkpoint_path: Path,
    operating_point: OperatingPoint,
    out_dir: Path,
    parity_images: torch.Tensor,
    *,
    model_name: str,
    mlflow_run_id: str | None,
    manifest_hash: str | None,
    git_commit: str | None,
    metrics: dict[str, float] | None = None,
    input_gate: InputGate | None = None,
    intended_use: IntendedUse | None = None,
    population_check: PopulationCheck | None = None,
    tolerance: float = DEFAULT_PARITY_TOLERANCE,
) -> ExportedModel:
    """ONNX + TorchScript + state dict + metadata.json in ``out_dir``, then the parity check.

    The checkpoint is only read; ``operating_point`` is the one its evaluation fitted.
    ``parity_images`` are normalized (N, 1, S, S) inputs; the issue's standard is 32 test images.
    """
    checkpoint = Checkpoint.load(checkpoint_path)
    metadata = metadata_for_checkpoint(
        checkpoint,
        operating_point,
        model_name=model_name,
        mlflow_run_id=mlflow_run_id,
        manifest_hash=manifest_hash,
        git_commit=git_commit,
        metrics=metrics,
        input_gate=input_gate,
        intended_use=intended_use,
        population_check=population_check,
    )
    model = checkpoint.scoring_model()
    out_dir.mkdir(parents=True, exist_ok=True)
    with_features = WithFeatures(
        checkpoint.bare_model(), checkpoint.arch, flip=checkpoint.flip_averaged
    )
    export_onnx(with_features, metadata, out_dir / ONNX_FILE)
    export_torchscript(model, metadata, out_dir / TORCHSCRIPT_FILE)
    torch.save(checkpoint.model, out_dir / WEIGHTS_FILE)
    (out_dir / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2) + "\n")
    parity = parity_check(
        model, out_dir / ONNX_FILE, out_dir / TORCHSCRIPT_FILE, parity_images, tolerance=tolerance
    )
    log.info("exported %s to %s; parity %s", model_name, out_dir, parity.to_dict())
    return ExportedModel(directory=out_dir, metadata=metadata, parity=parity)

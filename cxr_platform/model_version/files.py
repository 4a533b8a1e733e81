"""The exported model as files: names, the metadata inside them, and an ONNX Runtime session.

What every scoring process needs to read an export, without the exporter's dependencies
(torch, the training code): the service and the DICOM node import this, never
:mod:`cxr_platform.deployment.export`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.errors import CxrError
from cxr_platform.model_version.intended_use import IntendedUse
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.model_version.population_check import PopulationCheck

EXPORT_FORMAT = 1
METADATA_KEY = "cxr_metadata"
TORCHSCRIPT_METADATA_FILE = "cxr_metadata.json"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
WEIGHTS_FILE = "weights.pt"  # plain state dict: Grad-CAM needs the eager model
METADATA_FILE = "metadata.json"
INPUT_NAME = "image"
OUTPUT_NAME = "logit"
FEATURES_NAME = "features"  # per-stage channel statistics, the population check's input
CLASS_NAMES = ("NORMAL", "PNEUMONIA")


class ExportError(CxrError):
    """A model could not be exported, or an exported file is not a cxr_platform model."""


@dataclass(frozen=True)
class ModelMetadata:
    """What a serving process needs besides the network itself."""

    model_name: str
    arch: str
    preprocessing: dict[str, Any]
    operating_point: dict[str, Any]
    mlflow_run_id: str | None
    manifest_hash: str | None
    git_commit: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    exported_at: str = ""
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    class_names: tuple[str, ...] = CLASS_NAMES
    precision: str = "fp32"  # "int8": statically quantized, calibrated on validation images
    # "flip": the graph scores the mean logit of the image and its mirror image.
    test_time_augmentation: str = "none"
    # The input gate's parameters (model_version.input_gate.InputGate.to_dict); None for versions
    # exported before the gate existed, which are served ungated.
    input_gate: dict[str, Any] | None = None
    # What the version is for (model_version.intended_use.IntendedUse.to_dict) and the check by
    # pixels on its ONNX graph's second output, ``features_name``. None for versions exported
    # before intended use existed: they state none and check no population.
    intended_use: dict[str, Any] | None = None
    population_check: dict[str, Any] | None = None
    features_name: str | None = None
    format: int = EXPORT_FORMAT

    @property
    def preprocessing_config(self) -> PreprocessingConfig:
        return PreprocessingConfig.from_dict(self.preprocessing)

    @property
    def calibration(self) -> OperatingPoint:
        return OperatingPoint.from_dict(self.operating_point)

    @property
    def threshold(self) -> float:
        return float(self.operating_point["threshold"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def use(self) -> IntendedUse | None:
        return IntendedUse.from_dict(self.intended_use) if self.intended_use else None

    def summary(self) -> dict[str, Any]:
        """For people: the checks' arrays replaced by what they amount to."""
        values = self.to_dict()
        gate = values.pop("input_gate")
        if gate is not None:
            values["input_gate"] = {
                "components": gate.get("n_components"),
                "threshold": gate.get("threshold"),
                "limits": gate.get("limits"),
                **gate.get("fitted_on", {}),
            }
        population = values.pop("population_check")
        if population is not None:
            values["population_check"] = PopulationCheck.from_dict(population).summary()
        use = values.pop("intended_use")
        if use is not None:
            values["intended_use"] = IntendedUse.from_dict(use).summary()
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExportError(f"model metadata is not valid JSON: {exc}") from exc
        if not isinstance(values, dict) or values.get("format") != EXPORT_FORMAT:
            raise ExportError(f"unsupported model metadata format (expected {EXPORT_FORMAT})")
        values["class_names"] = tuple(values.get("class_names", CLASS_NAMES))
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        return cls(**known)


def read_onnx_metadata(path: str | Path) -> ModelMetadata:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path}: not an ONNX model ({exc})") from exc
    return _metadata_from_props({e.key: e.value for e in proto.metadata_props}, path)


def session_metadata(session: ort.InferenceSession, path: str | Path) -> ModelMetadata:
    """The metadata of a model already loaded for scoring, without parsing the file again."""
    return _metadata_from_props(session.get_modelmeta().custom_metadata_map, path)


def _metadata_from_props(props: dict[str, str], path: str | Path) -> ModelMetadata:
    if METADATA_KEY not in props:
        raise ExportError(f"{path}: ONNX model without {METADATA_KEY!r} metadata")
    return ModelMetadata.from_json(props[METADATA_KEY])


def write_onnx_metadata(path: Path, metadata: ModelMetadata) -> None:
    """Replace the platform metadata of an existing ONNX file (atomically)."""
    proto = onnx.load(str(path))
    entries = {
        METADATA_KEY: metadata.to_json(),
        "cxr_model_name": metadata.model_name,
        "cxr_arch": metadata.arch,
        "cxr_threshold": repr(metadata.threshold),
        "cxr_mlflow_run_id": metadata.mlflow_run_id or "",
    }
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key not in entries]
    del proto.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)


def onnx_session(
    path: str | Path, *, threads: int | None = None, spinning: bool = False
) -> ort.InferenceSession:
    """A session on CUDA when ONNX Runtime has it, else CPU.

    ``spinning`` off by default: ONNX Runtime's idle worker threads otherwise busy-wait between
    requests, which halved the speed of a training job sharing two cores with intermittent
    scoring (measured). A dedicated, always-busy server may turn it on for latency.
    """
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ONNX Runtime raises its own types for unreadable models
        raise ExportError(f"{path}: not a loadable ONNX model ({exc})") from exc

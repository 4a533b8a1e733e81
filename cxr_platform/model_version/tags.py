"""What a registry version says about itself, as one record instead of loose ``cxr.*`` strings.

MLflow keeps model-version tags as a flat ``str -> str`` map. Registration writes the release
facts once (architecture, operating point, data version, metrics); promotion, refusal and
rollback add their own facts later. Both go through :meth:`VersionTags.to_tags`, and every
reader goes through :meth:`VersionTags.from_tags`, so a tag's name and format live here only.
Standard library only: the service and the DICOM node read tags without the training stack.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

TAG_PREFIX = "cxr."
METRIC_PREFIX = "cxr.metric."
_JSON_FIELDS = (
    "preprocessing",
    "gate",
    "input_gate",
    "site_labels",
    "intended_use",
    "population_check",
)
_FLOAT_FIELDS = (
    "threshold",
    "site_prevalence",
    "parity_onnx_max_abs_diff",
    "parity_torchscript_max_abs_diff",
    "int8_val_auc_change",
)
_INT_FIELDS = ("labeled_examples",)


def record_json(value: Any, **options: Any) -> str:
    """``value`` as the JSON of a registry record. Gate figures are computed with numpy, whose
    scalars the JSON encoder refuses: they are written as Python's own values."""
    return json.dumps(value, default=_numpy_scalar, **options)


def _numpy_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


@dataclass(frozen=True)
class VersionTags:
    """Every field is optional: a partial record writes only what it holds."""

    # Written at registration.
    model_name: str | None = None
    arch: str | None = None
    threshold: float | None = None
    threshold_rule: str | None = None
    calibration: str | None = None  # "T=<temperature> b=<bias>", for people reading the UI
    preprocessing: dict[str, Any] | None = None
    data_version: str | None = None  # the split manifest's hash
    data_dir: str | None = None  # None: the synthetic demo set
    git_commit: str | None = None
    parity_onnx_max_abs_diff: float | None = None
    parity_torchscript_max_abs_diff: float | None = None
    int8: str | None = None  # "kept" or "refused"
    int8_val_auc_change: float | None = None
    finetuned_from: str | None = None
    finetune_reason: str | None = None
    labeled_examples: int | None = None
    input_gate: dict[str, Any] | None = None  # the gate's summary: threshold, validation refusal
    # Who the version is for (IntendedUse.summary) and its check by pixels (summary).
    intended_use: dict[str, Any] | None = None
    population_check: dict[str, Any] | None = None
    # A recalibration for one site: the same weights as ``recalibrated_from`` with the operating
    # point refitted on that site's labels (counts per class, fit and held-out parts).
    recalibrated_from: str | None = None
    site: str | None = None
    site_prevalence: float | None = None
    site_labels: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # Written by the registry as the version's life goes on.
    promoted_at: str | None = None
    promoted_by: str | None = None
    replaced_version: str | None = None  # "": the promotion replaced nothing
    gate: dict[str, Any] | None = None
    refused_at: str | None = None
    rolled_back_at: str | None = None
    rolled_back_by: str | None = None

    def to_tags(self) -> dict[str, str]:
        tags: dict[str, str] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "metrics" or value is None:
                continue
            text = record_json(value, sort_keys=True) if spec.name in _JSON_FIELDS else str(value)
            tags[TAG_PREFIX + spec.name] = text
        for name, value in self.metrics.items():
            tags[METRIC_PREFIX + name] = repr(float(value))
        return tags

    def updated(self, other: VersionTags) -> VersionTags:
        """This record with ``other``'s non-empty fields written over it."""
        values = {
            spec.name: getattr(other, spec.name)
            for spec in fields(other)
            if spec.name != "metrics" and getattr(other, spec.name) is not None
        }
        return replace(self, **values, metrics={**self.metrics, **other.metrics})

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> VersionTags:
        """Tags this platform did not write, and values it cannot parse, are left out."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            text = tags.get(TAG_PREFIX + spec.name)
            if spec.name == "metrics" or text is None:
                continue
            parsed = _parse(spec.name, text)
            if parsed is not None:
                values[spec.name] = parsed
        values["metrics"] = {
            key[len(METRIC_PREFIX) :]: number
            for key, text in tags.items()
            if key.startswith(METRIC_PREFIX) and (number := _number(text)) is not None
        }
        return cls(**values)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse(name: str, text: str) -> Any:
    if name in _FLOAT_FIELDS:
        return _number(text)
    if name in _INT_FIELDS:
        number = _number(text)
        return None if number is None else int(number)
    if name in _JSON_FIELDS:
        if not text:
            return None  # written as "" when there was nothing to record
        try:
            parsed = json.loads(text)
        except ValueError:  # cut at MLflow's tag length limit
            return None
        return parsed if isinstance(parsed, dict) else None
    return text

"""Metadata a person can judge in the Dagster UI: numbers rounded to what they can mean, paths
shown from the platform's home, and links where another UI (MLflow) holds the details.

Numbers stay numbers (Dagster plots numeric metadata across materializations); they are only
rounded. Units live in the keys (``wall_seconds``, ``train_images_per_s``).
"""
# No `from __future__ import annotations`: Dagster inspects annotations at runtime elsewhere.

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from mlflow.tracking import MlflowClient

from cxr_platform.sections import TrackedSection
from cxr_platform.tracking import run_url


def rounded(value: float) -> float:
    """Three decimals for rates and scores, four significant digits above one, two significant
    digits for the very small (parity differences, p-values), so none reads as zero."""
    value = float(value)  # numpy's scalars round to themselves, which Dagster cannot store
    if not math.isfinite(value) or value == 0:
        return value
    size = abs(value)
    if size >= 1:
        return round(value, max(0, 3 - int(math.floor(math.log10(size)))))
    if size >= 0.01:
        return round(value, 3)
    return float(f"{value:.2g}")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool | dg.MetadataValue) or value is None:
        return value
    if isinstance(value, float):
        return rounded(value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def readable(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` with every float rounded, inside JSON values too."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, dg.JsonMetadataValue):
            out[key] = dg.MetadataValue.json(_plain(value.data))
        elif isinstance(value, dg.FloatMetadataValue) and value.value is not None:
            out[key] = dg.MetadataValue.float(rounded(value.value))
        elif isinstance(value, dict | list):
            out[key] = dg.MetadataValue.json(_plain(value))
        else:
            out[key] = _plain(value)
    return out


def home_path(path: Path | str, home: Path) -> dg.MetadataValue:
    """A file the platform wrote, named from ``$CXR_HOME`` so it reads the same on every
    machine; a file elsewhere keeps its full path."""
    path = Path(path)
    try:
        return dg.MetadataValue.path(f"$CXR_HOME/{path.resolve().relative_to(home.resolve())}")
    except ValueError:
        return dg.MetadataValue.path(str(path))


def mlflow_run_link(tracked: TrackedSection, run_id: str | None) -> dg.MetadataValue:
    """The run in MLflow's UI when there is one to open (``CXR_MLFLOW_UI_URL``, or a tracking
    server), else the id to search for there."""
    if run_id is None:
        return dg.MetadataValue.text("none")
    if tracked.ui_url:
        experiment_id = MlflowClient(tracked.tracking_uri).get_run(run_id).info.experiment_id
        return dg.MetadataValue.url(run_url(tracked.ui_url, experiment_id, run_id))
    return dg.MetadataValue.text(run_id)

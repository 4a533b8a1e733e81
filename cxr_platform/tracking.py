"""MLflow experiment tracking through ``MlflowClient`` (explicit run ids, no global active run).

The fluent ``mlflow.start_run`` API keeps one active run per process, which breaks when a Dagster
worker or a test trains two models at once; a client with explicit run ids does not.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

TRAINING_EXPERIMENT = "cxr-training"
MAX_PARAM_LENGTH = 6000


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"augmentation.rotation_degrees": "15.0", ...}`` for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The run's page in an MLflow UI (the address scheme of MLflow's single-page app)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class ExperimentTracker:
    """Creates runs in one experiment of one tracking server (SQLite file by default)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str = TRAINING_EXPERIMENT,
        artifact_root: Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # A tracking server decides where artifacts go (its --artifacts-destination); a
            # local folder named here would keep a shared server's artifacts on this machine.
            local_store = not tracking_uri.startswith(("http://", "https://", "databricks"))
            location = artifact_root.resolve().as_uri() if artifact_root and local_store else None
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location
            )
        else:
            self.experiment_id = found.experiment_id

    def start_run(self, run_name: str, tags: Mapping[str, str | None]) -> TrackedRun:
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags={k: str(v) for k, v in tags.items() if v is not None},
        )
        return TrackedRun(self.client, run.info.run_id)


class TrackedRun:
    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten(params)
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        timestamp = _now_ms()
        entries = [
            Metric(key, float(value), timestamp, step)
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        if entries:
            self.client.log_batch(self.run_id, metrics=entries)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if entries:
            self.client.log_batch(self.run_id, tags=entries)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)

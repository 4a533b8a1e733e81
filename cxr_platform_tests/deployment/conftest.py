from __future__ import annotations

from pathlib import Path

import pytest

from cxr_platform.deployment.export import ExportedModel, export_checkpoint
from cxr_platform.deployment.pipeline import gate_for, parity_inputs
from cxr_platform.deployment.population import intended_use_for, population_check_for
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.pipeline import tracker_for
from cxr_platform.settings import CxrSettings, load_settings
from cxr_platform_tests.conftest import EvaluatedCheckpoint


@pytest.fixture()
def settings(tmp_path) -> CxrSettings:
    # Fixed floors: these tests are about the mechanics, not the demo profile's defaults.
    return load_settings(
        home=tmp_path / "home",
        min_test_auc=0.6,
        min_test_sensitivity=0.5,
        min_test_specificity=0.1,
        gate_max_auc_drop=0.02,
    )


def export_for_registry(
    settings: CxrSettings,
    checkpoint: EvaluatedCheckpoint,
    cache,
    out_dir: Path,
    name: str,
    other_population: Path | None = None,
) -> ExportedModel:
    """As a release exports: the input gate, the intended use of the synthetic set the cache
    holds (children of 1-5 years, declared) and, given images of another population, the check
    by pixels fitted against them."""
    run = tracker_for(settings.registry).start_run(run_name=name, tags={"cxr.model_name": name})
    run.finish()
    return export_checkpoint(
        checkpoint.path,
        checkpoint.operating_point,
        out_dir,
        parity_inputs(cache),
        input_gate=gate_for(cache),
        intended_use=intended_use_for(cache, settings.registry, None),
        population_check=population_check_for(
            Checkpoint.load(checkpoint.path),
            cache,
            (other_population,) if other_population else (),
        ),
        model_name=name,
        mlflow_run_id=run.run_id,
        manifest_hash="manifest-under-test",
        git_commit="0123abc",
        metrics={"best_val_auc": 0.8},
    )


def export_untracked(checkpoint: EvaluatedCheckpoint, cache, out_dir: Path) -> ExportedModel:
    """Export without a tracking run: for tests of the files themselves."""
    return export_checkpoint(
        checkpoint.path,
        checkpoint.operating_point,
        out_dir,
        parity_inputs(cache),
        input_gate=gate_for(cache),
        model_name="baseline",
        mlflow_run_id="run-1",
        manifest_hash="m",
        git_commit=None,
    )

"""What the Dagster UI shows: rounded numbers, home-relative paths, links to MLflow."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
from dagster_shared.serdes import serialize_value

from cxr_platform.defs.definitions import build_definitions
from cxr_platform.defs.metadata import home_path, mlflow_run_link, readable, rounded
from cxr_platform.settings import load_settings


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (0.8618925831202047, 0.862),
        (0.05, 0.05),
        (123.456789, 123.5),
        (12.3456, 12.35),
        (1.3e-6, 1.3e-6),
        (0.004321, 0.0043),
        (-0.0123456, -0.012),
        (0.0, 0.0),
    ],
)
def test_numbers_are_rounded_to_what_they_can_mean(raw, shown):
    assert rounded(raw) == shown


def test_readable_rounds_inside_json_and_keeps_other_values():
    metadata = readable(
        {
            "auc": 0.8618925831202047,
            "n": 42,
            "passed": True,
            "config": dg.MetadataValue.json({"lr": 0.000123456, "steps": [0.33333, 2]}),
            "nested": {"sensitivity": 0.912345},
            "text": dg.MetadataValue.md("| a |"),
            "float": dg.MetadataValue.float(3.14159265),
        }
    )
    assert metadata["auc"] == 0.862 and metadata["n"] == 42 and metadata["passed"] is True
    assert metadata["config"].data == {"lr": 0.00012, "steps": [0.333, 2]}
    assert metadata["nested"].data == {"sensitivity": 0.912}
    assert metadata["text"].md_str == "| a |"
    assert metadata["float"].value == 3.142


def test_numpys_scalars_come_out_as_values_dagster_can_store():
    """A figure computed with numpy (a paired difference, a check's verdict) reaches the event
    log as Python's own number or truth value: Dagster refuses to write numpy's."""
    metadata = readable(
        {
            "gain": np.float64(0.0312345),
            "n": np.int64(7),
            "passed": np.bool_(True),
            "nested": {"low": np.float64(-0.01234), "rejected": np.bool_(False)},
        }
    )
    assert type(metadata["gain"]) is float and metadata["gain"] == 0.031
    assert type(metadata["n"]) is int and metadata["passed"] is True
    assert metadata["nested"].data == {"low": -0.012, "rejected": False}
    serialize_value(dg.AssetMaterialization("site_recalibration", metadata=metadata))


def test_paths_are_shown_from_the_home_and_runs_link_to_an_mlflow_ui(tmp_path):
    home = tmp_path / "home"
    assert home_path(home / "reports" / "x.json", home).path == "$CXR_HOME/reports/x.json"
    assert home_path(tmp_path / "data", home).path == str(tmp_path / "data")
    embedded = load_settings(home=home).training
    assert mlflow_run_link(embedded, "abc").text == "abc"  # no UI to open
    assert mlflow_run_link(embedded, None).text == "none"


def test_every_definition_says_what_it_is_for():
    """Assets, checks, jobs, sensors and schedules each carry a description in the UI."""
    repository = build_definitions(load_settings()).get_repository_def()
    graph = repository.asset_graph
    missing = [
        key.to_user_string()
        for key in graph.get_all_asset_keys()
        if len((graph.get(key).description or "").strip()) < 20
    ]
    missing += [
        f"{key.asset_key.to_user_string()}:{key.name}"
        for key in graph.asset_check_keys
        if len((graph.get_check_spec(key).description or "").strip()) < 20
    ]
    for kind, definitions in (
        ("job", [job for job in repository.get_all_jobs() if not job.name.startswith("__")]),
        ("sensor", repository.sensor_defs),
        ("schedule", repository.schedule_defs),
    ):
        missing += [
            f"{kind} {d.name}" for d in definitions if len((d.description or "").strip()) < 20
        ]
    assert not missing, missing


def test_a_run_links_to_the_mlflow_ui_named_for_it(tmp_path):
    from cxr_platform.tracking import ExperimentTracker

    tracked = load_settings(
        home=tmp_path / "home", mlflow_ui_url="http://mlflow.internal:5000/"
    ).training
    tracked.ensure_dirs()
    tracker = ExperimentTracker(tracked.tracking_uri, artifact_root=tracked.mlflow_dir)
    run = tracker.start_run(run_name="linked", tags={})
    run.finish()
    link = mlflow_run_link(tracked, run.run_id)
    assert link.url == (
        f"http://mlflow.internal:5000/#/experiments/{tracker.experiment_id}/runs/{run.run_id}"
    )

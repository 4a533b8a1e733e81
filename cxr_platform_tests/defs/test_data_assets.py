"""Materialize the data assets into an ephemeral Dagster instance, with a corrupt file present."""

from __future__ import annotations

import shutil

import dagster as dg
import pandas as pd

from cxr_platform.defs.definitions import DATA_JOB, build_definitions, defs
from cxr_platform.settings import load_settings


def test_definitions_load_with_every_data_asset_and_check():
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"source_images", "data_profile", "patient_splits", "preprocessed_cache"} <= keys
    job = defs.resolve_job_def(DATA_JOB)
    assert job is not None


def test_data_job_materializes_reports_corruption_and_checks_pass(tiny_synthetic, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data)
    labels = pd.read_csv(data / "labels.csv")
    victim = data / labels.loc[labels["label"] == "PNEUMONIA", "file"].iloc[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated image

    settings = load_settings(home=tmp_path / "home", data_dir=data, workers=1)
    instance = dg.DagsterInstance.ephemeral()
    result = (
        build_definitions(settings).resolve_job_def(DATA_JOB).execute_in_process(instance=instance)
    )
    assert result.success

    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "no_patient_leakage": True,
        "no_content_leakage": True,
        "both_classes_in_every_split": True,
        "class_share_balanced": True,
    }

    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"source_images", "data_profile", "patient_splits", "preprocessed_cache"}

    profiled = result.output_for_node("data_profile")
    assert profiled.profile.n_unreadable == 1
    assert profiled.profile.unreadable[0]["reason"] in {"truncated", "unreadable"}
    manifest = result.output_for_node("patient_splits")
    assert victim.as_posix() not in set(manifest["path"])
    assert len(manifest) == len(labels) - 1
    assert (settings.home / "splits" / "patient_splits.csv").exists()
    assert (settings.data.reports_dir / "data_profile.json").exists()

    # Same input again: the cache is reused, not rebuilt.
    rerun = (
        build_definitions(settings).resolve_job_def(DATA_JOB).execute_in_process(instance=instance)
    )
    assert all(s.reused for s in rerun.output_for_node("preprocessed_cache").splits.values())


def test_failing_blocking_check_stops_the_cache(tmp_path, tiny_synthetic):
    # Two patients cannot fill three splits with both classes: the check fails and blocks.
    data = tmp_path / "two"
    labels = pd.read_csv(tiny_synthetic / "labels.csv")
    keep = labels[labels["patient_id"].isin(labels["patient_id"].unique()[:2])]
    for file in keep["file"]:
        (data / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_synthetic / file, data / file)
    keep[["file", "label", "patient_id"]].to_csv(data / "labels.csv", index=False)
    settings = load_settings(home=tmp_path / "home", data_dir=data, workers=1)
    result = (
        build_definitions(settings)
        .resolve_job_def(DATA_JOB)
        .execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    )
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["both_classes_in_every_split"] is False
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "preprocessed_cache" not in materialized

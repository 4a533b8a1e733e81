"""The `cxr` command as operators use it: real subprocesses, exit codes, files written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
from PIL import Image

from cxr_platform.data.negatives import documents
from cxr_platform.models.checkpoint import file_sha256
from cxr_platform_tests.terminal import PROGRESS_BAR, run_in_terminal

CXR = [sys.executable, "-m", "cxr_platform.cli"]


def _environment(home, env=None) -> dict[str, str]:
    full_env = {**os.environ, "CXR_HOME": str(home), **(env or {})}
    full_env.pop("CXR_DATA_DIR", None)
    return full_env


def _cxr(*args, home, env=None):
    return subprocess.run(
        [*CXR, *args],
        capture_output=True,
        text=True,
        env=_environment(home, env),
        timeout=1200,  # `cxr demo --data DIR` trains and releases two models
    )


def _cxr_at_terminal(*args, home, env=None) -> tuple[int, str]:
    """(exit code, the screen) of ``cxr`` run as a person at a terminal runs it."""
    return run_in_terminal([*CXR, *args], env=_environment(home, env))


def test_help_for_every_command(tmp_path):
    commands = (
        [],
        ["demo"],
        ["profile"],
        ["split"],
        ["train"],
        ["ensemble"],
        ["evaluate"],
        ["export"],
        ["models"],
        ["promote"],
        ["rollback"],
        ["recalibrate"],
        ["predict"],
        ["explain"],
        ["serve"],
        ["bento"],
        ["simulate-drift"],
        ["dicom-node"],
        ["dicom-status"],
        ["dicom-retry"],
        ["config"],
    )
    for command in commands:
        result = _cxr(*command, "--help", home=tmp_path)
        assert result.returncode == 0 and "Usage" in result.stdout


def test_profile_json_and_split_csv(tiny_synthetic, tmp_path):
    out = tmp_path / "profile.json"
    result = _cxr("profile", str(tiny_synthetic), "--json", str(out), home=tmp_path / "h")
    assert result.returncode == 0, result.stderr
    profile = json.loads(out.read_text())
    labels = pd.read_csv(tiny_synthetic / "labels.csv")
    assert profile["n_images"] == len(labels) and profile["n_unreadable"] == 0
    assert profile["n_patients"] == labels["patient_id"].nunique()
    assert profile["per_class"] == labels["label"].value_counts().to_dict()

    csv = tmp_path / "split.csv"
    result = _cxr(
        "split",
        str(tiny_synthetic),
        "--out",
        str(csv),
        "--seed",
        "3",
        "--ratios",
        "0.6",
        "0.2",
        "0.2",
        home=tmp_path / "h",
    )
    assert result.returncode == 0, result.stderr + result.stdout
    manifest = pd.read_csv(csv)
    assert {"path", "label", "patient_id", "split"} <= set(manifest.columns)
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1


def test_bad_folder_exits_nonzero_with_the_accepted_layouts(tmp_path):
    (tmp_path / "junk").mkdir()
    result = _cxr("profile", str(tmp_path / "junk"), home=tmp_path / "h")
    assert result.returncode == 2
    assert "accepted layouts" in result.stderr and "Traceback" not in result.stderr


def test_train_then_evaluate_writes_the_test_metrics(tiny_synthetic, tmp_path):
    home = tmp_path / "home"
    env = {"CXR_IMAGE_SIZE": "64"}
    data = ["--data", str(tiny_synthetic)]
    trained = _cxr("train", *data, "--arch", "baseline_cnn", "--epochs", "2", home=home, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "best validation AUC" in trained.stdout
    assert "schedule 2 full at 0.001" in trained.stdout  # a folder given: the full profile
    # Piped, not a terminal: no bars, no carriage returns, one line per epoch (issue 44: a CI
    # log or nohup.out said nothing for the whole of training).
    assert "\r" not in trained.stderr and trained.stderr.count("epoch 1/2") == 1

    out = tmp_path / "metrics.json"
    evaluated = _cxr("evaluate", "--json", str(out), home=home, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert {"auc", "accuracy", "sensitivity", "specificity", "threshold", "n_test"} <= set(metrics)
    # The intervals the report has, as numbers around each figure.
    for name in ("auc", "sensitivity", "specificity", "ppv", "npv"):
        low, high = metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]
        assert low is None or low <= metrics[name] <= high, (name, metrics)
    assert metrics["auc_ci_low"] is not None and metrics["interval_unit"] in ("image", "patient")
    (test_index,) = home.glob("cache/*/test-*.csv")
    manifest_test = pd.read_csv(test_index)
    assert metrics["n_test"] == len(manifest_test)
    assert 0.0 <= metrics["auc"] <= 1.0


def test_ensemble_of_two_runs_then_evaluate_and_export(tiny_synthetic, tmp_path):
    """`cxr ensemble RUN RUN` continues like a training run: evaluate, export, a version whose
    card lists both members; runs that cannot be combined are refused with the reason."""
    home = tmp_path / "home"
    env = {"CXR_IMAGE_SIZE": "64", "CXR_MIN_TEST_AUC": "0", "CXR_MIN_TEST_SENSITIVITY": "0"}
    data = ["--data", str(tiny_synthetic)]
    runs = []
    for _ in range(2):
        trained = _cxr(
            "train", *data, "--arch", "baseline_cnn", "--epochs", "1", home=home, env=env
        )
        assert trained.returncode == 0, trained.stderr[-3000:]
        runs.append(re.search(r"MLflow run (\w+)", trained.stdout).group(1))
        if not runs[1:]:
            unevaluated = _cxr("ensemble", runs[0], runs[0], home=home, env=env)
            assert unevaluated.returncode == 2 and "has no evaluation" in unevaluated.stderr
        assert _cxr("evaluate", home=home, env=env).returncode == 0

    twice = _cxr("ensemble", runs[0], runs[0], home=home, env=env)
    assert twice.returncode == 2 and "named twice" in twice.stderr, twice.stderr
    unknown = _cxr("ensemble", runs[0], "0123456789abcdef", home=home, env=env)
    assert unknown.returncode == 2 and "no trained model of run" in unknown.stderr
    pattern = _cxr("ensemble", runs[0], "*", home=home, env=env)
    assert pattern.returncode == 2 and "is not an MLflow run id" in pattern.stderr
    outside = _cxr("ensemble", *runs, "--name", "../elsewhere", home=home, env=env)
    assert outside.returncode == 2 and "is not a model name" in outside.stderr
    assert "Traceback" not in twice.stderr + unknown.stderr + pattern.stderr

    combined = _cxr("ensemble", *runs, "--tta", "flip", home=home, env=env)
    assert combined.returncode == 0, combined.stderr[-3000:]
    assert "ensemble:baseline_cnn+baseline_cnn: validation AUC" in combined.stdout
    assert all(f"({run})" in combined.stdout for run in runs)
    assert _cxr("evaluate", home=home, env=env).returncode == 0
    exported = _cxr("export", home=home, env=env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    version = re.search(r"version (\d+) \(shadow\)", exported.stdout).group(1)
    card = _cxr("models", "--card", version, home=home, env=env)
    assert "## Ensemble members" in card.stdout and all(run in card.stdout for run in runs)
    listed = json.loads(_cxr("models", "--json", home=home, env=env).stdout)
    assert "ensemble:baseline_cnn+baseline_cnn" in json.dumps(listed)


def test_evaluate_without_a_trained_model_says_what_to_do(tmp_path):
    result = _cxr("evaluate", home=tmp_path / "empty")
    assert result.returncode == 2
    assert "run `cxr train` first" in result.stderr and "Traceback" not in result.stderr


def test_required_pretraining_without_weights_fails_cleanly(tiny_synthetic, tmp_path):
    result = _cxr(
        "train",
        "--data",
        str(tiny_synthetic),
        "--arch",
        "baseline_cnn",
        "--pretrained",
        "required",
        home=tmp_path / "h",
        env={"CXR_IMAGE_SIZE": "64"},
    )
    assert result.returncode == 2
    assert "no ImageNet weights" in result.stderr and "Traceback" not in result.stderr


def test_export_promote_predict_and_roll_back(tiny_synthetic, tmp_path):
    home = tmp_path / "home"
    # 40 patients: the floors would measure noise, so they are off; the gate's relative rule
    # (AUC vs production) still applies.
    env = {
        "CXR_IMAGE_SIZE": "64",
        "CXR_MIN_TEST_AUC": "0",
        "CXR_MIN_TEST_SENSITIVITY": "0",
        "CXR_MIN_TEST_SPECIFICITY": "0",
    }
    trained = _cxr(
        "train",
        "--data",
        str(tiny_synthetic),
        "--arch",
        "baseline_cnn",
        "--epochs",
        "2",
        home=home,
        env=env,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    (checkpoint,) = home.glob("models/baseline_cnn/*/best.pt")
    written = file_sha256(checkpoint)
    assert _cxr("evaluate", home=home, env=env).returncode == 0
    assert file_sha256(checkpoint) == written  # evaluation reads the checkpoint, never rewrites

    nothing = _cxr("predict", str(tiny_synthetic), home=home, env=env)
    assert nothing.returncode == 2 and "no version 'production'" in nothing.stderr

    for expected_version in ("1", "2"):
        exported = _cxr("export", home=home, env=env)
        assert exported.returncode == 0, exported.stderr[-3000:]
        assert f"version {expected_version} (shadow)" in exported.stdout
        # Up to 32 test images; the tiny set's test split is smaller.
        n_test = len(pd.read_csv(next(home.glob("cache/*/test-*.csv"))))
        assert f"parity on {min(32, n_test)} test images" in exported.stdout
        assert "INT8: validation AUC" in exported.stdout  # tried; kept only if AUC holds
        promoted = _cxr("promote", expected_version, home=home, env=env)
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr[-3000:]
        assert f"production -> version {expected_version}" in promoted.stdout

    assert file_sha256(checkpoint) == written  # nor does export, twice over
    listed = {v["version"]: v for v in json.loads(_cxr("models", "--json", home=home).stdout)}
    assert listed["2"]["aliases"] == ["production"]
    assert listed["1"]["aliases"] == ["previous-production"]
    assert listed["2"]["tags"]["cxr.promoted_by"].startswith("cli:")

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    page = tmp_path / "requisition.png"  # a scanned form: the input gate refuses it
    Image.fromarray(np.rint(next(iter(documents())).pixels * 255).astype(np.uint8)).save(page)
    out = tmp_path / "predictions.csv"
    predicted = _cxr(
        "predict",
        str(tiny_synthetic / "NORMAL"),
        str(bad),
        str(page),
        "--out",
        str(out),
        "--site",
        "north",
        home=home,
    )
    assert predicted.returncode == 1  # two files failed; all others were still predicted
    assert "\r" not in predicted.stderr and not PROGRESS_BAR.search(predicted.stderr)  # piped
    rows = pd.read_csv(out, dtype={"model_version": str})
    assert list(rows.columns) == ["path", "probability", "label", "model_version", "error"]
    n_normal = len(list((tiny_synthetic / "NORMAL").iterdir()))
    first_normal = sorted((tiny_synthetic / "NORMAL").iterdir())[0]
    assert len(rows) == n_normal + 2
    refused = rows[rows["path"] == str(page)].iloc[0]
    assert refused["error"].startswith("not_a_chest_radiograph: ")
    assert pd.isna(refused["probability"]) and pd.isna(refused["label"])
    good = rows[rows["error"].isna()]
    assert len(good) == n_normal and set(good["model_version"]) == {"2"}
    assert good["probability"].between(0, 1).all()
    assert set(good["label"]) <= {"NORMAL", "PNEUMONIA"}
    failed = rows[rows["path"] == str(bad)].iloc[0]
    assert pd.isna(failed["probability"]) and failed["error"]
    # Every prediction, and only those, is in the inference log: features, no pixels, no paths.
    from cxr_platform.inference.log import InferenceLog

    logged = InferenceLog(f"sqlite:///{home / 'inference_log.db'}").records()
    assert len(logged) == n_normal and set(logged["source"]) == {"batch"}
    assert set(logged["model_version"]) == {"2"} and logged["request_id"].is_unique
    assert sorted(logged["probability"].round(6)) == sorted(good["probability"].round(6))
    assert logged["intensity_mean"].between(0, 1).all()
    assert not any("path" in column for column in logged.columns)
    refusals = InferenceLog(f"sqlite:///{home / 'inference_log.db'}").refusals()
    assert list(refusals["source"]) == ["batch"]
    assert refused["error"].startswith(f"not_a_chest_radiograph: {refusals.iloc[0].reason}")
    assert set(logged["site"]) == {"north"} and list(refusals["site"]) == ["north"]
    # At a terminal, a folder gets a bar on the terminal; the rows still go to the file.
    on_terminal = tmp_path / "on-terminal.csv"
    code, screen = _cxr_at_terminal(
        "predict", str(tiny_synthetic / "NORMAL"), "--out", str(on_terminal), "--no-log", home=home
    )
    assert code == 0, screen[-2000:]
    assert PROGRESS_BAR.search(screen) and f"{n_normal}/{n_normal} [" in screen, screen
    assert len(pd.read_csv(on_terminal)) == n_normal
    bad_site = _cxr("predict", str(first_normal), "--site", "<north>", home=home)
    assert bad_site.returncode != 0 and "site names are at most 64" in bad_site.stderr

    # Ages for PNG files, which carry none: the version is for children of 1-5 years.
    second_normal = sorted((tiny_synthetic / "NORMAL").iterdir())[1]
    ages = tmp_path / "ages.csv"
    ages.write_text(f"path,patient_age\n{first_normal},045Y\n{second_normal},3\n")
    aged_out = tmp_path / "aged.csv"
    aged = _cxr(
        "predict",
        str(first_normal),
        str(second_normal),
        "--ages",
        str(ages),
        "--out",
        str(aged_out),
        "--no-log",
        home=home,
    )
    assert aged.returncode == 1, aged.stderr[-2000:]  # one refused
    by_path = pd.read_csv(aged_out).set_index("path")
    assert by_path.loc[str(first_normal), "error"] == (
        "outside_intended_use: patient_age: patient age 45 years (caller) is outside this "
        "model's intended use: 1-5 years"
    )
    assert by_path.loc[str(second_normal), "label"] in ("NORMAL", "PNEUMONIA")
    ages.write_text(f"path,patient_age\n{first_normal},4\n{first_normal},5\n")
    twice = _cxr("predict", str(first_normal), "--ages", str(ages), home=home)
    assert twice.returncode == 2 and "named twice" in twice.stderr
    ages.write_text(f"path,patient_age\n{first_normal},old\n")
    unreadable = _cxr("predict", str(first_normal), "--ages", str(ages), home=home)
    assert unreadable.returncode == 2 and "line 2" in unreadable.stderr
    too_old = _cxr(
        "explain",
        str(first_normal),
        "--out",
        str(tmp_path / "o.png"),
        "--patient-age",
        "70",
        home=home,
    )
    assert too_old.returncode == 2 and "outside_intended_use" in too_old.stderr

    overlay = tmp_path / "overlay.png"
    first = sorted((tiny_synthetic / "PNEUMONIA").iterdir())[0]
    explained = _cxr("explain", str(first), "--out", str(overlay), "--model", "1", home=home)
    assert explained.returncode == 0, explained.stderr[-3000:]
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rolled = _cxr("rollback", home=home)
    assert rolled.returncode == 0 and "production -> version 1" in rolled.stdout
    again = _cxr("rollback", home=home)
    assert again.returncode == 2 and "replaced no earlier version" in again.stderr

    import dagster as dg

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        events = instance.fetch_materializations(dg.AssetKey("production_model"), limit=10)
        actions = sorted(e.asset_materialization.metadata["action"].value for e in events.records)
        assert actions == ["promoted", "promoted", "rollback"]


def test_simulate_drift_against_no_service_fails_with_a_message(tmp_path):
    result = _cxr(
        "simulate-drift",
        "--shift",
        "noise",
        "--n",
        "3",
        "--seed",
        "5",
        "--url",
        "http://127.0.0.1:9",
        home=tmp_path / "home",
        env={},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "answered none of 3 requests" in result.stderr
    refused = _cxr("simulate-drift", "--shift", "fog", home=tmp_path / "home", env={})
    assert refused.returncode == 2 and "fog" in refused.stderr


def test_simulate_drift_from_a_folder_too_small_for_n_says_so(tiny_synthetic, tmp_path):
    result = _cxr(
        "simulate-drift",
        "--shift",
        "blur",
        "--n",
        "5000",
        "--source",
        str(tiny_synthetic),
        home=tmp_path / "home",
        env={},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "5000 were asked for" in result.stderr


# `cxr demo` on the tiny synthetic folder: one small model, released whatever its figures.
SMALL_DEMO = {
    "CXR_IMAGE_SIZE": "64",
    "CXR_MODELS": "baseline_cnn",
    "CXR_MIN_TEST_AUC": "0",
    "CXR_MIN_TEST_SENSITIVITY": "0",
    "CXR_MIN_TEST_SPECIFICITY": "0",
}
EPOCH_LINE = re.compile(
    r"baseline_cnn epoch (\d+)/(\d+) \(finetune\): train loss [\d.]+, val loss [\d.]+, "
    r"val AUC [\d.]+.*; [\d.]+ img/s, \d+ s; (?:at most .+ left|last epoch)"
)


def test_demo_without_a_terminal_still_says_how_training_goes_one_line_per_epoch(
    tiny_synthetic, tmp_path
):
    """CI logs and nohup: no bar, no carriage return, but each epoch's line as it finishes."""
    env = SMALL_DEMO
    done = _cxr("demo", "--data", str(tiny_synthetic), "--no-loop", home=tmp_path / "h", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = EPOCH_LINE.findall(done.stderr)
    assert epochs and epochs[0][0] == "1", done.stderr[-3000:]
    assert [int(n) for n, _ in epochs] == list(range(1, len(epochs) + 1))  # each once, in order
    assert "\r" not in done.stderr + done.stdout


def test_demo_on_a_folder_shows_epoch_progress_on_the_terminal_and_in_the_run_log(
    tiny_synthetic, tmp_path
):
    import dagster as dg

    home = tmp_path / "home"
    env = SMALL_DEMO
    code, screen = _cxr_at_terminal(
        "demo", "--data", str(tiny_synthetic), "--no-loop", home=home, env=env
    )
    assert code == 0, screen[-3000:]
    # A bar while an epoch trains (redrawn in place), then the epoch's line above it.
    assert PROGRESS_BAR.search(screen), screen[-3000:]
    assert "\r" in screen
    epoch_line = EPOCH_LINE
    on_screen = epoch_line.findall(screen)
    assert on_screen and on_screen[0][0] == "1", screen[-3000:]

    # The same lines, one per epoch, in the run's log as the Dagster UI shows it.
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        (run,) = instance.get_runs()
        messages = [
            event.user_message
            for event in instance.all_logs(run.run_id)
            if event.user_message and event.step_key and "trained_model" in event.step_key
        ]
        in_log = [m for m in messages if epoch_line.search(m)]
        trained = instance.get_latest_materialization_event(
            dg.AssetKey(["baseline_cnn", "trained_model"])
        ).asset_materialization.metadata
    assert len(in_log) == trained["epochs_run"].value == len(on_screen), messages
    assert "last epoch" in in_log[-1] or trained["stopped_early"].value

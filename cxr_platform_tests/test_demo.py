"""`cxr demo` once (the ``demo`` fixture), then what its users look at afterwards: the Dagster
instance, a model card for every version it registered, and the Dagster UI in a real browser.

The tests share the demo's home and run in this file's order (the UI test, which launches a run,
last); test_readme.py runs the README's commands over a demo home of its own.
"""

from __future__ import annotations

import json
import re

import dagster as dg

from cxr_platform.defs.definitions import build_definitions
from cxr_platform.deployment.registry import lung_registry_for, registry_for
from cxr_platform.model_version.lung_fields import LungFieldModel
from cxr_platform.models.checkpoint import file_sha256
from cxr_platform_tests.browser import (
    chromium,
    click_button,
    dagster_dev,
    require_chromium,
    screenshot_folder,
    wait_for,
)


def test_demo_runs_through_a_persistent_dagster_instance(demo):
    stdout = demo.result.stdout
    assert "no_patient_leakage: PASS" in stdout
    assert "resnet18/evaluation_report:test_auc_floor: PASS" in stdout
    assert "Test split (threshold chosen on validation)" in stdout
    assert "baseline_cnn" in stdout and "resnet18" in stdout
    for arch in ("baseline_cnn", "resnet18"):
        assert f"{arch}/exported_model:parity: PASS" in stdout
        assert f"{arch}/gradcam_gallery:randomization_sanity:" in stdout
    assert "production_model:promotion_gate:" in stdout
    assert "Grad-CAM checks" in stdout and "Registry cxr-pneumonia-classifier" in stdout

    with dg.DagsterInstance.from_config(str(demo.instance_dir)) as instance:
        runs = instance.get_runs()
        jobs = [run.job_name for run in runs]
        assert jobs.count("train_and_release") == 1
        for key in ("preprocessed_cache", "registered_model_version", "production_model"):
            assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None
        promoted = instance.get_latest_materialization_event(dg.AssetKey("production_model"))
        production = promoted.asset_materialization.metadata["production_version"].value
        bento = instance.get_latest_materialization_event(dg.AssetKey("bento"))
        # Artifacts are written once: every checkpoint is, after the whole job (evaluation,
        # Grad-CAM, export, registration, gate), the file its training step recorded.
        for arch in ("baseline_cnn", "resnet18"):
            trained = instance.get_latest_materialization_event(
                dg.AssetKey([arch, "trained_model"])
            ).asset_materialization.metadata
            recorded = trained["checkpoint_sha256"].value
            assert len(recorded) == 64
            shown = trained["checkpoint"].value
            assert shown.startswith("$CXR_HOME/models/"), shown  # the same on every machine
            assert file_sha256(demo.home_file(shown)) == recorded, arch
            assert trained["best_val_auc"].value == round(trained["best_val_auc"].value, 3)
            # Its evaluation report, after the monitoring loop (which trains and evaluates a
            # fine-tune of the same architecture), still holds its own figures.
            evaluated = instance.get_latest_materialization_event(
                dg.AssetKey([arch, "evaluation_report"])
            ).asset_materialization.metadata
            report = json.loads(demo.home_file(evaluated["json"].value).read_text())
            assert report["checkpoint_sha256"] == recorded, arch
            assert round(report["splits"]["test"]["auc"], 3) == evaluated["test_auc"].value
    versions = json.loads(demo.cxr("models", "--json").stdout)
    assert {v["tags"]["cxr.arch"] for v in versions} == {"baseline_cnn", "resnet18"}
    if production != "none":  # the gate promoted: the service can start, and a Bento exists
        assert "cxr serve --port 3100" in stdout
        assert "curl -F file=@image.png http://127.0.0.1:3100/predict" in stdout
        # Then the monitoring loop: two windows of traffic through the live service, each
        # judged by the drift sensor and reported by a drift_check run in the same instance.
        assert "Monitoring loop (100-record drift windows" in stdout
        assert stdout.count("drift_sensor: ") == 2, stdout[-3000:]
        assert jobs.count("drift_check") == 2
        # 100 answers each; the input gate may refuse a spare image or two of so small a set.
        assert re.search(r"100/10\d none images", stdout), stdout[-3000:]
        assert re.search(r"100/10\d contrast images", stdout), stdout[-3000:]
        assert (
            bento is not None
            and f"bentoml serve {bento.asset_materialization.metadata['bento'].value}" in stdout
        )


def test_every_version_the_demo_registers_has_a_model_card(demo):
    registry = registry_for(demo.settings().registry)
    versions = registry.versions()
    assert len(versions) >= 2  # one per architecture, plus the loop's fine-tune when it ran
    for info in versions:
        shown = demo.cxr("models", "--card", info.version)
        assert shown.returncode == 0, shown.stderr[-2000:]
        card = shown.stdout
        assert card.startswith(f"# Model card: {registry.name} version {info.version}")
        # The figures are the version's own, with their intervals.
        test_auc = info.metrics["test_auc"]
        low, high = info.metrics["test_auc_ci_low"], info.metrics["test_auc_ci_high"]
        assert f"| ROC AUC | {test_auc:.3f} ({low:.3f}-{high:.3f}) |" in card, card
        assert "resampled by patient" in card
        assert f"`{info.release.data_version}`" in card
        assert "Evaluated on synthetic images only" in card
        gate = info.release.input_gate
        assert gate and f"{gate['val_refused']} of {gate['n_val']}" in card
        if info.release.finetuned_from:
            assert f"| fine-tuned from version | {info.release.finetuned_from} |" in card
            assert "| why it was fine-tuned | DRIFT" in card
        else:
            assert "| profile | demo |" in card
        page = demo.cxr("models", "--card", info.version, "--html")
        assert (
            page.stdout.startswith("<!DOCTYPE html>")
            and "<h2>Known limitations</h2>" in page.stdout
        )
    # The Dagster asset that registered the architectures shows each one's card.
    with dg.DagsterInstance.from_config(str(demo.instance_dir)) as instance:
        registered = instance.get_latest_materialization_event(
            dg.AssetKey("registered_model_version")
        ).asset_materialization.metadata
    by_arch = json.loads(demo.cxr("models", "--json").stdout)
    for version in by_arch:
        arch = version["tags"]["cxr.arch"]
        if version["tags"].get("cxr.finetuned_from"):
            continue
        assert registered[f"model_card_{arch}"].md_str == registry.card(version["version"])


def test_the_demo_registers_a_lung_fields_version_that_explanations_measure_against(demo, tmp_path):
    lungs = lung_registry_for(demo.settings().registry)
    info = lungs.get("production")
    card = lungs.card(info.version)
    assert card.startswith(f"# Model card: {lungs.name} version {info.version}")
    assert "the synthetic demo set" in card and "Passed: promoted to production" in card
    carried = LungFieldModel(lungs.download(info.version), model_version=info.version)
    assert carried.limits is not None and carried.limits.fitted_on["split"] == "val"

    # `cxr models --lung-fields` lists it (and its card) beside the classifiers' list.
    listed = demo.cxr("models", "--lung-fields")
    assert listed.returncode == 0, listed.stderr[-2000:]
    row = next(line for line in listed.stdout.splitlines() if line.split()[0] == info.version)
    assert "production" in row and "passed" in row
    assert f"{info.metrics['test_dice_mean']:.3f}" in row
    as_json = json.loads(demo.cxr("models", "--lung-fields", "--json").stdout)
    assert [v["name"] for v in as_json] == [lungs.name] * len(as_json)
    assert (
        demo.cxr("models", "--lung-fields", "--card", info.version).stdout.strip() == card.strip()
    )
    assert f"lung fields: version {info.version} in production" in demo.cxr("models").stdout

    radiograph = sorted((demo.home / "datasets").glob("synthetic-*/NORMAL/*.png"))[0]
    # Each classifier's heatmaps measured against the fields on the test split.
    with dg.DagsterInstance.from_config(str(demo.instance_dir)) as instance:
        for arch in ("baseline_cnn", "resnet18"):
            measured = instance.get_latest_materialization_event(
                dg.AssetKey([arch, "relevance_in_lungs"])
            ).asset_materialization.metadata
            assert 0.0 <= measured["median_share_in_lungs"].value <= 1.0
            assert "data:image/png;base64," in measured["least_in_lungs"].value
            assert "data:image/png;base64," in measured["gallery_on_lungs"].value

    explained = demo.cxr("explain", str(radiograph), "--out", str(tmp_path / "overlay.png"))
    assert explained.returncode == 0, explained.stderr[-2000:]
    assert re.search(
        rf"lung fields v{info.version}: \d+% of the heatmap lies on the lungs", explained.stdout
    ), explained.stdout


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _open(driver, url: str, expected: str, timeout_s: float = 60) -> str:
    """Load ``url`` and wait until the page shows ``expected`` (the UI renders after load)."""
    driver.get(url)

    def shown() -> str | None:
        text = _text(driver)
        return text if expected in text else None

    return wait_for(shown, timeout_s, f"{expected!r} on {url}")


def _asset_path(key: dg.AssetKey) -> str:
    return "/".join(key.path)


def _value_after(text: str, label: str) -> str:
    """In a metadata table rendered as text: the first value line after the label's line."""
    lines = [line.strip() for line in text.splitlines()]
    index = lines.index(label)
    for line in lines[index + 1 :]:
        if line and not re.fullmatch(r"[A-Z][a-z]{2} \d+, \d+:\d\d [AP]M", line):
            return line
    raise AssertionError(f"no value after {label!r}")


def test_evaluating_the_latest_model_again_leaves_every_other_report_as_it_was(demo):
    """After the loop the latest trained model is its fine-tune; `cxr evaluate` then writes that
    checkpoint's report in its own folder, never over the report of the model training made."""
    folder = demo.home / "reports" / "evaluation"
    before = {path: path.read_bytes() for path in folder.glob("*/*/evaluation.json")}
    evaluated = demo.cxr("evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    latest = json.loads((demo.home / "models" / "latest.json").read_text())
    own = folder / latest["model_name"] / latest["checkpoint_sha256"][:16] / "evaluation.json"
    assert json.loads(own.read_text())["checkpoint_sha256"] == latest["checkpoint_sha256"]
    for path, content in before.items():
        if path != own:
            assert path.read_bytes() == content, path


def test_the_dagster_ui_shows_the_demo_and_launches_a_materialization(demo):
    require_chromium()

    shots = screenshot_folder()
    print(f"Dagster UI screenshots: {shots}")
    definitions = build_definitions(demo.settings())
    graph = definitions.get_repository_def().asset_graph
    with dg.DagsterInstance.from_config(str(demo.instance_dir)) as instance:
        materialized = {
            key
            for key in graph.get_all_asset_keys()
            if instance.get_latest_materialization_event(key) is not None
            or instance.get_materialized_partitions(key)
        }
        checks = {
            key: evaluation
            for key in graph.asset_check_keys
            if (
                evaluation := instance.event_log_storage.get_latest_asset_check_execution_by_key(
                    [key]
                ).get(key)
            )
            is not None
        }
    release_assets = {
        key
        for key in graph.get_all_asset_keys()
        if graph.get(key).group_name
        in {"data", "training", "segmentation", "explainability", "deployment"}
    }
    # The synthetic set draws its lungs, so the demo trains and exports a segmenter too.
    assert dg.AssetKey("lung_segmenter_onnx") in release_assets
    assert release_assets <= materialized, "the demo's release job materializes all of these"

    env = {**demo.env, "DAGSTER_HOME": str(demo.instance_dir)}
    with dagster_dev(env, shots / "dagster-dev.log") as base, chromium() as driver:
        driver.get(f"{base}/")
        # A first visit meets Dagster's community dialog; a person skips it.
        try:
            wait_for(lambda: "Skip" in _text(driver), 20, "the first-visit dialog")
            driver.save_screenshot(str(shots / "00-first-visit.png"))
            click_button(driver, "Skip", 20)
        except AssertionError:
            pass  # this Dagster shows none, or it was dismissed here before

        # The catalog lists every asset, each as materialized as the instance says.
        catalog = _open(driver, f"{base}/assets", "training")
        wait_for(lambda: "preprocessed_cache" in _text(driver), 60, "the asset rows")
        # Each row's status arrives after the row itself.
        wait_for(lambda: "Loading..." not in _text(driver), 60, "every asset's status")
        catalog = _text(driver)
        driver.save_screenshot(str(shots / "01-catalog.png"))
        lines = [line.strip() for line in catalog.splitlines()]
        for key in graph.get_all_asset_keys():
            shown = " / ".join(key.path)
            assert shown in lines, f"{shown} not in the catalog ({shots})"
            row = lines[lines.index(shown) : lines.index(shown) + 8]
            if key in materialized and not graph.get(key).is_partitioned:
                assert "Materialized" in row, f"{shown}: {row} ({shots})"

        # Every check of every asset is listed on its asset's page, with the instance's verdict.
        for asset_key in {key.asset_key for key in graph.asset_check_keys}:
            own = [key for key in graph.asset_check_keys if key.asset_key == asset_key]
            expected = {
                key.name: {"Succeeded"}
                if checks[key].event.dagster_event.event_specific_data.passed
                else {"Failed", "Warning"}
                for key in own
                if key in checks  # not site_gate: the demo never recalibrates for a site
            }
            url = f"{base}/assets/{_asset_path(asset_key)}?view=checks"
            page = _open(driver, url, f"Checks ({len(own)})")

            def verdicts(expected=expected) -> dict[str, str] | None:
                page = _text(driver)
                shown = {name: _value_after(page, name) for name in expected}
                settled = all(value not in {"Execute", "Loading..."} for value in shown.values())
                return shown if settled else None

            shown = wait_for(verdicts, 30, f"the verdicts on {url}") if expected else {}
            page = _text(driver)
            for key in own:
                assert key.name in page, f"{key.name} ({shots})"
            for name, allowed in expected.items():
                assert shown[name] in allowed, (asset_key, name, shown[name], shots)
        driver.save_screenshot(str(shots / "02-checks.png"))

        # An evaluation report's AUC, as a reviewer reads it.
        report_key = dg.AssetKey(["resnet18", "evaluation_report"])
        events = _open(driver, f"{base}/assets/{_asset_path(report_key)}?view=events", "test_auc")
        driver.save_screenshot(str(shots / "03-evaluation-report.png"))
        shown_auc = float(_value_after(events, "test_auc"))
        with dg.DagsterInstance.from_config(str(demo.instance_dir)) as instance:
            shown_json = (
                instance.get_latest_materialization_event(report_key)
                .asset_materialization.metadata["json"]
                .value
            )
        assert re.fullmatch(
            r"\$CXR_HOME/reports/evaluation/resnet18/[0-9a-f]{16}/evaluation.json", shown_json
        )
        measured = json.loads(demo.home_file(shown_json).read_text())["splits"]["test"]["auc"]
        assert shown_auc == round(measured, 3), (shown_auc, measured)
        assert shown_json in events

        # Launch a materialization from the UI, as a person does, and see it succeed.
        target = dg.AssetKey("data_profile")
        _open(driver, f"{base}/assets/data_profile", "Materialize")
        with dg.DagsterInstance.from_config(str(demo.instance_dir)) as instance:
            before = {run.run_id for run in instance.get_runs()}
        click_button(driver, "Materialize", 30)

        def launched_run():
            # The daemon's sensors may start runs of their own meanwhile: ours is data_profile's.
            with dg.DagsterInstance.from_config(str(demo.instance_dir)) as instance:
                new = [
                    run
                    for run in instance.get_runs()
                    if run.run_id not in before and run.asset_selection == {target}
                ]
                return new[0] if new else None

        run = wait_for(launched_run, 60, "a run launched from the UI")
        driver.save_screenshot(str(shots / "04-launched.png"))
        _open(driver, f"{base}/runs/{run.run_id}", "data_profile")

        def finished():
            with dg.DagsterInstance.from_config(str(demo.instance_dir)) as instance:
                status = instance.get_run_by_id(run.run_id).status
            done = {
                dg.DagsterRunStatus.SUCCESS,
                dg.DagsterRunStatus.FAILURE,
                dg.DagsterRunStatus.CANCELED,
            }
            return status if status in done else None

        status = wait_for(finished, 300, f"run {run.run_id} to finish")
        assert status == dg.DagsterRunStatus.SUCCESS, f"{status} ({shots})"
        page = _open(driver, f"{base}/runs/{run.run_id}", "Success")
        driver.save_screenshot(str(shots / "05-run-succeeded.png"))
        events = _open(driver, f"{base}/assets/data_profile?view=events", run.run_id[:8])
        driver.save_screenshot(str(shots / "06-new-materialization.png"))
        assert "Materialized in run" in events and "n_images" in events

"""The monitoring loop end to end: a real Dagster instance, the real service over HTTP, the
sensors evaluated with their cursors and the runs they request executed in that instance.

One trained home serves every test here (training is the slow part), so they share a group.
"""

from __future__ import annotations

import json

import dagster as dg
import pytest

from cxr_platform.data.shifts import SHIFT_NAMES
from cxr_platform.defs.definitions import RELEASE_JOB, build_definitions
from cxr_platform.defs.monitoring_assets import (
    DRIFT_SENSOR,
    DRIFT_WINDOWS,
    EVALUATE_SHADOW_JOB,
    FINE_TUNE_JOB,
    SHADOW_SENSOR,
    initial_drift_cursor,
)
from cxr_platform.demo.loop import run_monitoring_loop, tick_sensor
from cxr_platform.demo.traffic import send_traffic, synthetic_traffic
from cxr_platform.deployment.registry import PRODUCTION, SHADOW, registry_for
from cxr_platform.inference.log import InferenceLog
from cxr_platform.inference.retained import RetainedInputs
from cxr_platform.monitoring.windows import DriftCursor, drift_sensor_step, shadow_sensor_step
from cxr_platform.serving.process import ServiceProcess
from cxr_platform.settings import load_settings

WINDOW = 50
FALSE_ALARM_WINDOWS = 20


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory):
    """The release job on a small synthetic set: production model with its drift reference."""
    home = tmp_path_factory.mktemp("loop") / "home"
    overrides = dict(
        home=home,
        # Enough patients that the test split's specificity (what the live specificity is held
        # to) is not an overestimate from a dozen negatives.
        synthetic_patients=240,
        image_size=96,
        workers=2,
        training_profile="demo",
        device="cpu",
        models=("baseline_cnn",),
        drift_window_size=WINDOW,
        shadow_min_records=WINDOW,
        finetune_epochs=2,
        min_test_auc=0.5,
        min_test_sensitivity=0.5,
        min_test_specificity=0.0,
        # The candidate is judged on ~40 test images; what is tested here is the loop, so
        # the allowed AUC drop covers that split's noise.
        gate_max_auc_drop=0.05,
    )
    settings = load_settings(**overrides)
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions(settings)
    result = defs.resolve_job_def(RELEASE_JOB).execute_in_process(
        instance=instance, raise_on_error=False
    )
    assert result.success
    assert registry_for(settings.registry).find(PRODUCTION) is not None, (
        "the first model was not promoted"
    )
    return settings, instance, defs, overrides


def test_no_production_and_too_few_records_are_skips_that_say_why(tmp_path):
    settings = load_settings(home=tmp_path / "empty")
    step = drift_sensor_step(settings.monitoring, registry_for(settings.registry), DriftCursor())
    assert step.skip_reason == "no production model: nothing to monitor"
    assert (
        shadow_sensor_step(settings.monitoring, registry_for(settings.registry), None).skip_reason
        == "no shadow model"
    )
    # The same through Dagster's own tick evaluation of the sensor definitions.
    defs, instance = build_definitions(settings), dg.DagsterInstance.ephemeral()
    tick = tick_sensor(defs, instance, DRIFT_SENSOR, None)
    assert tick.runs == [] and tick.skip_reason == "no production model: nothing to monitor"
    assert DriftCursor.from_json(tick.cursor) == DriftCursor()
    tick = tick_sensor(defs, instance, SHADOW_SENSOR, None)
    assert tick.runs == [] and tick.skip_reason == "no shadow model"


def test_in_distribution_traffic_rarely_alarms_and_every_shift_is_detected(trained_home, tmp_path):
    """At least 20 in-distribution windows through the service: the drift rule may fire at
    most once. Then one window of each shift: every one fires."""
    settings, _, _, overrides = trained_home
    log_url = f"sqlite:///{tmp_path / 'false_alarms.db'}"
    scoped = load_settings(**{**overrides, "inference_log_url": log_url})
    env = {"CXR_HOME": str(settings.home), "CXR_INFERENCE_LOG_URL": log_url}
    fired, windows = [], 0
    wanted = WINDOW * FALSE_ALARM_WINDOWS
    with ServiceProcess(env=env, log_path=tmp_path / "service.log") as service:
        # Spare images: the input gate may refuse a few in-distribution ones (at most 1%).
        images = synthetic_traffic(scoped.data, wanted + wanted // 50, seed=4242)
        sent = send_traffic(service.url, images, seed=1, stop_after_answers=wanted)
        assert sent.answered == wanted, sent.summary()
        assert set(sent.failed) <= {"not_a_chest_radiograph"}, sent.summary()
        assert sum(sent.failed.values()) <= 0.01 * sent.sent, sent.summary()
        cursor = DriftCursor()
        while True:
            step = drift_sensor_step(scoped.monitoring, registry_for(scoped.registry), cursor)
            if step.result is None:
                assert "a drift window needs 50" in step.skip_reason
                break
            windows += 1
            cursor = step.cursor
            if step.result.fired:
                fired.append(step.result.summary())
        assert windows == FALSE_ALARM_WINDOWS
        assert len(fired) <= 1, fired

        shifted = synthetic_traffic(scoped.data, WINDOW + WINDOW // 5, seed=4343)
        # Inverted polarity is not an acquisition shift to adapt to: the input gate refuses
        # every such image, so no diagnosis (and no drift window) comes of it.
        inverted = send_traffic(service.url, shifted[:WINDOW], shift="invert", seed=2)
        assert inverted.answered == 0 and inverted.failed == {"not_a_chest_radiograph": WINDOW}
        # A six-fold downsample leaves these ~290-pixel images at ~45 pixels: too small to read,
        # and refused as such. Full exposure burns out a fifth of a synthetic image (its body
        # is bright), and the gate refuses most (13% of real test radiographs, benchmarks/
        # RESULTS.md). Half those severities are shifts to detect.
        tiny = send_traffic(service.url, shifted[:10], shift="resolution", seed=2)
        assert tiny.failed["not_a_chest_radiograph"] >= 5, tiny.summary()
        severities = {"resolution": 0.5, "exposure": 0.5}
        for shift in [name for name in SHIFT_NAMES[1:] if name != "invert"]:
            sent = send_traffic(
                service.url,
                shifted,
                shift=shift,
                severity=severities.get(shift, 1.0),
                seed=2,
                stop_after_answers=WINDOW,
            )
            assert sent.answered == WINDOW, sent.summary()
            step = drift_sensor_step(scoped.monitoring, registry_for(scoped.registry), cursor)
            cursor = step.cursor
            assert step.result is not None and step.result.fired, (shift, step.result.summary())
            if not fired:  # a fine-tune is requested once; later windows are in cool-down
                assert step.request_finetune == (shift == "contrast"), (shift, step.finetune_note)


def test_shifted_traffic_fine_tunes_a_shadow_that_the_gate_promotes(trained_home):
    settings, instance, defs, _ = trained_home
    registry = registry_for(settings.registry)
    before = registry.get(PRODUCTION).version
    lines: list[str] = []
    report = run_monitoring_loop(settings, defs, instance, shift="contrast", echo=lines.append)
    text = "\n".join(lines)

    # In-distribution first: a window, a report, no fine-tune.
    assert "drift_sensor: no drift" in text, text
    # Then the shifted window fires, and the fine-tune registers a shadow.
    assert report.fired_window is not None and report.fired_window.startswith("ids-"), text
    shadow = report.shadow_version
    assert shadow is not None and int(shadow) > int(before)
    candidate = registry.get(shadow)
    assert candidate.tags["cxr.finetuned_from"] == before
    assert report.fired_window in candidate.tags["cxr.finetune_reason"]  # why it was trained
    # Everything labeled before the fine-tune started was training data: both windows.
    assert int(candidate.tags["cxr.labeled_examples"]) == 2 * WINDOW
    # The shadow scored live traffic, the gate decided, production moved and is served.
    assert report.promoted is True, text
    assert registry.get(PRODUCTION).version == shadow
    assert registry.aliases().get("previous-production") == before
    assert SHADOW not in registry.aliases()
    # The loop waited for the service's GET /model to show the new version.
    assert f"service now answers with production version {shadow}" in text

    # Recorded: the registry event with the gate and live evidence, the decision file, the
    # drift report partitions and files, the labeled store.
    promoted = [e for e in registry.events() if e.action == "promoted" and e.version == shadow]
    live = promoted[-1].details["gate"]["evaluated_on"]["live_shadow_traffic"]
    assert live["n_scored"] >= WINDOW and live["n_labeled"] >= WINDOW
    assert 0 <= live["agreement_rate"] <= 1
    decisions = list(
        (settings.monitoring.reports_dir / "shadow_evaluations").glob(f"v{shadow}-*.json")
    )
    assert json.loads(decisions[0].read_text())["promoted"] is True
    partitions = instance.get_dynamic_partitions(DRIFT_WINDOWS.name)
    assert len(partitions) == 2 and report.fired_window in partitions
    fired_report = settings.monitoring.drift_reports_dir / report.fired_window
    assert json.loads((fired_report / "drift.json").read_text())["fired"] is True
    assert (fired_report / "drift_report.html").stat().st_size > 10_000
    assert len(RetainedInputs(settings.monitoring.retained_dir).labeled_ids()) >= 3 * WINDOW

    # A daemon started without the loop's cursor resumes after the newest judged window.
    assert initial_drift_cursor(instance).last_id == 2 * WINDOW
    # The sensors pick up where they stopped: too few new records, no shadow left.
    log = InferenceLog(settings.monitoring.inference_log_uri)
    last_id = int(log.records()["id"].max())
    log.dispose()
    cursor = DriftCursor(last_id=last_id - 10).to_json()
    tick = tick_sensor(defs, instance, DRIFT_SENSOR, cursor)
    assert tick.runs == [] and tick.skip_reason.startswith("10 new inference records")
    tick = tick_sensor(defs, instance, SHADOW_SENSOR, None)
    assert tick.runs == [] and tick.skip_reason == "no shadow model"


def test_a_worse_candidate_is_refused_and_production_stays(trained_home):
    settings, instance, _, overrides = trained_home
    registry = registry_for(settings.registry)
    production = registry.get(PRODUCTION).version
    # A candidate made worse on purpose: fine-tuned at 500 times the rate, it loses what it
    # knew, and the synthetic set is now easy enough that a good one can score AUC 1.0.
    reckless = load_settings(**{**overrides, "finetune_lr": 0.05})
    finetune = (
        build_definitions(reckless)
        .resolve_job_def(FINE_TUNE_JOB)
        .execute_in_process(instance=instance, raise_on_error=False)
    )
    assert finetune.success
    candidate = registry.get(SHADOW).version
    # And a gate it cannot clear.
    strict = load_settings(**{**overrides, "min_test_auc": 0.9999})
    evaluation = (
        build_definitions(strict)
        .resolve_job_def(EVALUATE_SHADOW_JOB)
        .execute_in_process(instance=instance, raise_on_error=False)
    )
    assert evaluation.success  # a refusal is the gate working
    outcome = evaluation.output_for_node("shadow_evaluation")
    assert outcome["promoted"] is False
    assert "auc_floor" in [c["name"] for c in outcome["decision"]["checks"] if not c["passed"]]
    assert registry.get(PRODUCTION).version == production
    assert SHADOW not in registry.aliases()  # the service stops scoring a refused candidate
    refused = [e for e in registry.events() if e.action == "refused"]
    assert refused[-1].version == candidate and refused[-1].previous_version == production
    assert registry.get(candidate).tags["cxr.refused_at"]

"""Group "monitoring": drift reports per window, the fine-tune job, shadow evaluation, and the
sensors and schedule that close the loop.

- ``drift_sensor`` cuts the inference log into windows (its cursor is the last row judged),
  asks for a ``drift_check`` run per window and for ``fine_tune`` when the drift rule fires;
- ``fine_tune``: ``finetuned_model`` -> ``shadow_candidate`` (registered with alias shadow);
- ``shadow_sensor`` asks for ``evaluate_shadow`` once the shadow has scored enough traffic;
- ``daily_drift_report`` reports yesterday's traffic even when nothing triggered.

The logic lives in :mod:`cxr_platform.monitoring`; these definitions translate it for Dagster.
"""
# No `from __future__ import annotations`: Dagster inspects these annotations at runtime.

from typing import Any

import dagster as dg

from cxr_platform.calibration.refit import NotEnoughLabelsError
from cxr_platform.calibration.site import SiteRecalibrationError, recalibrate_for_site
from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.defs.deployment_assets import gate_checks_markdown
from cxr_platform.defs.metadata import home_path, readable
from cxr_platform.defs.resources import PlatformSettings
from cxr_platform.deployment.registry import registry_for
from cxr_platform.monitoring.drift import (
    DriftResult,
    acquisition_markdown,
    save_drift_report,
    sites_markdown,
)
from cxr_platform.monitoring.finetune import (
    FineTuneResult,
    finetune_production,
    register_finetuned,
)
from cxr_platform.monitoring.shadow import evaluate_shadow
from cxr_platform.monitoring.windows import (
    DriftCursor,
    DriftStep,
    WindowJudgement,
    check_window_versions,
    day_window,
    drift_sensor_step,
    previous_utc_day,
    read_window,
    shadow_sensor_step,
)
from cxr_platform.sections import MonitoringSection
from cxr_platform.terminal import interactive

GROUP = "monitoring"
DRIFT_WINDOWS = dg.DynamicPartitionsDefinition(name="drift_windows")
DRIFT_CHECK_JOB = "drift_check"
RECALIBRATE_JOB = "recalibrate_for_site"
FINE_TUNE_JOB = "fine_tune"
EVALUATE_SHADOW_JOB = "evaluate_shadow"
DRIFT_SENSOR = "drift_sensor"
SHADOW_SENSOR = "shadow_sensor"
DAILY_SCHEDULE = "daily_drift_report"


def drift_metadata(result: DriftResult) -> dict[str, Any]:
    performance = result.performance
    table = "| feature | K-S p-value | drifted |\n| --- | ---: | --- |\n" + "\n".join(
        f"| {name} | {p:.3g} | {'yes' if name in result.drifted_features else ''} |"
        for name, p in result.feature_p_values.items()
    )
    return {
        "fired": result.fired,
        "summary": result.summary(),
        "model_version": result.model_version or "",
        "n_records": result.n_records,
        "n_compared": result.n_compared,
        "input_drift": result.input_drift,
        "drift_share": result.drift_share,
        "drifted_features": ", ".join(result.drifted_features) or "none",
        "features": dg.MetadataValue.md(table),
        "prediction_drift": result.prediction_drift,
        "probability_ks_p_value": result.probability_p_value,
        "positive_rate": result.positive_rate,
        "reference_positive_rate": result.reference_positive_rate,
        **(
            {"estimated_prevalence": result.estimated_prevalence}
            if result.estimated_prevalence is not None
            else {}
        ),
        "performance_drift": result.performance_drift,
        "n_labeled": performance.n_labeled,
        **({"labeled_auc": performance.auc} if performance.auc is not None else {}),
        **(
            {"labeled_sensitivity": performance.sensitivity}
            if performance.sensitivity is not None
            else {}
        ),
        **(
            {"labeled_specificity": performance.specificity}
            if performance.specificity is not None
            else {}
        ),
        "performance_failed": ", ".join(performance.failed) or "none",
        "intervals_resample": f"{performance.interval_unit}s",
        "sites_failed": "; ".join(
            f"{site}: {', '.join(failed)}" for site, failed in result.failed_sites.items()
        )
        or "none",
        **(
            {
                "explained_records": result.lung_relevance.n_explained,
                "relevance_in_lungs_median": result.lung_relevance.median,
                "explained_mostly_off_the_lungs": result.lung_relevance.mostly_outside,
            }
            if result.lung_relevance is not None
            else {}
        ),
        "sites": dg.MetadataValue.md(sites_markdown(result)),
        "acquisition": dg.MetadataValue.md(acquisition_markdown(result)),
        "rule": dg.MetadataValue.json(result.rule.to_dict()),
    }


@dg.asset(
    group_name=GROUP,
    kinds={"evidently"},
    partitions_def=DRIFT_WINDOWS,
    description="Evidently drift report of one window of the inference log (ids-<first>-<last> "
    "from the drift sensor, day-<date> from the daily schedule) against the reference stored "
    "with the model version that scored it: input, prediction and performance drift.",
)
def drift_report(context: dg.AssetExecutionContext, platform: PlatformSettings):
    settings = platform.settings()
    key = context.partition_key
    judged = check_window_versions(settings.monitoring, key, registry_for(settings.registry))
    result = judged.primary
    folder = settings.monitoring.drift_reports_dir / key
    files = save_drift_report(result, folder)
    # Every other version that served rows of the window (a site's own, one replaced during
    # it) has its own report beside the main one.
    for other in judged.results[1:]:
        save_drift_report(other, folder / f"v{other.model_version}")
    context.log.info("; ".join(r.summary() for r in judged.results))
    return dg.Output(
        [r.to_dict() for r in judged.results],
        metadata=readable(
            {
                **drift_metadata(result),
                "versions": dg.MetadataValue.md(versions_markdown(judged)),
                # Evidently's own report, with its distribution plots: open it in a browser.
                "evidently_report": home_path(files["html"], settings.monitoring.home)
                if "html" in files
                else "none (no reference to compare with)",
                "json": home_path(files["json"], settings.monitoring.home),
            }
        ),
    )


def versions_markdown(judged: WindowJudgement) -> str:
    lines = ["| version | records | verdict |", "| --- | ---: | --- |"]
    for result in judged.results:
        lines.append(
            f"| {result.model_version} | {result.n_compared} | "
            f"{'; '.join(result.reasons) or 'no drift'} |"
        )
    for version, why in judged.skipped.items():
        lines.append(f"| {version} | | not judged: {why} |")
    return "\n".join(lines)


class FineTuneRunConfig(dg.Config):
    window: str | None = None  # the drift window that asked for it
    reason: str | None = None


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "mlflow"},
    ins={"preprocessed_cache": dg.AssetIn(dg.AssetKey("preprocessed_cache"))},
    description="The production model fine-tuned at a low learning rate on the training split "
    "plus the labeled live images in the retained store, then evaluated like any model.",
)
def finetuned_model(
    context: dg.AssetExecutionContext,
    config: FineTuneRunConfig,
    platform: PlatformSettings,
    preprocessed_cache: PreprocessedCache,
) -> dg.Output[FineTuneResult]:
    settings = platform.settings()
    reason = config.reason or (f"drift in window {config.window}" if config.window else None)
    result = finetune_production(
        settings.training,
        settings.monitoring,
        registry_for(settings.registry),
        preprocessed_cache,
        reason=reason,
        dagster_run_id=context.run.run_id,
        progress=interactive(),
        on_epoch=context.log.info,
    )
    summary = result.summary()
    return dg.Output(
        result,
        metadata=readable(
            {
                **{k: v for k, v in summary.items() if not isinstance(v, dict)},
                "labeled_per_class": dg.MetadataValue.json(summary["labeled_per_class"]),
                "window": config.window or "",
            }
        ),
    )


@dg.asset(
    group_name=GROUP,
    kinds={"onnx", "mlflow"},
    ins={
        "finetuned_model": dg.AssetIn(dg.AssetKey("finetuned_model")),
        "preprocessed_cache": dg.AssetIn(dg.AssetKey("preprocessed_cache")),
    },
    description="The fine-tuned model exported (parity-checked), registered, and made the "
    "'shadow' candidate the service scores beside production.",
)
def shadow_candidate(
    context: dg.AssetExecutionContext,
    platform: PlatformSettings,
    finetuned_model: FineTuneResult,
    preprocessed_cache: PreprocessedCache,
) -> dg.Output[dict]:
    registry_settings = platform.settings().registry
    exported, info = register_finetuned(
        registry_settings,
        preprocessed_cache,
        finetuned_model,
        triggered_by=f"dagster:{context.run.run_id}",
    )
    return dg.Output(
        {"version": info.version, "base_version": finetuned_model.base.version},
        metadata=readable(
            {
                "shadow_version": info.version,
                "finetuned_from": finetuned_model.base.version,
                "onnx_max_abs_diff": exported.parity.onnx_max_abs_diff,
                "int8": "kept" if exported.int8 and exported.int8.kept else "not kept",
                "model_card": dg.MetadataValue.md(
                    registry_for(registry_settings).card(info.version)
                ),
            }
        ),
    )


@dg.asset(
    group_name=GROUP,
    kinds={"mlflow"},
    deps=[shadow_candidate],
    ins={"preprocessed_cache": dg.AssetIn(dg.AssetKey("preprocessed_cache"))},
    check_specs=[
        dg.AssetCheckSpec(
            "promotion_gate",
            asset="shadow_evaluation",
            description="Shadow vs production on the test split and on labeled live traffic.",
        )
    ],
    description="The shadow candidate against production on the held-out test split, on live "
    "shadow traffic with feedback labels, and by agreement rate; the promotion gate decides and "
    "the decision is recorded in the registry.",
)
def shadow_evaluation(
    context: dg.AssetExecutionContext,
    platform: PlatformSettings,
    preprocessed_cache: PreprocessedCache,
):
    settings = platform.settings()
    outcome = evaluate_shadow(
        settings.monitoring,
        settings.registry,
        preprocessed_cache,
        triggered_by=f"dagster:{context.run.run_id}",
        target_sensitivity=settings.training.target_sensitivity,
    )
    decision = outcome.decision
    context.log.info(outcome.summary())
    checks = gate_checks_markdown(decision)
    live = outcome.live
    yield dg.Output(
        outcome.to_dict(),
        metadata=readable(
            {
                "candidate": outcome.candidate,
                "production_before": outcome.production_before or "none",
                "promoted": outcome.promoted,
                "decision": decision.summary(),
                "gate": dg.MetadataValue.md(checks),
                "live_scored": live.n_scored,
                "live_labeled": live.n_labeled,
                **(
                    {"agreement_rate": live.agreement_rate}
                    if live.agreement_rate is not None
                    else {}
                ),
                **({"live_candidate_auc": live.candidate_auc} if live.candidate_auc else {}),
                **({"live_production_auc": live.production_auc} if live.production_auc else {}),
                "record": home_path(outcome.record_path, settings.monitoring.home),
            }
        ),
    )
    yield dg.AssetCheckResult(
        check_name="promotion_gate",
        passed=decision.passed,
        severity=dg.AssetCheckSeverity.WARN,  # a refusal is the gate working
        metadata={"summary": decision.summary(), "failed": ", ".join(decision.failed_checks)},
    )


class SiteRecalibrationConfig(dg.Config):
    site: str  # as the site's requests name it in the inference log
    window: str | None = None  # the drift window that asked for it


@dg.asset(
    group_name=GROUP,
    kinds={"mlflow"},
    check_specs=[
        dg.AssetCheckSpec(
            "site_gate",
            asset="site_recalibration",
            description="The recalibrated version against the site's current one on the "
            "site's labels, paired.",
        )
    ],
    description="A site's own operating point: a threshold proposed from its labeled positives "
    "(with the validation positives moved by their shift where the site's lower tail does not "
    "contradict them), registered with the same weights, judged paired against the site's "
    "current version (sensitivity at least the floor at 95% and the target at 80%, the site's "
    "own positives not lost beyond what that allows, a specificity gain worth a version; or the "
    "current one shown below the target), and served to that site only when it passes.",
)
def site_recalibration(
    context: dg.AssetExecutionContext, config: SiteRecalibrationConfig, platform: PlatformSettings
):
    settings = platform.settings()
    try:
        result = recalibrate_for_site(
            settings.monitoring,
            settings.registry,
            config.site,
            target_sensitivity=settings.training.target_sensitivity,
            triggered_by=f"dagster:{context.run.run_id}",
        )
    except (NotEnoughLabelsError, SiteRecalibrationError) as exc:
        raise dg.Failure(description=str(exc)) from exc
    context.log.info(result.summary())
    evidence, decision = result.evidence, result.decision
    assert evidence is not None
    judgement = evidence.judgement
    yield dg.Output(
        result.to_dict(),
        metadata=readable(
            {
                "site": result.site,
                "source_version": result.source_version,
                "candidate_version": result.candidate_version,
                "promoted": result.promoted,
                "alias": result.alias,
                "threshold": evidence.operating_point.threshold,
                "direction": judgement.direction,
                "verdict": judgement.verdict,
                "sensitivity_from": judgement.sensitivity_from,
                "expected_sensitivity": judgement.candidate_sensitivity[0],
                "sensitivity_low": judgement.candidate_sensitivity[1],
                "current_sensitivity": judgement.current_sensitivity[0],
                "specificity_gain": judgement.specificity.difference,
                "specificity_gain_low": judgement.specificity.low,
                "labels_to_decide": dg.MetadataValue.json(judgement.labels_to_decide or {}),
                "labels_used": dg.MetadataValue.json(
                    {"PNEUMONIA": evidence.n_positive, "NORMAL": evidence.n_negative}
                ),
                "decision": decision.summary(),
                "gate": dg.MetadataValue.md(gate_checks_markdown(decision)),
                "window": config.window or "",
                "model_card": dg.MetadataValue.md(
                    registry_for(settings.registry).card(result.candidate_version)
                ),
            }
        ),
    )
    yield dg.AssetCheckResult(
        check_name="site_gate",
        passed=decision.passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"summary": decision.summary(), "failed": ", ".join(decision.failed_checks)},
    )


drift_check_job = dg.define_asset_job(
    DRIFT_CHECK_JOB,
    selection=[drift_report],
    description="The drift report of one window.",
)
fine_tune_job = dg.define_asset_job(
    FINE_TUNE_JOB,
    selection=[finetuned_model, shadow_candidate],
    description="Fine-tune production on training + labeled live data; register as shadow.",
)
recalibrate_job = dg.define_asset_job(
    RECALIBRATE_JOB,
    selection=[site_recalibration],
    description="Propose one site's operating point from its labels; judge it paired against "
    "the version the site has.",
)
evaluate_shadow_job = dg.define_asset_job(
    EVALUATE_SHADOW_JOB,
    selection=[shadow_evaluation],
    description="Gate the shadow candidate against production; promote or refuse it.",
)


def initial_drift_cursor(instance: dg.DagsterInstance) -> DriftCursor:
    """A sensor without a cursor (new deployment of the daemon, or the demo's windows judged
    outside it) resumes after the newest window already in the instance."""
    ends = [
        int(key.split("-")[2])
        for key in instance.get_dynamic_partitions(DRIFT_WINDOWS.name)
        if key.startswith("ids-")
    ]
    return DriftCursor(last_id=max(ends, default=0))


def _drift_run_requests(window: str, step: DriftStep) -> list[dg.RunRequest]:
    """The window's drift report, and the recalibration or fine-tune the rule asks for."""
    assert step.result is not None
    requests = [
        dg.RunRequest(
            job_name=DRIFT_CHECK_JOB,
            partition_key=window,
            run_key=f"drift-{window}",
            tags={"cxr/drift_fired": str(step.fired).lower()},
        )
    ]
    if step.recalibrate_site is not None:
        site_config = {"site": step.recalibrate_site, "window": window}
        requests.append(
            dg.RunRequest(
                job_name=RECALIBRATE_JOB,
                run_key=f"recalibrate-{step.recalibrate_site}-{window}",
                run_config={"ops": {"site_recalibration": {"config": site_config}}},
                tags={"cxr/drift_window": window},
            )
        )
    if step.request_finetune:
        finetune_config = {"window": window, "reason": step.result.summary()}
        requests.append(
            dg.RunRequest(
                job_name=FINE_TUNE_JOB,
                run_key=f"fine-tune-{window}",
                run_config={"ops": {"finetuned_model": {"config": finetune_config}}},
                tags={"cxr/drift_window": window},
            )
        )
    return requests


def _drift_sensor(interval: int) -> dg.SensorDefinition:
    @dg.sensor(
        name=DRIFT_SENSOR,
        jobs=[drift_check_job, fine_tune_job, recalibrate_job],
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Cuts the inference log into windows of CXR_DRIFT_WINDOW_SIZE records, "
        "requests a drift report per window and the fine-tune job when the drift rule fires.",
    )
    def drift_sensor(context: dg.SensorEvaluationContext, platform: PlatformSettings):
        cursor = (
            DriftCursor.from_json(context.cursor)
            if context.cursor
            else initial_drift_cursor(context.instance)
        )
        settings = platform.settings()
        step = drift_sensor_step(
            settings.monitoring,
            registry_for(settings.registry),
            cursor,
            target_sensitivity=settings.training.target_sensitivity,
        )
        if step.result is None or step.window is None:
            return dg.SensorResult(skip_reason=step.skip_reason, cursor=step.cursor.to_json())
        context.log.info(
            f"{step.result.summary()}; {step.finetune_note}"
            + "".join(f"; version {v}: {note}" for v, note in step.version_notes.items())
        )
        return dg.SensorResult(
            run_requests=_drift_run_requests(step.window, step),
            dynamic_partitions_requests=[DRIFT_WINDOWS.build_add_request([step.window])],
            cursor=step.cursor.to_json(),
        )

    return drift_sensor


def _shadow_sensor(interval: int) -> dg.SensorDefinition:
    @dg.sensor(
        name=SHADOW_SENSOR,
        job=evaluate_shadow_job,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests the shadow evaluation once the shadow has scored "
        "CXR_SHADOW_MIN_RECORDS live requests.",
    )
    def shadow_sensor(context: dg.SensorEvaluationContext, platform: PlatformSettings):
        settings = platform.settings()
        step = shadow_sensor_step(
            settings.monitoring, registry_for(settings.registry), context.cursor or None
        )
        if step.candidate is None:
            return dg.SensorResult(skip_reason=step.skip_reason, cursor=step.evaluated_version)
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"evaluate-shadow-v{step.candidate}",
                    tags={"cxr/shadow_version": step.candidate},
                )
            ],
            cursor=step.evaluated_version,
        )

    return shadow_sensor


def _daily_drift_report(cron: str) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=DAILY_SCHEDULE,
        cron_schedule=cron,
        job=drift_check_job,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Yesterday's traffic (UTC) as one drift report, whatever the sensor did.",
    )
    def daily_drift_report(context: dg.ScheduleEvaluationContext, platform: PlatformSettings):
        key = day_window(previous_utc_day(context.scheduled_execution_time))
        records = read_window(platform.settings().monitoring, key)
        if records.empty:
            return dg.SkipReason(f"no inference records in {key}")
        context.instance.add_dynamic_partitions(DRIFT_WINDOWS.name, [key])
        return dg.RunRequest(partition_key=key, run_key=f"daily-{key}")

    return daily_drift_report


def build_monitoring_definitions(monitoring: MonitoringSection) -> dg.Definitions:
    """Sensor intervals and the report's cron are fixed when the code location loads (Dagster
    reads them from the definitions); everything else is read per run or tick."""
    interval = monitoring.drift_check_interval_seconds
    return dg.Definitions(
        assets=[
            drift_report,
            finetuned_model,
            shadow_candidate,
            shadow_evaluation,
            site_recalibration,
        ],
        jobs=[drift_check_job, fine_tune_job, evaluate_shadow_job, recalibrate_job],
        sensors=[_drift_sensor(interval), _shadow_sensor(interval)],
        schedules=[_daily_drift_report(monitoring.drift_report_cron)],
    )

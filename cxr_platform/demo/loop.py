"""The monitoring loop ``cxr demo`` walks through, and the sensor ticks it evaluates.

This drives Dagster rather than defining anything in it, so it lives beside the CLI, not in
``defs/``. The Dagster daemon normally evaluates sensors and launches the runs they request. The
demo and the tests evaluate the same sensor definitions with their cursors against the same
instance and execute each requested run in-process, so every run, partition and materialization
lands in the instance the UI shows; a daemon started later resumes after the newest drift window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg
import httpx

from cxr_platform.defs.monitoring_assets import DRIFT_SENSOR, SHADOW_SENSOR
from cxr_platform.demo.traffic import SimulationReport, send_traffic, synthetic_traffic
from cxr_platform.deployment.registry import PRODUCTION, SHADOW, registry_for
from cxr_platform.serving.process import ServiceProcess
from cxr_platform.settings import CxrSettings, settings_environment


@dataclass
class SensorTick:
    sensor: str
    cursor: str | None
    skip_reason: str | None
    runs: list[tuple[str, dg.ExecuteInProcessResult]] = field(default_factory=list)

    def run_for(self, job_name: str) -> dg.ExecuteInProcessResult | None:
        return next((result for name, result in self.runs if name == job_name), None)


def tick_sensor(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    name: str,
    cursor: str | None,
    *,
    log_level: str = "WARNING",
) -> SensorTick:
    """Evaluate sensor ``name`` once with ``cursor``, add the partitions it asks for, and run
    what it requests, as the daemon would. ``log_level`` is for the console only; every event
    is in the instance's run logs either way."""
    sensor = defs.resolve_sensor_def(name)
    # Invoked with a context Dagster builds, as its testing guide does. SensorDefinition's
    # evaluate_tick, tried here outside the daemon (Dagster 1.13), refused the drift sensor's run
    # request: it checks the partition key against the instance before the tick's own
    # add-partition request has been applied.
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, sensor_name=name, resources=dict(defs.resources or {})
    ) as context:
        result = sensor(context)
    if not isinstance(result, dg.SensorResult):
        raise TypeError(f"sensor {name} returned {type(result).__name__}, not a SensorResult")
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    tick = SensorTick(
        name, result.cursor, result.skip_reason.skip_message if result.skip_reason else None
    )
    for request in result.run_requests or []:
        job_name = request.job_name or sensor.job_name
        job = defs.resolve_job_def(job_name)
        outcome = job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            run_config={
                **(request.run_config or {}),
                "loggers": {"console": {"config": {"log_level": log_level}}},
            },
            tags={**request.tags, "dagster/sensor_name": name},
            raise_on_error=False,
        )
        tick.runs.append((job_name, outcome))
    return tick


def wait_for_service_versions(
    url: str,
    *,
    production: str | None,
    shadow: str | None,
    timeout: float = 60.0,
    api_key: str | None = None,
) -> dict:
    """Until the service's ``GET /model`` shows these versions (it polls the registry)."""
    deadline = time.monotonic() + timeout
    seen: dict = {}
    while time.monotonic() < deadline:
        headers = {"X-API-Key": api_key} if api_key else {}
        seen = httpx.get(f"{url}/model", timeout=10, headers=headers).json()
        current = (seen.get("production") or {}).get("model_version")
        candidate = (seen.get("shadow") or {}).get("model_version")
        if current == production and candidate == shadow:
            return seen
        time.sleep(0.5)
    raise TimeoutError(
        f"the service did not switch to production {production} / shadow {shadow} within "
        f"{timeout:.0f} s (last seen: {seen})"
    )


@dataclass
class LoopReport:
    steps: list[str] = field(default_factory=list)
    traffic: list[SimulationReport] = field(default_factory=list)
    fired_window: str | None = None
    shadow_version: str | None = None
    promoted: bool | None = None
    production_before: str | None = None
    production_after: str | None = None


def run_monitoring_loop(
    settings: CxrSettings,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    *,
    shift: str = "contrast",
    echo: Callable[[str], None] = print,
) -> LoopReport:
    """Service -> in-distribution traffic (no drift) -> shifted traffic with feedback (drift,
    fine-tune, shadow) -> more traffic (the shadow scores it) -> shadow evaluation -> the gate
    promotes or refuses."""
    report = LoopReport()
    window = settings.monitoring.drift_window_size
    registry = registry_for(settings.registry)
    before = registry.get(PRODUCTION).version
    report.production_before = before

    def say(text: str) -> None:
        report.steps.append(text)
        echo(text)

    # The service gets this process's settings (API key included) and follows the registry's
    # aliases within a second, so the loop does not wait on its polling.
    env = settings_environment(settings, service_refresh_seconds=1)
    log_path = settings.home / "demo-service.log"
    api_key = settings.serving.service_api_key
    drift_cursor: str | None = None
    shadow_cursor: str | None = None
    with ServiceProcess(env=env, log_path=log_path) as service:
        say(f"service: {service.url} serving production version {before} (log: {log_path})")

        def traffic(kind: str, seed: int, n: int) -> SimulationReport:
            # Spare images: a drift window needs n answers, and the input gate refuses a few
            # in a thousand even of in-distribution images.
            images = synthetic_traffic(settings.data, n + max(5, n // 10), seed)
            sent = send_traffic(
                service.url,
                images,
                shift=kind,
                labels=True,
                seed=seed,
                api_key=api_key,
                stop_after_answers=n,
            )
            report.traffic.append(sent)
            say(f"traffic: {sent.summary()}")
            return sent

        def drift_tick() -> SensorTick:
            nonlocal drift_cursor
            tick = tick_sensor(defs, instance, DRIFT_SENSOR, drift_cursor)
            drift_cursor = tick.cursor
            return tick

        traffic("none", settings.seed + 101, window)
        tick = drift_tick()
        say(f"drift_sensor: {_tick_summary(tick)}")
        if tick.run_for("fine_tune") is not None:
            say("the in-distribution window fired the drift rule (a false alarm)")

        traffic(shift, settings.seed + 102, window)
        tick = drift_tick()
        say(f"drift_sensor: {_tick_summary(tick)}")
        finetune = tick.run_for("fine_tune")
        if finetune is None:
            say("no fine-tune was requested; the loop ends here")
            return report
        report.fired_window = tick.runs[0][1].dagster_run.tags.get("dagster/partition")
        if not finetune.success:
            raise RuntimeError(f"the fine-tune run {finetune.run_id} failed; see the Dagster UI")
        shadow = registry.get(SHADOW).version
        report.shadow_version = shadow
        say(f"fine_tune: run {finetune.run_id} registered version {shadow} as shadow")
        wait_for_service_versions(service.url, production=before, shadow=shadow, api_key=api_key)

        traffic(shift, settings.seed + 103, max(settings.monitoring.shadow_min_records, 1))
        shadow_tick = tick_sensor(defs, instance, SHADOW_SENSOR, shadow_cursor)
        shadow_cursor = shadow_tick.cursor
        evaluation = shadow_tick.run_for("evaluate_shadow")
        if evaluation is None:
            say(f"shadow_sensor: {shadow_tick.skip_reason}")
            return report
        if not evaluation.success:
            raise RuntimeError(f"shadow evaluation run {evaluation.run_id} failed")
        outcome = evaluation.output_for_node("shadow_evaluation")
        report.promoted = bool(outcome["promoted"])
        checks = outcome["decision"]["checks"]
        say(
            "shadow_evaluation: "
            + ("PROMOTED" if report.promoted else "REFUSED")
            + " - "
            + "; ".join(
                f"{c['name']} {c['value']:.3f} {'>=' if c['passed'] else '<'} {c['limit']:.3f}"
                for c in checks
            )
            + _live_summary(outcome["live"])
        )
        after = registry.get(PRODUCTION).version
        report.production_after = after
        wait_for_service_versions(service.url, production=after, shadow=None, api_key=api_key)
        say(f"service now answers with production version {after}")
        if report.promoted:
            traffic(shift, settings.seed + 104, min(window, 50))
    return report


def _tick_summary(tick: SensorTick) -> str:
    if tick.skip_reason and not tick.runs:
        return f"skipped: {tick.skip_reason}"
    parts = []
    for job_name, result in tick.runs:
        if job_name == "drift_check":
            fired = result.dagster_run.tags.get("cxr/drift_fired") == "true"
            materialized = result.get_asset_materialization_events()
            summary = (
                materialized[0].materialization.metadata["summary"].value
                if materialized
                else "no report (see the run)"
            )
            parts.append(f"{'DRIFT' if fired else 'no drift'}: {summary}")
        else:
            parts.append(f"{job_name} run {'succeeded' if result.success else 'FAILED'}")
    return "; ".join(parts)


def _live_summary(live: dict) -> str:
    text = f"; live traffic: {live['n_scored']} scored by both"
    if live.get("agreement_rate") is not None:
        text += f", agreement {live['agreement_rate']:.2f}"
    if live.get("candidate_auc") is not None:
        text += (
            f", AUC on {live['n_labeled']} labeled: shadow {live['candidate_auc']:.3f} vs "
            f"production {live['production_auc']:.3f}"
        )
    return text

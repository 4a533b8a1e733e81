"""``cxr demo``: the main job through Dagster on the embedded default, then the monitoring loop
against the live service, printing what a newcomer should look at."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from cxr_platform.cli.group import DATA_OPTION, cli, fail_cleanly, number_text, settings_for
from cxr_platform.data.shifts import SHIFT_NAMES
from cxr_platform.defs.home import prepare_dagster_home
from cxr_platform.model_version.aliases import PRODUCTION
from cxr_platform.settings import CxrSettings

# The demo's monitoring loop uses smaller windows than a deployment (200 records), so the
# whole loop runs in a few minutes; an explicit CXR_* setting wins.
DEMO_MONITORING_DEFAULTS = {"drift_window_size": 100, "shadow_min_records": 100}


def demo_overrides(settings: CxrSettings) -> dict[str, object]:
    """The demo's defaults for what the environment (or a .env file) did not set explicitly."""
    return {
        name: value
        for name, value in DEMO_MONITORING_DEFAULTS.items()
        if name not in settings.model_fields_set
    }


@cli.command()
@DATA_OPTION
@click.option(
    "--loop/--no-loop",
    default=True,
    show_default=True,
    help="After the job: serve, send traffic, detect drift, fine-tune, evaluate the shadow.",
)
@click.option(
    "--shift",
    type=click.Choice(SHIFT_NAMES[1:]),
    default="contrast",
    show_default=True,
    help="The acquisition shift the loop's traffic carries.",
)
@click.pass_context
@fail_cleanly
def demo(ctx: click.Context, data_dir: Path | None, loop: bool, shift: str) -> None:
    """Run the platform's main job through Dagster on the embedded default, then close the
    monitoring loop against the live service."""
    import dagster as dg

    from cxr_platform.data.profile import DataProfile
    from cxr_platform.data.splits import read_manifest, split_summary
    from cxr_platform.defs.definitions import RELEASE_JOB, build_definitions

    settings = settings_for(ctx, data_dir=data_dir)
    settings = settings_for(ctx, data_dir=data_dir, **demo_overrides(settings))
    dagster_home = prepare_dagster_home(settings)
    # The run is recorded in the persistent instance so `dagster dev` shows it afterwards.
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    source = str(settings.data_dir) if settings.data_dir else "synthetic demo dataset"
    click.echo(f"Running Dagster job '{RELEASE_JOB}' on {source} (home: {settings.home})")
    job = build_definitions(settings).resolve_job_def(RELEASE_JOB)
    # Full step logs stay in the run's event log (the UI); the terminal gets the summary.
    log_level = "INFO" if ctx.obj.get("verbose") else "WARNING"
    result = job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )

    for event in result.get_asset_check_evaluations():
        mark = "PASS" if event.passed else "FAIL"
        click.echo(f"  check {event.asset_key.to_user_string()}:{event.check_name}: {mark}")
    if not result.success:
        _print_evaluations(settings)
        failed = [e.step_key for e in result.all_events if e.is_step_failure]
        click.secho(
            f"demo failed in {', '.join(failed) or 'a step'}; see the run "
            f"{result.run_id} in the Dagster UI",
            fg="red",
            err=True,
        )
        sys.exit(1)

    _print_evaluations(settings)
    _print_explanations(settings)
    _print_registry(settings)
    profile = DataProfile.read_json(settings.data.reports_dir / "data_profile.json")
    click.echo(
        f"\nProfile: {profile.n_images} images, {profile.n_unreadable} unreadable, "
        f"{profile.n_patients} patients, per class {profile.per_class}"
    )
    manifest = read_manifest(settings.data.splits_dir / "patient_splits.csv")
    click.echo("\n" + split_summary(manifest).to_string(index=False, float_format="%.3f"))
    click.echo(
        f"\nRun {result.run_id} succeeded. To browse it:\n"
        f"  DAGSTER_HOME={dagster_home} CXR_HOME={settings.home} "
        f"dagster dev -w workspace.yaml -p {settings.dagster.dagster_port}"
    )
    bentos = [
        event.materialization.metadata
        for event in result.get_asset_materialization_events()
        if event.asset_key == dg.AssetKey("bento")
    ]
    if bentos:
        _print_service_help(settings, bentos[-1]["bento"].value)
    if loop and bentos:
        _demo_loop(settings, instance, shift, bool(ctx.obj.get("verbose")))


def _demo_loop(settings: CxrSettings, instance, shift: str, verbose: bool) -> None:
    from cxr_platform.defs.definitions import build_definitions
    from cxr_platform.demo.loop import run_monitoring_loop

    if not verbose:  # the sensors' own log lines repeat what the loop prints
        logging.getLogger("dagster").setLevel(logging.WARNING)

    click.echo(
        f"\nMonitoring loop ({settings.monitoring.drift_window_size}-record drift windows, shift "
        f"'{shift}'): the service, traffic, drift_sensor, fine_tune, shadow_sensor, "
        "evaluate_shadow; each run is in the Dagster UI (group 'monitoring')."
    )
    report = run_monitoring_loop(
        settings,
        build_definitions(settings),
        instance,
        shift=shift,
        echo=lambda line: click.echo(f"  {line}"),
    )
    if report.promoted is None:
        return
    verdict = "promoted" if report.promoted else "refused by the gate"
    click.echo(
        f"Loop closed: drift in {report.fired_window} -> fine-tuned version "
        f"{report.shadow_version} {verdict}; production {report.production_before} -> "
        f"{report.production_after}. Drift reports: {settings.monitoring.drift_reports_dir}"
    )


def _print_evaluations(settings: CxrSettings) -> None:
    """The test-split table of the newest evaluation of each model (a report folder per
    checkpoint: the newest is what this run trained)."""
    folder = settings.training.reports_dir / "evaluation"
    newest: dict[str, Path] = {}
    for path in sorted(folder.glob("*/*/evaluation.json"), key=lambda p: p.stat().st_mtime):
        newest[path.parent.parent.name] = path
    reports = [newest[name] for name in sorted(newest)]
    if not reports:
        return
    click.echo("\nTest split (threshold chosen on validation):")
    click.echo(
        f"  {'model':<14} {'pretrained':<10} {'AUC (95% CI)':<22} {'sens':>6} {'spec':>6} "
        f"{'PPV':>6} {'NPV':>6} {'thr':>6}"
    )
    from cxr_platform.models.evaluation import EvaluationReport

    for path in reports:
        report = EvaluationReport.read_json(path)
        test = report.splits["test"]
        click.echo(
            f"  {report.model_name:<14} {str(report.training.get('pretrained')):<10} "
            f"{test.auc:.3f} ({test.auc_ci_low:.3f}-{test.auc_ci_high:.3f})  "
            f"{number_text(test.sensitivity)} {number_text(test.specificity)} "
            f"{number_text(test.ppv)} {number_text(test.npv)} "
            f"{report.operating_point.threshold:6.3f}"
        )


def _print_explanations(settings: CxrSettings) -> None:
    folder = settings.training.reports_dir / "explanations"
    reports = sorted(folder.glob("*/explanations.json")) if folder.exists() else []
    if not reports:
        return
    click.echo("\nGrad-CAM checks (test split):")
    from cxr_platform.explain.report import ExplanationReport

    for path in reports:
        report = ExplanationReport.read_json(path)
        game = report.pointing_game
        pointing = (
            f"pointing game {game.hit_rate:.2f} vs random point "
            f"{game.random_point_hit_rate:.2f} (p={game.p_value:.1e})"
            if game
            else "pointing game n/a (no lesion masks)"
        )
        randomization = report.randomization
        click.echo(
            f"  {report.model_name:<14} {pointing}; randomization |rho| "
            f"{randomization.mean_abs_rank_correlation:.2f} "
            f"({'PASS' if randomization.passed else 'FAIL'}); gallery {report.gallery}"
        )


def _print_registry(settings: CxrSettings) -> None:
    from cxr_platform.deployment.registry import registry_for

    registry = registry_for(settings.registry)
    events = registry.events()
    if not events:
        return
    aliases = registry.aliases()
    click.echo(f"\nRegistry {registry.name}: aliases {aliases or '(none)'}")
    for event in events[-4:]:
        gate = event.details.get("gate") or {}
        verdict = "" if not gate else f" (gate {'passed' if gate.get('passed') else 'refused'})"
        click.echo(f"  {event.at}  {event.action:<10} v{event.version}{verdict}")
    if PRODUCTION in aliases:
        click.echo("  try: cxr predict <image or folder> --model production --out predictions.csv")
    else:
        click.echo("  no production model: the gate refused every candidate (see cxr models)")


def _print_service_help(settings: CxrSettings, bento_tag: str) -> None:
    port = settings.serving.service_port
    click.echo(
        f"\nServe the production model over HTTP (it follows the registry's aliases):\n"
        f"  CXR_HOME={settings.home} cxr serve --port {port}\n"
        f"or the Bento built from it ({bento_tag}, the model pinned inside):\n"
        f"  BENTOML_HOME={settings.home / 'bentoml'} bentoml serve {bento_tag} --port {port}\n"
        f"then ask it about an image:\n"
        f"  curl -F file=@image.png http://127.0.0.1:{port}/predict"
    )

"""The ``cxr`` command: a thin shell over the library and the Dagster definitions."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import click
from pydantic import ValidationError

from cxr_platform.data.shifts import SHIFT_NAMES
from cxr_platform.errors import CxrError
from cxr_platform.model_version.aliases import ALIASES, PRODUCTION
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.sections import PRECISIONS, PRETRAINED_MODES, TRAINING_PROFILES
from cxr_platform.settings import CxrSettings, env_name, load_settings, settings_environment
from cxr_platform.terminal import attached, interactive

EXIT_USAGE = 2
EXIT_CHECKS_FAILED = 3

WRITTEN_BY_CXR = "# Written by `cxr`"
DAGSTER_YAML = f"""\
{WRITTEN_BY_CXR}: local Dagster storage lives in this folder (SQLite).
telemetry:
  enabled: false
"""
DAGSTER_POSTGRES_YAML = """\
{written_by} from CXR_DAGSTER_POSTGRES_URL: runs, events and schedules in PostgreSQL.
storage:
  postgres:
    postgres_url: {url}
telemetry:
  enabled: false
"""


class LazyChoice(click.Choice):
    """A choice among names the library registers, looked up only when an option is used, so
    `cxr --help` does not import torch to list the architectures."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        super().__init__(())
        self._names = names

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())

    @choices.setter
    def choices(self, value: object) -> None:
        pass  # click's constructor assigns the (empty) eager list; the names come from _names


def _architecture_names() -> tuple[str, ...]:
    from cxr_platform.models.zoo import ARCHITECTURES

    return tuple(ARCHITECTURES)


def _settings_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        where = f"{name} ({env_name(name)})" if name else "settings"
        problems.append(f"{where}: {error['msg']}")
    return "invalid settings: " + "; ".join(problems)


def _fail_cleanly(command):
    """Typed platform errors and invalid settings become one clear line on stderr and a
    non-zero exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CxrError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(EXIT_USAGE)
        except ValidationError as exc:
            click.secho(f"error: {_settings_error(exc)}", fg="red", err=True)
            sys.exit(EXIT_USAGE)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for all local state (default: $CXR_HOME or ./.cxr).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, verbose: bool) -> None:
    """cxr_platform: chest X-ray Normal/Pneumonia classifier, from data to PACS."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = {"home": home, "verbose": verbose}
    # Steps Dagster runs in this process have their stderr captured; bars still reach a person.
    ctx.with_resource(attached())


def _settings(ctx: click.Context, **overrides: object) -> CxrSettings:
    """The environment's settings with this command's flags on top (flags win)."""
    return load_settings(home=ctx.obj.get("home"), **overrides)


@contextlib.contextmanager
def _dagster_pipes():
    """The Dagster Pipes session when a Dagster asset launched this process; None otherwise."""
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    if DAGSTER_PIPES_CONTEXT_ENV_VAR not in os.environ:
        yield None
        return
    with open_dagster_pipes() as pipes:
        yield pipes


def prepare_dagster_home(settings: CxrSettings) -> Path:
    """Create the home folder and a Dagster instance folder that `dagster dev` can share: its
    storage SQLite in that folder, or the PostgreSQL database the settings name. A dagster.yaml
    someone wrote by hand is left as it is."""
    layout = settings.dagster
    layout.ensure_dirs()
    config = layout.dagster_home / "dagster.yaml"
    wanted = DAGSTER_YAML
    if layout.dagster_postgres_url:
        driver = layout.dagster_postgres_url.split("://", 1)[0]
        if driver != "postgresql+psycopg2":
            # SQLAlchemy 2.1 maps postgresql:// to psycopg 3, on which Dagster's event log
            # fails (it sends NOTIFY with psycopg2's client-side parameters).
            raise CxrError(
                f"CXR_DAGSTER_POSTGRES_URL must name the psycopg2 driver "
                f"(postgresql+psycopg2://user@host:port/db), not {driver}://"
            )
        # A JSON string is a YAML string, quoted whatever the URL holds.
        url = json.dumps(layout.dagster_postgres_url)
        wanted = DAGSTER_POSTGRES_YAML.format(written_by=WRITTEN_BY_CXR, url=url)
    if not config.exists() or (
        config.read_text().startswith(WRITTEN_BY_CXR) and config.read_text() != wanted
    ):
        config.write_text(wanted)
        config.chmod(0o600)  # the URL may carry a password
    return layout.dagster_home


DATA_OPTION = click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Data folder (default: $CXR_DATA_DIR, else the synthetic set).",
)


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
@_fail_cleanly
def demo(ctx: click.Context, data_dir: Path | None, loop: bool, shift: str) -> None:
    """Run the platform's main job through Dagster on the embedded default, then close the
    monitoring loop against the live service."""
    import dagster as dg

    from cxr_platform.data.profile import DataProfile
    from cxr_platform.data.splits import read_manifest, split_summary
    from cxr_platform.defs.definitions import RELEASE_JOB, build_definitions

    settings = _settings(ctx, data_dir=data_dir)
    settings = _settings(ctx, data_dir=data_dir, **demo_overrides(settings))
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
    """The evaluation table of every model evaluated so far (test split)."""
    folder = settings.training.reports_dir / "evaluation"
    reports = sorted(folder.glob("*/evaluation.json")) if folder.exists() else []
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
            f"{_num(test.sensitivity)} {_num(test.specificity)} {_num(test.ppv)} "
            f"{_num(test.npv)} {report.operating_point.threshold:6.3f}"
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


def _num(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def _profile_folder(ctx: click.Context, data_dir: Path, **overrides: object):
    """Settings for DATA_DIR, then discovery and a full profile (progress bar on a terminal)."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.sources import discover_images

    settings = _settings(ctx, data_dir=data_dir, **overrides)
    index = discover_images(data_dir)
    return settings, pipeline.profile(index, settings.data, progress=interactive())


WORKERS_OPTION = click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Parallel decode workers."
)


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the profile as JSON here.",
)
@WORKERS_OPTION
@click.pass_context
@_fail_cleanly
def profile(
    ctx: click.Context, data_dir: Path, json_path: Path | None, workers: int | None
) -> None:
    """Profile a dataset: classes, sizes, modes, patients, unreadable files, duplicates."""
    _, profiled = _profile_folder(ctx, data_dir, workers=workers)
    click.echo(profiled.profile.to_markdown())
    if json_path:
        profiled.profile.write_json(json_path)
        click.echo(f"\nwrote {json_path}")


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Manifest CSV to write (path,label,patient_id,split,...).",
)
@click.option("--seed", type=int, default=None, help="Split seed (default: $CXR_SEED or 1337).")
@click.option(
    "--ratios",
    nargs=3,
    type=float,
    default=None,
    help="train val test fractions (default: $CXR_SPLIT_RATIOS or 0.70 0.15 0.15).",
)
@WORKERS_OPTION
@click.pass_context
@_fail_cleanly
def split(
    ctx: click.Context,
    data_dir: Path,
    out_path: Path,
    seed: int | None,
    ratios: tuple[float, float, float] | None,
    workers: int | None,
) -> None:
    """Write a patient-level, label-stratified train/val/test split of DATA_DIR."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.splits import split_summary, write_manifest

    settings, profiled = _profile_folder(
        ctx, data_dir, workers=workers, seed=seed, split_ratios=ratios
    )
    if profiled.profile.n_unreadable:
        click.echo(
            f"left out {profiled.profile.n_unreadable} unreadable files "
            f"(run `cxr profile` for reasons)",
            err=True,
        )
    manifest, checks = pipeline.split(
        profiled, ratios=settings.data.split_ratios, seed=settings.data.seed
    )
    write_manifest(manifest, out_path)
    click.echo(split_summary(manifest).to_string(index=False, float_format="%.3f"))
    click.echo(f"\nwrote {len(manifest)} rows to {out_path}")
    failed = {name: outcome for name, outcome in checks.items() if not outcome.passed}
    for name, outcome in checks.items():
        click.echo(
            f"  check {name}: {'PASS' if outcome.passed else 'FAIL'} - {outcome.description}"
        )
    if failed:
        click.secho(f"{len(failed)} split checks failed: {', '.join(failed)}", fg="red", err=True)
        sys.exit(EXIT_CHECKS_FAILED)


@cli.command()
@DATA_OPTION
@click.option(
    "--arch",
    type=LazyChoice(_architecture_names),
    default="resnet18",
    show_default=True,
)
@click.option(
    "--profile",
    "profile_name",
    type=click.Choice(TRAINING_PROFILES),
    default=None,
    help="Recipe defaults (default: demo on the synthetic set, full on real data).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Total epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--pretrained", type=click.Choice(PRETRAINED_MODES), default=None)
@click.option(
    "--weights",
    "weights_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Local ImageNet weights file (torchvision state dict).",
)
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: auto).")
@click.option(
    "--compile/--no-compile",
    "torch_compile",
    default=None,
    help="torch.compile the training passes (default: CXR_TORCH_COMPILE, off).",
)
@click.option("--resume", is_flag=True, help="Continue from the newest last.pt of this arch.")
@click.option(
    "--nproc-per-node",
    "training_nproc_per_node",
    type=click.IntRange(min=1),
    default=None,
    help="Processes on this machine, with DistributedDataParallel (torchrun's launcher): one "
    "per GPU, or CPU processes sharing the cores. The batch size stays the global batch "
    "(default: CXR_TRAINING_NPROC_PER_NODE, 1).",
)
@click.pass_context
@_fail_cleanly
def train(
    ctx: click.Context,
    data_dir: Path | None,
    arch: str,
    profile_name: str | None,
    epochs: int | None,
    batch_size: int | None,
    pretrained: str | None,
    weights_path: str | None,
    device: str | None,
    torch_compile: bool | None,
    resume: bool,
    training_nproc_per_node: int | None,
) -> None:
    """Train one model on the patient split of the data and track it in MLflow."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.splits import manifest_hash
    from cxr_platform.models import pipeline as model_pipeline

    settings = _settings(
        ctx,
        data_dir=data_dir,
        device=device,
        torch_compile=torch_compile,
        training_nproc_per_node=training_nproc_per_node,
    )
    training = settings.training
    nproc_per_node = training.training_nproc_per_node
    progress = interactive()
    manifest, cache = pipeline.prepare(settings.data, progress=progress)
    profile_used = profile_name or training.profile
    config = model_pipeline.train_config_for(
        training,
        arch,
        profile=profile_used,
        epochs=epochs,
        batch_size=batch_size,
        pretrained=pretrained,
        weights_path=weights_path,
    )
    processes = f" in {nproc_per_node} processes" if nproc_per_node > 1 else ""
    click.echo(
        f"Training {arch} ({profile_used} profile: {config.frozen_epochs} frozen + "
        f"{config.finetune_epochs} fine-tune epochs) on {len(cache.index('train'))} images"
        f"{processes}"
    )
    with _dagster_pipes() as pipes:
        if nproc_per_node > 1:
            trained = model_pipeline.train_distributed(
                training,
                cache,
                config,
                nproc_per_node=nproc_per_node,
                profile=profile_used,
                manifest_hash=manifest_hash(manifest),
                resume=resume,
                tags={"dagster.run_id": pipes.run_id} if pipes else None,
            )
        else:
            trained = model_pipeline.train_tracked(
                training,
                cache,
                config,
                profile=profile_used,
                manifest_hash=manifest_hash(manifest),
                dagster_run_id=pipes.run_id if pipes else None,
                progress=progress,
                resume=resume,
                on_epoch=pipes.log.info if pipes else None,
            )
        if pipes:
            if nproc_per_node > 1:
                # The epochs ran in the launcher's worker processes: their lines reach the run
                # log now (the workers' output streamed to the step's compute log meanwhile).
                from cxr_platform.models.training import EpochRecord, epoch_lines

                records = [EpochRecord(**values) for values in trained.history]
                for line in epoch_lines(config, records):
                    pipes.log.info(line)
            # The asset that launched this process builds its output and metadata from it.
            pipes.report_custom_message(
                {"trained_model": trained.to_json(), "config": config.to_dict()}
            )
    click.echo(
        f"best validation AUC {trained.best_val_auc:.4f} at epoch {trained.best_epoch} "
        f"({trained.epochs_run} epochs, {trained.wall_seconds:.0f} s on {trained.device}, "
        f"pretrained={str(trained.pretrained).lower()}; schedule {trained.schedule})\n"
        f"checkpoint {trained.checkpoint}\nMLflow run {trained.mlflow_run_id} "
        f"({training.tracking_uri})\nnext: cxr evaluate"
    )


@cli.command()
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the test metrics as JSON here.",
)
@click.pass_context
@_fail_cleanly
def evaluate(ctx: click.Context, json_path: Path | None) -> None:
    """Evaluate the most recently trained model on the test split.

    The threshold and calibration are fitted on validation first; test only measures."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.splits import manifest_hash
    from cxr_platform.models import pipeline as model_pipeline
    from cxr_platform.models.reporting import report_markdown

    trained = model_pipeline.latest_trained(_settings(ctx).training)
    settings = _settings(ctx, data_dir=trained.data_dir)
    manifest, cache = pipeline.prepare(settings.data, progress=interactive())
    if trained.manifest_hash and manifest_hash(manifest) != trained.manifest_hash:
        raise CxrError(
            "the patient split differs from the one this model was trained on "
            "(data or split settings changed); retrain before evaluating"
        )
    report, files = model_pipeline.evaluate_trained(settings.training, cache, trained)
    click.echo(report_markdown(report))
    click.echo(f"report: {files['markdown'].parent}")
    if json_path:
        json_path.write_text(json.dumps(report.headline("test"), indent=2) + "\n")
        click.echo(f"wrote {json_path}")


def _record_in_dagster(settings: CxrSettings, event) -> None:
    """CLI promotions and rollbacks appear in the Dagster UI as production_model events."""
    import dagster as dg

    from cxr_platform.defs.deployment_assets import record_registry_event

    instance = dg.DagsterInstance.from_config(str(prepare_dagster_home(settings)))
    record_registry_event(settings.registry, event, instance)


def _evaluation_settings(ctx: click.Context, data_dir: Path | None, release: VersionTags):
    """Settings for the model's own data folder (unless --data) and preprocessing (image size),
    so the gate scores it on the test split of the split it was trained with."""
    return _settings(
        ctx,
        data_dir=data_dir or release.data_dir,
        image_size=(release.preprocessing or {}).get("image_size"),
    )


@cli.command()
@click.option(
    "--no-shadow",
    is_flag=True,
    help="Register without moving the 'shadow' alias to the new version.",
)
@click.pass_context
@_fail_cleanly
def export(ctx: click.Context, no_shadow: bool) -> None:
    """Export the latest evaluated model (ONNX + TorchScript), check parity, register it.

    The new registry version gets the alias 'shadow' unless --no-shadow."""
    from cxr_platform.data import pipeline
    from cxr_platform.deployment import pipeline as deployment
    from cxr_platform.models import pipeline as model_pipeline

    trained = model_pipeline.latest_trained(_settings(ctx).training)
    settings = _settings(ctx, data_dir=trained.data_dir)
    evaluation = model_pipeline.latest_evaluation(settings.training, trained)
    _, cache = pipeline.prepare(settings.data, progress=interactive())
    exported = deployment.export_trained(settings.registry, cache, trained, evaluation)
    parity = exported.parity
    click.echo(
        f"exported {trained.model_name} to {exported.directory}\n"
        f"parity on {parity.n_images} test images: ONNX {parity.onnx_max_abs_diff:.2e}, "
        f"TorchScript {parity.torchscript_max_abs_diff:.2e} (tolerance {parity.tolerance:.0e})"
    )
    if exported.int8 is not None:
        int8 = exported.int8
        click.echo(
            f"INT8: validation AUC {int8.val_auc_fp32:.4f} -> {int8.val_auc_int8:.4f}: "
            + ("kept (model.int8.onnx)" if int8.kept else f"not kept (drop > {int8.max_auc_drop})")
        )
    info = deployment.register_exported(
        settings.registry,
        exported,
        triggered_by=deployment.cli_trigger(),
        shadow=not no_shadow,
        data_dir=trained.data_dir,
    )
    aliases = f" ({', '.join(info.aliases)})" if info.aliases else ""
    click.echo(
        f"registered {settings.registry.registry_model_name} version {info.version}{aliases}\n"
        f"next: cxr promote {info.version}"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--card",
    "card_version",
    metavar="VERSION",
    help="Print VERSION's model card (a number or an alias) instead of the list.",
)
@click.option("--html", "as_html", is_flag=True, help="With --card: the card as an HTML page.")
@click.pass_context
@_fail_cleanly
def models(ctx: click.Context, as_json: bool, card_version: str | None, as_html: bool) -> None:
    """List registered model versions with their aliases and metrics, or print one's card."""
    from cxr_platform.deployment.model_card import card_html
    from cxr_platform.deployment.registry import registry_for

    registry = registry_for(_settings(ctx).registry)
    if card_version is not None:
        card = registry.card(card_version)
        version = registry.get(card_version).version
        click.echo(card_html(card, f"{registry.name} version {version}") if as_html else card)
        return
    if as_html:
        raise click.UsageError("--html goes with --card VERSION")
    versions = registry.versions()
    if as_json:
        click.echo(json.dumps([v.to_dict() for v in versions], indent=2))
        return
    if not versions:
        click.echo(f"no versions of {registry.name} yet; run `cxr export`")
        return
    click.echo(
        f"{'version':>7}  {'aliases':<30} {'model':<14} {'test AUC':>8} {'sens':>6} {'spec':>6}"
        f"  {'threshold':>9}  created"
    )
    for v in versions:
        release = v.release
        m = release.metrics
        threshold = release.threshold if release.threshold is not None else float("nan")
        click.echo(
            f"{v.version:>7}  {','.join(v.aliases) or '-':<30} "
            f"{release.model_name or '?':<14} "
            f"{_num(m.get('test_auc')):>8} {_num(m.get('test_sensitivity'))} "
            f"{_num(m.get('test_specificity'))}  {threshold:9.4f}"
            f"  {v.created_at:%Y-%m-%d %H:%M}"
        )


@cli.command()
@click.argument("version")
@DATA_OPTION
@click.pass_context
@_fail_cleanly
def promote(ctx: click.Context, version: str, data_dir: Path | None) -> None:
    """Promote VERSION (a number or 'shadow') to production if it passes the gate.

    The gate scores candidate and production on the same test split: by default that of the
    data the candidate was trained on. Exit code 3 when the gate refuses."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.splits import manifest_hash
    from cxr_platform.deployment import pipeline as deployment

    registry = deployment.registry_for(_settings(ctx).registry)
    candidate = registry.get(version)
    settings = _evaluation_settings(ctx, data_dir, candidate.release)
    manifest, cache = pipeline.prepare(settings.data, progress=interactive())
    trained_on = candidate.release.data_version
    if trained_on and trained_on != manifest_hash(manifest):
        click.secho(
            "warning: the candidate was trained on another patient split than this evaluation "
            "data; its test scores may include images it was trained on",
            fg="yellow",
            err=True,
        )
    outcome = deployment.promote_with_gate(
        settings.registry, cache, candidate.version, triggered_by=deployment.cli_trigger()
    )
    click.echo(outcome.decision.summary())
    if not outcome.promoted:
        click.secho(
            f"refused: production stays at version {outcome.production_version or '(none)'}",
            fg="red",
            err=True,
        )
        sys.exit(EXIT_CHECKS_FAILED)
    _record_in_dagster(settings, outcome.event)
    previous = outcome.event.previous_version
    click.echo(
        f"production -> version {candidate.version}"
        + (f" (previous-production: {previous})" if previous else "")
    )


@cli.command()
@click.option("--site", required=True, help="The site, as its requests name it in the log.")
@click.option(
    "--from-traffic",
    is_flag=True,
    help="Label-free: move the calibration to the site's prevalence estimated from its "
    "unlabeled requests (EM); decisions stay, probabilities change. Still gated on its labels.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the recalibration and the gate as JSON."
)
@click.pass_context
@_fail_cleanly
def recalibrate(ctx: click.Context, site: str, from_traffic: bool, as_json: bool) -> None:
    """Refit the operating point for SITE from its labeled requests, register it (same
    weights) in shadow and let the gate decide on held-out labels; a pass makes it the site's
    own production version. Exit code 3 when the gate refuses; 2 when labels are too few (the
    message says how many more of each class)."""
    from cxr_platform.calibration.site import (
        prior_adjust_for_site,
        recalibrate_for_site,
    )
    from cxr_platform.deployment import pipeline as deployment
    from cxr_platform.inference.log import site_name

    settings = _settings(ctx)
    site = site_name(site) or site
    trigger = deployment.cli_trigger()
    if from_traffic:
        result = prior_adjust_for_site(
            settings.monitoring, settings.registry, site, triggered_by=trigger
        )
    else:
        result = recalibrate_for_site(
            settings.monitoring,
            settings.registry,
            site,
            target_sensitivity=settings.training.target_sensitivity,
            triggered_by=trigger,
        )
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.summary())
    if not result.promoted:
        sys.exit(EXIT_CHECKS_FAILED)


@cli.command()
@click.pass_context
@_fail_cleanly
def rollback(ctx: click.Context) -> None:
    """Point production back at the version the current one replaced."""
    from cxr_platform.deployment import pipeline as deployment

    settings = _settings(ctx)
    event = deployment.registry_for(settings.registry).rollback(
        triggered_by=deployment.cli_trigger()
    )
    _record_in_dagster(settings, event)
    click.echo(f"production -> version {event.version} (rolled back from {event.previous_version})")


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_ref",
    default=PRODUCTION,
    show_default=True,
    help=f"{', '.join(ALIASES)} or a version number.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CSV file to write (default: standard output).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="int8: the statically quantized model, when the version has one.",
)
@click.option(
    "--no-log",
    is_flag=True,
    help="Do not record the predictions in the inference log (source 'batch').",
)
@click.option(
    "--site",
    default=None,
    help="The site the images come from, kept with each inference-log row (drift, feedback "
    "and recalibration can then be cut per site).",
)
@click.pass_context
@_fail_cleanly
def predict(
    ctx: click.Context,
    inputs: tuple[Path, ...],
    model_ref: str,
    out: Path | None,
    batch_size: int,
    precision: str,
    no_log: bool,
    site: str | None,
) -> None:
    """Predict PNG/JPEG/DICOM files and folders with a registered model, as CSV.

    Columns: path,probability,label,model_version,error. A file that cannot be read gets its
    error in its row and the run continues; the exit code is then 1. Predictions are recorded
    in the inference log (features only, no pixels) unless --no-log."""
    from cxr_platform.deployment.registry import registry_for
    from cxr_platform.inference.batch import expand_inputs, predict_to_csv
    from cxr_platform.inference.log import InferenceLog, site_name, uid_salt
    from cxr_platform.model_version.predictor import Predictor

    settings = _settings(ctx)
    site = site_name(site)  # a bad name fails before any image is read
    files = expand_inputs(inputs)
    registry = registry_for(settings.registry)
    info = registry.get(model_ref)
    predictor = Predictor(
        registry.download(info.version),
        model_version=info.version,
        max_pixels=settings.serving.max_image_pixels,
        precision=precision,
    )
    log = None if no_log else InferenceLog(settings.serving.inference_log_uri)
    options = {
        "batch_size": batch_size,
        "log": log,
        "uid_salt": uid_salt(settings.home),
        "site": site,
        "progress": interactive() and len(files) > 1,
    }
    if out is None:
        summary = predict_to_csv(predictor, files, sys.stdout, **options)
    else:
        tmp = out.with_name(out.name + ".partial")
        with tmp.open("w", newline="") as handle:
            summary = predict_to_csv(predictor, files, handle, **options)
        tmp.replace(out)
    click.echo(
        f"{summary.n_predicted} predicted ({summary.n_pneumonia} PNEUMONIA), "
        f"{summary.n_failed} failed, model {predictor.model_name} version {info.version}"
        + (f"; wrote {out}" if out else "")
        + ("" if no_log else f"; {summary.n_logged} logged"),
        err=True,
    )
    if summary.n_failed:
        sys.exit(1)


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="PNG to write: the Grad-CAM overlay on the original image.",
)
@click.option("--model", "model_ref", default=PRODUCTION, show_default=True)
@click.pass_context
@_fail_cleanly
def explain(ctx: click.Context, image: Path, out: Path, model_ref: str) -> None:
    """Grad-CAM overlay for one image, with the prediction the service would return."""
    from cxr_platform.deployment.registry import registry_for
    from cxr_platform.explain.gradcam import png_bytes
    from cxr_platform.inference.explainer import Explainer
    from cxr_platform.model_version.predictor import Predictor

    registry = registry_for(_settings(ctx).registry)
    info = registry.get(model_ref)
    folder = registry.download(info.version)
    explanation = Explainer(folder, Predictor(folder, model_version=info.version)).explain(image)
    out.write_bytes(png_bytes(explanation.overlay))
    p = explanation.prediction
    click.echo(
        f"{image}: {p.label} (probability {p.probability:.3f}, threshold {p.threshold:.3f}, "
        f"version {info.version}); overlay {out}"
    )


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Default: 3100.")
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to listen on all.")
@click.pass_context
@_fail_cleanly
def serve(ctx: click.Context, port: int | None, host: str) -> None:
    """Start the HTTP service (bentoml serve) on the registry's production model."""
    from cxr_platform.serving.process import REPO_ROOT, serve_command, service_environment

    settings = _settings(ctx)
    port = port or settings.serving.service_port
    env = service_environment(settings_environment(settings))
    command = serve_command(port, host)
    click.echo(f"Serving on http://{host}:{port} (docs at /, try POST /predict with field 'file')")
    os.chdir(REPO_ROOT)
    os.execve(command[0], command, env)  # the service owns the terminal from here


@cli.command("dicom-node")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Default 11112.")
@click.option("--host", default=None, help="Listen address (default 0.0.0.0).")
@click.option("--ae-title", default=None, help="The node's AE title (default CXR_AI).")
@click.option(
    "--destination",
    default=None,
    help="Where results go, AET@HOST:PORT (the PACS or router). Without one, results wait in "
    "the outbox.",
)
@click.option(
    "--allow",
    "allowed",
    multiple=True,
    help="A calling AE title allowed to associate (repeatable); default: any.",
)
@click.option("--max-associations", type=click.IntRange(min=1), default=None)
@click.option("--accept-lateral/--reject-lateral", default=None, help="Classify lateral views.")
@click.option(
    "--results",
    default=None,
    help="Comma-separated objects to return: sr,seg,pmap,sc (default all four); a refused image "
    "gets its not-analysed SR regardless.",
)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Require callers to present a certificate this CA signed.",
)
@click.option(
    "--destination-tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Send results over TLS, verifying the destination with this CA (the --tls-cert/key "
    "pair is presented when given).",
)
@click.option(
    "--destination-dicomweb",
    default=None,
    help="Send results by STOW-RS to this DICOMweb root URL instead of C-STORE.",
)
@click.option(
    "--destination-dicomweb-auth",
    default=None,
    help="Authorization header value for --destination-dicomweb (Bearer ... or Basic ...); "
    "better set as CXR_DICOM_DESTINATION_DICOMWEB_AUTH, out of the process list.",
)
@click.option(
    "--dicomweb-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also receive by STOW-RS on this port (POST /dicom-web/studies).",
)
@click.pass_context
@_fail_cleanly
def dicom_node(
    ctx: click.Context,
    port: int | None,
    host: str | None,
    ae_title: str | None,
    destination: str | None,
    allowed: tuple[str, ...],
    max_associations: int | None,
    accept_lateral: bool | None,
    results: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    destination_tls_ca: Path | None,
    destination_dicomweb: str | None,
    destination_dicomweb_auth: str | None,
    dicomweb_port: int | None,
) -> None:
    """Run the DICOM node: receive routed chest X-rays, return SR, SEG, parametric map and SC."""
    import signal
    import threading

    from cxr_platform.deployment.registry import registry_for
    from cxr_platform.pacs import build_node
    from cxr_platform.redaction import withhold_logged_values

    if not (ctx.obj or {}).get("verbose"):
        logging.getLogger("cxr_platform").setLevel(logging.INFO)
    withhold_logged_values()  # library warnings quote header values; the node's log must not
    settings = _settings(
        ctx,
        dicom_port=port,
        dicom_host=host,
        dicom_ae_title=ae_title,
        dicom_destination=destination,
        dicom_allowed_aets=allowed or None,
        dicom_max_associations=max_associations,
        dicom_accept_lateral=accept_lateral,
        dicom_results=results,
        dicom_tls_cert=tls_cert,
        dicom_tls_key=tls_key,
        dicom_tls_ca=tls_ca,
        dicom_destination_tls_ca=destination_tls_ca,
        dicom_destination_dicomweb=destination_dicomweb,
        dicom_destination_dicomweb_auth=destination_dicomweb_auth,
        dicom_web_port=dicomweb_port,
    )
    node = build_node(settings.dicom, registry_for(settings.registry))
    if node.processor.models.current().production is None:
        click.secho(
            "warning: the registry has no production model yet; received images wait in the "
            "spool until one is promoted",
            fg="yellow",
            err=True,
        )
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    try:
        node.start()
    except OSError as exc:
        raise CxrError(f"cannot listen on port {node.config.port}: {exc}") from exc
    stow = (
        f"; STOW-RS at {node.dicomweb_url}/studies" if node.config.dicomweb_port is not None else ""
    )
    click.echo(
        f"DICOM node {node.config.ae_title} on port {node.port}{stow}; results to "
        f"{node.config.destination or 'the outbox only'}; state in {settings.dicom.dicom_dir}",
    )
    sys.stdout.flush()
    stopped.wait()
    node.stop()
    click.echo(f"stopped: {node.counters}")


@cli.command("dicom-status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable counts.")
@click.pass_context
@_fail_cleanly
def dicom_status(ctx: click.Context, as_json: bool) -> None:
    """What the DICOM node holds: processed and failed instances, spool and outbox sizes."""
    from cxr_platform.disk import MEGABYTE
    from cxr_platform.pacs.storage import NodeStorage

    state_dir = _settings(ctx).dicom.dicom_dir
    storage = NodeStorage(state_dir)
    try:
        counts = storage.counts()
        failed = [str(p.relative_to(storage.root)) for p in storage.iter_failed()]
    finally:
        storage.close()
    if as_json:
        click.echo(json.dumps({**counts, "failed_files": failed}, indent=2))
        return
    click.echo(f"DICOM node state in {state_dir}")
    for name in ("processed", "failed", "spooled", "outbox"):
        click.echo(f"  {name:<10} {counts.get(name, 0)}")
    for name in ("spool", "outbox"):
        click.echo(f"  {name + ' MB':<10} {counts[f'{name}_bytes'] / MEGABYTE:.1f}")
    for path in failed:
        click.echo(f"  kept: {path}")


@cli.command("dicom-retry")
@click.pass_context
@_fail_cleanly
def dicom_retry(ctx: click.Context) -> None:
    """Put the DICOM node's failed instances and refused results back in line."""
    from cxr_platform.pacs.storage import NodeStorage

    storage = NodeStorage(_settings(ctx).dicom.dicom_dir)
    try:
        instances, results = storage.requeue_failed()
    finally:
        storage.close()
    click.echo(
        f"requeued {instances} instances (spool) and {results} results (outbox); a running node "
        "picks them up within a second"
    )


@cli.command("simulate-drift")
@click.option(
    "--shift",
    type=click.Choice(SHIFT_NAMES),
    required=True,
    help="none sends in-distribution traffic.",
)
@click.option("--n", "count", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--labels", is_flag=True, help="Send each image's true label as feedback.")
@click.option(
    "--severity",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    show_default=True,
)
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A labeled image folder (any layout `cxr profile` reads); default: fresh synthetic "
    "patients.",
)
@click.option("--url", default=None, help="The service (default: http://127.0.0.1:<port>).")
@click.option("--seed", type=int, default=None, help="Which images and noise (default: random).")
@click.option("--site", default=None, help="Send as this site (the X-CXR-Site header).")
@click.pass_context
@_fail_cleanly
def simulate_drift(
    ctx: click.Context,
    shift: str,
    count: int,
    labels: bool,
    severity: float,
    source: Path | None,
    url: str | None,
    seed: int | None,
    site: str | None,
) -> None:
    """Send shifted (or in-distribution) images through the live service."""
    import secrets

    from cxr_platform.demo.traffic import folder_traffic, send_traffic, synthetic_traffic
    from cxr_platform.inference.log import site_name

    settings = _settings(ctx)
    if seed is None:
        seed = secrets.randbelow(2**31)
        while seed == settings.data.seed:
            seed = secrets.randbelow(2**31)
    url = url or f"http://127.0.0.1:{settings.serving.service_port}"
    images = (
        folder_traffic(source, count, seed)
        if source is not None
        else synthetic_traffic(settings.data, count, seed)
    )
    key = settings.serving.service_api_key
    report = send_traffic(
        url,
        images,
        shift=shift,
        severity=severity,
        labels=labels,
        api_key=key,
        seed=seed,
        site=site_name(site),
    )
    click.echo(f"{report.summary()} (seed {seed}, {url})")
    if report.answered == 0:
        raise CxrError(f"the service at {url} answered none of {report.sent} requests")


@cli.command()
@click.option("--version", "version", default=None, help="Registry version (default: production).")
@click.pass_context
@_fail_cleanly
def bento(ctx: click.Context, version: str | None) -> None:
    """Build a Bento of the service with a registry version pinned inside it."""
    from cxr_platform.serving.packaging import build_bento

    settings = _settings(ctx)
    built = build_bento(settings.registry, version)
    serve = built.serve_command(settings.serving.service_port)
    click.echo(
        f"Built {built.bento_tag} with model {built.model_tag} (registry version "
        f"{built.registry_version}).\n  serve it: {serve}"
    )


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable, by section.")
@click.pass_context
@_fail_cleanly
def config_command(ctx: click.Context, as_json: bool) -> None:
    """Show every setting in force, by section, with the variable that sets it.

    What the Dagster code location and every other command read too (secrets masked)."""
    shown = _settings(ctx).effective()
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    for section, values in shown.items():
        click.echo(f"[{section}]")
        for name, value in values.items():
            click.echo(f"  {env_name(name):<36} {json.dumps(value)}")


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


def main() -> None:
    cli(prog_name="cxr")


if __name__ == "__main__":
    main()

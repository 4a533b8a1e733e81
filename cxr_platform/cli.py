"""The ``cxr`` command: a thin shell over the library and the Dagster definitions."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from cxr_platform.errors import CxrError
from cxr_platform.settings import CxrSettings, load_settings

EXIT_USAGE = 2
EXIT_CHECKS_FAILED = 3

DAGSTER_YAML = """\
# Written by `cxr`: local Dagster storage lives in this folder (SQLite).
telemetry:
  enabled: false
"""


def _fail_cleanly(command):
    """Typed platform errors become one clear line on stderr and a non-zero exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CxrError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
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


def _settings(ctx: click.Context, **overrides: object) -> CxrSettings:
    return load_settings(home=ctx.obj.get("home"), **overrides)


def prepare_dagster_home(settings: CxrSettings) -> Path:
    """Create the home folder and a Dagster instance folder that `dagster dev` can share."""
    settings.ensure_dirs()
    config = settings.dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    return settings.dagster_home


DATA_OPTION = click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Data folder (default: $CXR_DATA_DIR, else the synthetic set).",
)


@cli.command()
@DATA_OPTION
@click.pass_context
@_fail_cleanly
def demo(ctx: click.Context, data_dir: Path | None) -> None:
    """Run the platform's main job through Dagster on the embedded default."""
    import dagster as dg

    from cxr_platform.data.splits import read_manifest, split_summary
    from cxr_platform.defs.definitions import DEMO_JOB, build_definitions

    settings = _settings(ctx, data_dir=data_dir)
    dagster_home = prepare_dagster_home(settings)
    # The run is recorded in the persistent instance so `dagster dev` shows it afterwards.
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    source = str(settings.data_dir) if settings.data_dir else "synthetic demo dataset"
    click.echo(f"Running Dagster job '{DEMO_JOB}' on {source} (home: {settings.home})")
    job = build_definitions(settings).resolve_job_def(DEMO_JOB)
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
    profile_json = json.loads((settings.reports_dir / "data_profile.json").read_text())
    click.echo(
        f"\nProfile: {profile_json['n_images']} images, {profile_json['n_unreadable']} "
        f"unreadable, {profile_json['n_patients']} patients, per class {profile_json['per_class']}"
    )
    manifest = read_manifest(settings.home / "splits" / "patient_splits.csv")
    click.echo("\n" + split_summary(manifest).to_string(index=False, float_format="%.3f"))
    click.echo(
        f"\nRun {result.run_id} succeeded. To browse it:\n"
        f"  DAGSTER_HOME={dagster_home} CXR_HOME={settings.home} "
        f"dagster dev -w workspace.yaml -p {settings.dagster_port}"
    )


def _print_evaluations(settings: CxrSettings) -> None:
    """The evaluation table of every model evaluated so far (test split)."""
    folder = settings.reports_dir / "evaluation"
    reports = sorted(folder.glob("*/evaluation.json")) if folder.exists() else []
    if not reports:
        return
    click.echo("\nTest split (threshold chosen on validation):")
    click.echo(
        f"  {'model':<14} {'pretrained':<10} {'AUC (95% CI)':<22} {'sens':>6} {'spec':>6} "
        f"{'PPV':>6} {'NPV':>6} {'thr':>6}"
    )
    for path in reports:
        values = json.loads(path.read_text())
        test = values["splits"]["test"]
        click.echo(
            f"  {values['model_name']:<14} {str(values['training'].get('pretrained')):<10} "
            f"{test['auc']:.3f} ({test['auc_ci_low']:.3f}-{test['auc_ci_high']:.3f})  "
            f"{_num(test['sensitivity'])} {_num(test['specificity'])} {_num(test['ppv'])} "
            f"{_num(test['npv'])} {values['operating_point']['threshold']:6.3f}"
        )


def _num(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def _profile_folder(ctx: click.Context, data_dir: Path, **overrides: object):
    """Settings for DATA_DIR, then discovery and a full profile (progress bar on a terminal)."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.sources import discover_images

    settings = _settings(ctx, data_dir=data_dir, **overrides)
    index = discover_images(data_dir)
    return settings, pipeline.profile(index, settings, progress=sys.stderr.isatty())


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
    default=(0.70, 0.15, 0.15),
    show_default=True,
    help="train val test fractions.",
)
@WORKERS_OPTION
@click.pass_context
@_fail_cleanly
def split(
    ctx: click.Context,
    data_dir: Path,
    out_path: Path,
    seed: int | None,
    ratios: tuple[float, float, float],
    workers: int | None,
) -> None:
    """Write a patient-level, label-stratified train/val/test split of DATA_DIR."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.splits import split_summary, write_manifest

    settings, profiled = _profile_folder(ctx, data_dir, workers=workers, seed=seed)
    if profiled.profile.n_unreadable:
        click.echo(
            f"left out {profiled.profile.n_unreadable} unreadable files "
            f"(run `cxr profile` for reasons)",
            err=True,
        )
    manifest, checks = pipeline.split(profiled, ratios=ratios, seed=settings.seed)
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
    type=click.Choice(["baseline_cnn", "resnet18", "resnet50", "densenet121"]),
    default="resnet18",
    show_default=True,
)
@click.option(
    "--profile",
    "profile_name",
    type=click.Choice(["demo", "full"]),
    default=None,
    help="Recipe defaults (default: demo on the synthetic set, full on real data).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Total epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--pretrained", type=click.Choice(["auto", "required", "none"]), default=None)
@click.option(
    "--weights",
    "weights_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Local ImageNet weights file (torchvision state dict).",
)
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: auto).")
@click.option("--resume", is_flag=True, help="Continue from the newest last.pt of this arch.")
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
    resume: bool,
) -> None:
    """Train one model on the patient split of the data and track it in MLflow."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.splits import manifest_hash
    from cxr_platform.models import pipeline as model_pipeline

    settings = _settings(ctx, data_dir=data_dir, device=device)
    progress = sys.stderr.isatty()
    manifest, cache = pipeline.prepare(settings, progress=progress)
    profile_used = profile_name or settings.resolved_training_profile
    config = model_pipeline.train_config_for(
        settings,
        arch,
        profile=profile_used,
        epochs=epochs,
        batch_size=batch_size,
        pretrained=pretrained,
        weights_path=weights_path,
    )
    click.echo(
        f"Training {arch} ({profile_used} profile: {config.frozen_epochs} frozen + "
        f"{config.finetune_epochs} fine-tune epochs) on {len(cache.index('train'))} images"
    )
    trained = model_pipeline.train_tracked(
        settings,
        cache,
        config,
        profile=profile_used,
        manifest_hash=manifest_hash(manifest),
        progress=progress,
        resume=resume,
    )
    click.echo(
        f"best validation AUC {trained.best_val_auc:.4f} at epoch {trained.best_epoch} "
        f"({trained.epochs_run} epochs, {trained.wall_seconds:.0f} s on {trained.device}, "
        f"pretrained={str(trained.pretrained).lower()})\n"
        f"checkpoint {trained.checkpoint}\nMLflow run {trained.mlflow_run_id} "
        f"({settings.tracking_uri})\nnext: cxr evaluate"
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

    home_settings = _settings(ctx)
    trained = model_pipeline.latest_trained(home_settings)
    settings = _settings(ctx, data_dir=trained.data_dir)
    manifest, cache = pipeline.prepare(settings, progress=sys.stderr.isatty())
    if trained.manifest_hash and manifest_hash(manifest) != trained.manifest_hash:
        raise CxrError(
            "the patient split differs from the one this model was trained on "
            "(data or split settings changed); retrain before evaluating"
        )
    report, files = model_pipeline.evaluate_trained(settings, cache, trained)
    click.echo(report_markdown(report))
    click.echo(f"report: {files['markdown'].parent}")
    if json_path:
        json_path.write_text(json.dumps(report.headline("test"), indent=2) + "\n")
        click.echo(f"wrote {json_path}")


def main() -> None:
    cli(prog_name="cxr")


if __name__ == "__main__":
    main()

"""Data commands: ``cxr profile`` and ``cxr split``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cxr_platform.cli.group import (
    EXIT_CHECKS_FAILED,
    WORKERS_OPTION,
    cli,
    fail_cleanly,
    settings_for,
)
from cxr_platform.terminal import interactive


def _profile_folder(ctx: click.Context, data_dir: Path, **overrides: object):
    """Settings for DATA_DIR, then discovery and a full profile (progress bar on a terminal)."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.sources import discover_images

    settings = settings_for(ctx, data_dir=data_dir, **overrides)
    index = discover_images(data_dir)
    return settings, pipeline.profile(index, settings.data, progress=interactive())


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
@fail_cleanly
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
@fail_cleanly
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

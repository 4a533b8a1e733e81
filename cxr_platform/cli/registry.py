"""Registry commands: ``cxr export``, ``models``, ``promote``, ``rollback`` and ``bento``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cxr_platform.cli.group import (
    DATA_OPTION,
    EXIT_CHECKS_FAILED,
    cli,
    fail_cleanly,
    number_text,
    settings_for,
)
from cxr_platform.defs.home import prepare_dagster_home
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.settings import CxrSettings
from cxr_platform.terminal import interactive


def _record_in_dagster(settings: CxrSettings, event) -> None:
    """CLI promotions and rollbacks appear in the Dagster UI as production_model events."""
    import dagster as dg

    from cxr_platform.defs.deployment_assets import record_registry_event

    instance = dg.DagsterInstance.from_config(str(prepare_dagster_home(settings)))
    record_registry_event(settings.registry, event, instance)


def _evaluation_settings(ctx: click.Context, data_dir: Path | None, release: VersionTags):
    """Settings for the model's own data folder (unless --data) and preprocessing (image size),
    so the gate scores it on the test split of the split it was trained with."""
    return settings_for(
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
@fail_cleanly
def export(ctx: click.Context, no_shadow: bool) -> None:
    """Export the latest evaluated model (ONNX + TorchScript), check parity, register it.

    The new registry version gets the alias 'shadow' unless --no-shadow."""
    from cxr_platform.data import pipeline
    from cxr_platform.deployment import pipeline as deployment
    from cxr_platform.models import pipeline as model_pipeline

    trained = model_pipeline.latest_trained(settings_for(ctx).training)
    settings = settings_for(ctx, data_dir=trained.data_dir)
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
@click.option(
    "--lung-fields",
    is_flag=True,
    help="The lung fields (segmentation) versions instead of the classifiers.",
)
@click.pass_context
@fail_cleanly
def models(
    ctx: click.Context, as_json: bool, card_version: str | None, as_html: bool, lung_fields: bool
) -> None:
    """List registered model versions with their aliases and metrics, or print one's card."""
    from cxr_platform.deployment.model_card import card_html
    from cxr_platform.deployment.registry import lung_registry_for, registry_for

    settings = settings_for(ctx).registry
    registry = lung_registry_for(settings) if lung_fields else registry_for(settings)
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
    if lung_fields:
        _list_lung_fields(registry.name, versions)
        return
    if not versions:
        click.echo(f"no versions of {registry.name} yet; run `cxr export`")
        return
    click.echo(
        f"{'version':>7}  {'aliases':<30} {'model':<14} {'test AUC':>8} {'sens':>6} {'spec':>6}"
        f"  {'threshold':>9}  {'created':<16}  intended use"
    )
    for v in versions:
        release = v.release
        m = release.metrics
        threshold = release.threshold if release.threshold is not None else float("nan")
        click.echo(
            f"{v.version:>7}  {','.join(v.aliases) or '-':<30} "
            f"{release.model_name or '?':<14} "
            f"{number_text(m.get('test_auc')):>8} {number_text(m.get('test_sensitivity'))} "
            f"{number_text(m.get('test_specificity'))}  {threshold:9.4f}"
            f"  {v.created_at:%Y-%m-%d %H:%M}  {_intended_use_text(release)}"
        )
    lungs = lung_registry_for(settings).find("production")
    if lungs is not None:
        click.echo(
            f"lung fields: version {lungs.version} in production, test Dice "
            f"{number_text(lungs.metrics.get('test_dice_mean')).strip()} "
            "(cxr models --lung-fields)"
        )


def _list_lung_fields(name: str, versions) -> None:
    if not versions:
        click.echo(
            f"no versions of {name} yet; materialize lung_fields_version (the release job, or "
            "`cxr demo`)"
        )
        return
    click.echo(
        f"{'version':>7}  {'aliases':<30} {'test Dice':>9} {'p5':>6} {'HD95 px':>7}"
        f"  {'created':<16}  gate"
    )
    for v in versions:
        release = v.release
        m = release.metrics
        if release.refused_at:
            gate = "refused: " + "; ".join((release.gate or {}).get("reasons", [])[:1])
        else:
            gate = "passed" if release.gate else "-"
        click.echo(
            f"{v.version:>7}  {','.join(v.aliases) or '-':<30} "
            f"{number_text(m.get('test_dice_mean')):>9} {number_text(m.get('test_dice_p5')):>6} "
            f"{number_text(m.get('test_hd95_px_mean')):>7}"
            f"  {v.created_at:%Y-%m-%d %H:%M}  {gate}"
        )


def _intended_use_text(release: VersionTags) -> str:
    """Ages and projections in a few characters; a declared, widened range is marked."""
    use = release.intended_use
    if not use:
        return "not stated"
    ages = use.get("age_years")
    parts = [f"{ages[0]}-{ages[1]} y" if ages else "ages not stated"]
    if use.get("widened_from"):
        parts[0] += " (declared by the site)"
    if use.get("projections"):
        parts.append("/".join(use["projections"]))
    outside = (release.population_check or {}).get("out_of_population") or {}
    if outside:
        refused = f"pixels: {outside.get('cv_refused_rate', 0):.0%} held out"
        if "left_out_refused_rate" in outside:
            refused += f", {outside['left_out_refused_rate']:.0%} from elsewhere"
        parts.append(refused)
    return ", ".join(parts)


@cli.command()
@click.argument("version")
@DATA_OPTION
@click.pass_context
@fail_cleanly
def promote(ctx: click.Context, version: str, data_dir: Path | None) -> None:
    """Promote VERSION (a number or 'shadow') to production if it passes the gate.

    The gate scores candidate and production on the same test split: by default that of the
    data the candidate was trained on. Exit code 3 when the gate refuses."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.splits import manifest_hash
    from cxr_platform.deployment import pipeline as deployment

    registry = deployment.registry_for(settings_for(ctx).registry)
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
    _rejudge_sites(settings_for(ctx))


@cli.command()
@click.pass_context
@fail_cleanly
def rollback(ctx: click.Context) -> None:
    """Point production back at the version the current one replaced."""
    from cxr_platform.deployment import pipeline as deployment

    settings = settings_for(ctx)
    event = deployment.registry_for(settings.registry).rollback(
        triggered_by=deployment.cli_trigger()
    )
    _record_in_dagster(settings, event)
    click.echo(f"production -> version {event.version} (rolled back from {event.previous_version})")
    _rejudge_sites(settings)


def _rejudge_sites(settings) -> None:
    """Production moved: every site's own version is judged again against it."""
    from cxr_platform.calibration.site_follow import rejudge_site_versions
    from cxr_platform.deployment import pipeline as deployment

    for outcome in rejudge_site_versions(
        settings.monitoring,
        settings.registry,
        target_sensitivity=settings.training.target_sensitivity,
        triggered_by=deployment.cli_trigger(),
    ):
        click.echo(outcome.summary())


@cli.command()
@click.option("--version", "version", default=None, help="Registry version (default: production).")
@click.pass_context
@fail_cleanly
def bento(ctx: click.Context, version: str | None) -> None:
    """Build a Bento of the service with a registry version pinned inside it."""
    from cxr_platform.serving.packaging import build_bento

    settings = settings_for(ctx)
    built = build_bento(settings.registry, version)
    serve = built.serve_command(settings.serving.service_port)
    click.echo(
        f"Built {built.bento_tag} with model {built.model_tag} (registry version "
        f"{built.registry_version}).\n  serve it: {serve}"
    )

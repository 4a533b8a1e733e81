"""Site commands: ``cxr recalibrate`` (a site's own operating point) and ``cxr simulate-drift``
(traffic into the live service, as a site would send it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cxr_platform.cli.group import EXIT_CHECKS_FAILED, cli, fail_cleanly, settings_for
from cxr_platform.data.shifts import SHIFT_NAMES
from cxr_platform.errors import CxrError


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
@fail_cleanly
def recalibrate(ctx: click.Context, site: str, from_traffic: bool, as_json: bool) -> None:
    """Propose an operating point for SITE from its labeled requests, register it (same
    weights) in shadow and let the paired gate judge it against the site's current version; a
    pass makes it the site's own production version. Exit code 3 when the gate refuses; 2 when
    labels are too few or show no better threshold (the message says how many more of each
    class would)."""
    from cxr_platform.calibration.site import (
        prior_adjust_for_site,
        recalibrate_for_site,
    )
    from cxr_platform.deployment import pipeline as deployment
    from cxr_platform.inference.log import site_name

    settings = settings_for(ctx)
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
@fail_cleanly
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

    settings = settings_for(ctx)
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


@cli.command("silent-trial")
@click.option("--site", required=True, help="The site, as the log names it.")
@click.option(
    "--pacs-url",
    default=None,
    help="The site archive's DICOMweb root (default: CXR_SITE_ARCHIVE_URL). Credentials come "
    "from CXR_SITE_ARCHIVE_AUTH, never from the command line.",
)
@click.option(
    "--from",
    "first",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="First study date searched in the archive.",
)
@click.option(
    "--to",
    "last",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="Last study date (default: the first).",
)
@click.option(
    "--images",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="A folder of DICOM/PNG/JPEG the site exported, instead of the archive.",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The site's report labels: CSV with 'label' (NORMAL/PNEUMONIA) and one of "
    "accession_number, study_instance_uid or path (relative to --images).",
)
@click.option("--model", "model_ref", default=None, help="Default: the version the site gets.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
@fail_cleanly
def silent_trial(
    ctx: click.Context,
    site: str,
    pacs_url: str | None,
    first,
    last,
    images: Path | None,
    labels: Path | None,
    model_ref: str | None,
    as_json: bool,
) -> None:
    """Score SITE's own studies as it would be served, sending nothing back, and write the
    site validation report (with --labels, against its radiology reports). Study dates run one
    after another here; the Dagster job `silent_trial` runs them as a partitioned backfill."""
    from cxr_platform.calibration import site_trial

    settings = settings_for(ctx)
    section = settings.site_trial
    if (images is None) == (first is None):
        raise click.UsageError("give either --images DIR or a date range (--from, --to)")
    with site_trial.opened_trial(section, settings.registry, site, model_ref) as (trial, version):
        if images is not None:
            summaries = [site_trial.run_folder(trial, images)]
        else:
            archive = site_trial.archive_for(section, pacs_url)
            days = site_trial.study_days(first.date(), (last or first).date())
            summaries = []
            for day in days:
                summaries.append(site_trial.run_archive_day(trial, archive, day))
                click.echo(_partition_line(summaries[-1]), err=True)
        partitions = [summary.partition for summary in summaries]
        report, folder = site_trial.site_validation_report(
            trial, version, section.reports_dir, labels_path=labels, partitions=partitions
        )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(
            f"{report.images} images of {report.studies} studies at {report.site}, version "
            f"{report.model_version}: {report.scored} scored, {sum(report.refused.values())} "
            f"refused, {report.failed_studies} studies not retrieved; "
            f"{report.labelled_images} labelled.\n"
            f"Verdict: {report.verdict.replace('_', ' ')}. {report.next_step}\n"
            f"Report: {folder / 'report.md'}"
        )


def _partition_line(summary) -> str:
    return (
        f"{summary.partition}: {summary.images} images, {summary.scored} scored, "
        f"{summary.refused} refused, {summary.failed} failed"
        + (f" ({summary.resumed} already scored)" if summary.resumed else "")
    )

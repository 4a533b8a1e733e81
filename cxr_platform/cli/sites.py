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

"""DICOM node commands: ``cxr dicom-node``, ``dicom-status`` and ``dicom-retry``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from cxr_platform.cli.group import cli, fail_cleanly, settings_for
from cxr_platform.errors import CxrError


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
    help="Send results by STOW-RS to this DICOMweb root URL instead of C-STORE; its "
    "Authorization header comes from CXR_DICOM_DESTINATION_DICOMWEB_AUTH (or the file named by "
    "CXR_DICOM_DESTINATION_DICOMWEB_AUTH_FILE), never from the command line.",
)
@click.option(
    "--dicomweb-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also receive by STOW-RS on this port (POST /dicom-web/studies).",
)
@click.pass_context
@fail_cleanly
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
    dicomweb_port: int | None,
) -> None:
    """Run the DICOM node: receive routed chest X-rays, return SR, SEG, parametric map and SC."""
    import signal
    import threading

    from cxr_platform.pacs import build_node
    from cxr_platform.redaction import withhold_logged_values

    if not (ctx.obj or {}).get("verbose"):
        logging.getLogger("cxr_platform").setLevel(logging.INFO)
    withhold_logged_values()  # library warnings quote header values; the node's log must not
    settings = settings_for(
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
        dicom_web_port=dicomweb_port,
    )
    node = build_node(settings.dicom, settings.registry)
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


@cli.command("dicom-echo")
@click.option("--host", default=None, help="Where the node runs (default: this machine).")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds per network step.")
@click.pass_context
@fail_cleanly
def dicom_echo(ctx: click.Context, host: str | None, timeout: float) -> None:
    """C-ECHO the DICOM node these settings describe (its health probe); exit 1 when it fails."""
    from cxr_platform.pacs.probe import echo_node

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the probe's answer says why
    answer = echo_node(settings_for(ctx).dicom, host=host, timeout=timeout)
    if not answer.ok:
        click.echo(f"error: {answer.detail}", err=True)
        ctx.exit(1)
    click.echo(answer.detail)


@cli.command("dicom-status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable counts.")
@click.pass_context
@fail_cleanly
def dicom_status(ctx: click.Context, as_json: bool) -> None:
    """What the DICOM node holds: processed and failed instances, spool and outbox sizes."""
    from cxr_platform.disk import MEGABYTE
    from cxr_platform.pacs.storage import NodeStorage

    state_dir = settings_for(ctx).dicom.dicom_dir
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
@fail_cleanly
def dicom_retry(ctx: click.Context) -> None:
    """Put the DICOM node's failed instances and refused results back in line."""
    from cxr_platform.pacs.storage import NodeStorage

    storage = NodeStorage(settings_for(ctx).dicom.dicom_dir)
    try:
        instances, results = storage.requeue_failed()
    finally:
        storage.close()
    click.echo(
        f"requeued {instances} instances (spool) and {results} results (outbox); a running node "
        "picks them up within a second"
    )

"""``cxr viewer``: OHIF over a running PACS's DICOMweb root, on one origin, for reading results."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cxr_platform.cli.group import cli, fail_cleanly, settings_for


@cli.command("viewer")
@click.option(
    "--pacs-url", default=None, help="The PACS (Orthanc) root; default http://127.0.0.1:8042."
)
@click.option("--host", default=None, help="Listen address (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Default 8080.")
@click.option("--study", default=None, help="StudyInstanceUID whose URL to print.")
@click.option(
    "--fetch-only",
    is_flag=True,
    help="Fetch and verify the pinned OHIF build into the cache, print where, and exit.",
)
@click.option(
    "--site-files",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the viewer's app-config.js and nginx server template here and exit (for an image).",
)
@click.pass_context
@fail_cleanly
def viewer(
    ctx: click.Context,
    pacs_url: str | None,
    host: str | None,
    port: int | None,
    study: str | None,
    fetch_only: bool,
    site_files: Path | None,
) -> None:
    """Serve OHIF over the PACS's DICOMweb root with nginx, read-only, and print where to open
    it (a study's URL on a terminal only: it names the study's UID)."""
    import signal
    import threading

    from cxr_platform.pacs.viewer import (
        OHIF,
        ViewerError,
        ViewerServer,
        ohif_dist,
        write_site_files,
    )

    settings = settings_for(
        ctx, viewer_pacs_url=pacs_url, viewer_host=host, viewer_port=port
    ).viewer
    dist = ohif_dist(settings.viewer_cache_dir)
    if site_files is not None:
        for path in write_site_files(site_files, dist):
            click.echo(str(path))
        return
    if fetch_only:
        click.echo(f"OHIF {OHIF.version} (integrity checked when fetched) in {dist}")
        return
    server = ViewerServer(settings, settings.viewer_dir, dist=dist)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    server.start()
    try:
        click.echo(
            f"OHIF {OHIF.version} at {server.url}, reading {settings.viewer_pacs_url}/dicom-web"
        )
        if study is None:
            try:
                study = server.latest_study()
            except ViewerError as exc:
                click.echo(f"(no study listed: {exc}; open the study list in the browser)")
        if study is not None and sys.stdout.isatty():
            click.echo(f"study: {server.study_url(study)}")
        elif study is not None:
            # Output that is not a terminal ends up in a log (a service's journal, a
            # container's): a study's address names its UID, which stays out of logs.
            click.echo(
                f"study list: {server.url}/ (a study's own address names its UID: it is "
                "printed on a terminal only)"
            )
        else:
            click.echo(f"study list: {server.url}/")
        sys.stdout.flush()
        stopped.wait()
    finally:
        server.stop()

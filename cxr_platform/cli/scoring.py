"""Scoring commands: ``cxr predict``, ``cxr explain`` and ``cxr serve``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import click

from cxr_platform.cli.group import cli, fail_cleanly, settings_for
from cxr_platform.data.patient_age import AgeReading
from cxr_platform.model_version.aliases import ALIASES, PRODUCTION
from cxr_platform.sections import PRECISIONS
from cxr_platform.settings import CxrSettings, settings_environment
from cxr_platform.terminal import interactive

if TYPE_CHECKING:
    from cxr_platform.inference.batch import BatchSummary


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_ref",
    default=None,
    help=f"{', '.join(ALIASES)} or a version number (default: the version the --site is "
    f"served by, its own production-site-<S> where it has one, else {PRODUCTION}).",
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
@click.option(
    "--ages",
    "ages_csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV of path,patient_age for images whose header says no age (PNG, JPEG): years or a "
    "DICOM age string. An image outside the version's intended use is refused in its row.",
)
@click.option(
    "--url",
    default=None,
    help="Score through the running service at this URL (POST /predict/batch, --batch-size "
    "images a request) instead of in this process: the service's production answers and "
    "logs, with its API key from CXR_SERVICE_API_KEY; the CSV gains request_id.",
)
@click.pass_context
@fail_cleanly
def predict(
    ctx: click.Context,
    inputs: tuple[Path, ...],
    model_ref: str | None,
    out: Path | None,
    batch_size: int,
    precision: str,
    no_log: bool,
    site: str | None,
    ages_csv: Path | None,
    url: str | None,
) -> None:
    """Predict PNG/JPEG/DICOM files and folders with a registered model, as CSV.

    Columns: path,probability,label,model_version,error. A file that cannot be read gets its
    error in its row and the run continues; the exit code is then 1. Predictions are recorded
    in the inference log (features only, no pixels) unless --no-log."""
    from cxr_platform.deployment.registry import registry_for
    from cxr_platform.inference.batch import expand_inputs, predict_to_csv, read_ages_csv
    from cxr_platform.inference.log import InferenceLog, site_name
    from cxr_platform.model_version.predictor import Predictor
    from cxr_platform.redaction import uid_salt

    settings = settings_for(ctx)
    site = site_name(site)  # a bad name fails before any image is read
    files = expand_inputs(inputs)
    ages = read_ages_csv(ages_csv) if ages_csv is not None else {}
    unmatched = set(ages) - {path.resolve() for path in files}
    if unmatched:
        click.secho(
            f"warning: {len(unmatched)} paths in {ages_csv} are not among the inputs "
            f"(e.g. {sorted(unmatched)[0]})",
            fg="yellow",
            err=True,
        )
    if url is not None:
        chosen = [
            name
            for name, given in (
                ("--model", model_ref is not None),
                ("--precision", precision != "fp32"),
                ("--no-log", no_log),
            )
            if given
        ]
        if chosen:
            raise click.UsageError(
                f"{', '.join(chosen)}: the service at --url decides the model, its precision "
                "and its log"
            )
        _predict_through_service(settings, url, files, out, batch_size, site, ages)
        return
    registry = registry_for(settings.registry)
    info = registry.get(model_ref or registry.version_for_site(site))
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
        "uid_salt": uid_salt(settings.serving.home, settings.serving.uid_salt),
        "site": site,
        "ages": ages,
        "progress": interactive() and len(files) > 1,
    }
    summary = _rows_to(out, lambda handle: predict_to_csv(predictor, files, handle, **options))
    click.echo(
        f"{summary.n_predicted} predicted ({summary.n_pneumonia} PNEUMONIA), "
        f"{summary.n_failed} failed, model {predictor.model_name} version {info.version}"
        + (f"; wrote {out}" if out else "")
        + ("" if no_log else f"; {summary.n_logged} logged"),
        err=True,
    )
    if summary.n_failed:
        sys.exit(1)


def _rows_to(out: Path | None, write: Callable[[TextIO], BatchSummary]) -> BatchSummary:
    """Standard output, or ``out`` once complete (``out.partial`` until then, so a crash keeps
    the rows written so far without passing them off as the whole)."""
    if out is None:
        return write(sys.stdout)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w", newline="") as handle:
        summary = write(handle)
    tmp.replace(out)
    return summary


def _predict_through_service(
    settings: CxrSettings,
    url: str,
    files: list[Path],
    out: Path | None,
    batch_size: int,
    site: str | None,
    ages: dict[Path, AgeReading],
) -> None:
    from cxr_platform.serving.client import ServiceTarget, predict_through_service

    target = ServiceTarget(url, api_key=settings.serving.service_api_key, site=site)
    options = {"batch_size": batch_size, "ages": ages, "progress": interactive() and len(files) > 1}
    summary = _rows_to(
        out, lambda handle: predict_through_service(target, files, handle, **options)
    )
    click.echo(
        f"{summary.n_predicted} predicted ({summary.n_pneumonia} PNEUMONIA), "
        f"{summary.n_failed} failed, by the service at {url}" + (f"; wrote {out}" if out else ""),
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
@click.option(
    "--patient-age",
    default=None,
    help="The patient's age when the image's header says none (years or a DICOM age string).",
)
@click.pass_context
@fail_cleanly
def explain(
    ctx: click.Context, image: Path, out: Path, model_ref: str, patient_age: str | None
) -> None:
    """Grad-CAM overlay for one image, with the prediction the service would return."""
    from cxr_platform.data.patient_age import InvalidAgeError, age_from_caller
    from cxr_platform.deployment.registry import lung_registry_for, registry_for
    from cxr_platform.explain.gradcam import png_bytes
    from cxr_platform.inference.explainer import Explainer
    from cxr_platform.model_version.lung_fields import FINDINGS, LungFieldModel
    from cxr_platform.model_version.predictor import Predictor

    registry = registry_for(settings_for(ctx).registry)
    info = registry.get(model_ref)
    folder = registry.download(info.version)
    try:
        age = age_from_caller(patient_age)
    except InvalidAgeError as exc:
        raise click.BadParameter(str(exc), param_hint="--patient-age") from exc
    lung_registry = lung_registry_for(settings_for(ctx).registry)
    lung_version = lung_registry.aliases().get(PRODUCTION)
    lung_fields = (
        LungFieldModel(lung_registry.download(lung_version), model_version=lung_version)
        if lung_version
        else None
    )
    explainer = Explainer(
        folder, Predictor(folder, model_version=info.version), lung_fields=lung_fields
    )
    explanation = explainer.explain(image, patient_age=age)
    out.write_bytes(png_bytes(explanation.overlay))
    p = explanation.prediction
    click.echo(
        f"{image}: {p.label} (probability {p.probability:.3f}, threshold {p.threshold:.3f}, "
        f"version {info.version}); overlay {out}"
    )
    lungs = explanation.lung_summary()
    if lungs:
        share = lungs.get("relevance_in_lungs")
        findings = [FINDINGS[name] for name in lungs["lung_field_findings"]]
        click.echo(
            f"lung fields v{lungs['lung_fields_version']}: "
            + ("no relevance to place" if share is None else f"{share:.0%} of the heatmap")
            + " lies on the lungs"
            + "".join(f"; {finding}" for finding in findings)
        )


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Default: 3100.")
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to listen on all.")
@click.pass_context
@fail_cleanly
def serve(ctx: click.Context, port: int | None, host: str) -> None:
    """Start the HTTP service (bentoml serve) on the registry's production model."""
    from cxr_platform.serving.process import REPO_ROOT, serve_command, service_environment

    settings = settings_for(ctx)
    port = port or settings.serving.service_port
    env = service_environment(settings_environment(settings))
    command = serve_command(port, host)
    click.echo(f"Serving on http://{host}:{port} (docs at /, try POST /predict with field 'file')")
    os.chdir(REPO_ROOT)
    os.execve(command[0], command, env)  # the service owns the terminal from here

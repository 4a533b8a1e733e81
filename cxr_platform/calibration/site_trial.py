"""A silent trial from the settings: what ``cxr silent-trial`` and the Dagster job
``silent_trial`` both call. Partitions are study dates (``YYYY-MM-DD``) for the archive, and
one partition per exported folder."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from cxr_platform.calibration.report_labels import read_report_labels
from cxr_platform.calibration.silent_trial import (
    PartitionSummary,
    SiteTrial,
    site_folder_name,
    trial_rows,
)
from cxr_platform.calibration.site_report import (
    SiteValidationReport,
    build_site_report,
    join_trial_labels,
    report_folder,
    write_report,
)
from cxr_platform.calibration.trial_sources import DicomWebArchive, folder_images
from cxr_platform.deployment.registry import registry_for
from cxr_platform.errors import CxrError
from cxr_platform.inference.log import InferenceLog, site_name
from cxr_platform.inference.retained import RetainedInputs
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.redaction import uid_salt
from cxr_platform.sections import RegistrySection, SiteTrialSection

log = logging.getLogger(__name__)

MAX_DAYS = 3660  # ten years: a range longer than that is a typo, not an archive


class TrialSetupError(CxrError):
    """A trial asked for with what it cannot run on (no archive URL, an empty date range)."""


def trials_root(section: SiteTrialSection) -> Path:
    return section.home / "silent_trials"


def study_days(first: date, last: date) -> list[date]:
    if last < first:
        raise TrialSetupError(f"the date range {first} to {last} is empty (it runs backwards)")
    days = (last - first).days + 1
    if days > MAX_DAYS:
        raise TrialSetupError(f"{days} days from {first} to {last}: at most {MAX_DAYS}")
    return [first + timedelta(days=n) for n in range(days)]


def folder_partition(folder: Path) -> str:
    """An exported folder's partition: named by its path, so two folders never share one."""
    resolved = str(folder.resolve())
    return f"folder-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


def archive_for(section: SiteTrialSection, url: str | None = None) -> DicomWebArchive:
    url = url or section.site_archive_url
    if not url:
        raise TrialSetupError(
            "no site archive: give its DICOMweb root (--pacs-url, or CXR_SITE_ARCHIVE_URL)"
        )
    return DicomWebArchive(
        url,
        authorization=section.site_archive_auth,
        ca_bundle=section.site_archive_tls_ca,
        timeout=section.site_archive_timeout_seconds,
    )


@dataclass(frozen=True)
class TrialVersion:
    version: str
    model_name: str
    threshold: float
    internal: dict[str, float]


@contextmanager
def opened_trial(
    section: SiteTrialSection,
    registry_section: RegistrySection,
    site: str,
    model_ref: str | None = None,
) -> Iterator[tuple[SiteTrial, TrialVersion]]:
    """The trial of the version ``site`` would be served by (or ``model_ref``), with the log
    open for as long as the block runs."""
    site = site_name(site) or ""
    if not site:
        raise TrialSetupError("a silent trial needs the site's name (--site)")
    registry = registry_for(registry_section)
    info = registry.get(model_ref or registry.version_for_site(site))
    version = info.version
    predictor = Predictor(
        registry.download(version), model_version=version, max_pixels=section.max_image_pixels
    )
    log = InferenceLog(section.inference_log_uri)
    try:
        trial = SiteTrial(
            site=site,
            predictor=predictor,
            log=log,
            uid_salt=uid_salt(section.home, section.uid_salt),
            folder=trials_root(section) / site_folder_name(site) / f"v{version}",
            max_pixels=section.max_image_pixels,
            retained=retained_inputs(section),
        )
        yield trial, TrialVersion(version, predictor.model_name, predictor.threshold, info.metrics)
    finally:
        log.dispose()


def retained_inputs(section: SiteTrialSection) -> RetainedInputs | None:
    """The kept-inputs store as the trial may use it: none with ``retain_inputs_days`` 0, and
    what has been kept longer than that days unlabeled deleted first, as the service does."""
    if section.retain_inputs_days <= 0:
        return None
    retained = RetainedInputs(section.retained_dir, section.retained_budget)
    try:
        removed = retained.prune(section.retain_inputs_days * 86400)
    except OSError:
        log.exception("could not prune retained inputs")
    else:
        if removed:
            log.info("deleted %d unlabeled inputs past retention", removed)
    return retained


def run_archive_day(trial: SiteTrial, archive: DicomWebArchive, day: date) -> PartitionSummary:
    return trial.run_partition(day.isoformat(), archive.day(day))


def run_folder(trial: SiteTrial, folder: Path) -> PartitionSummary:
    if not folder.is_dir():
        raise TrialSetupError(f"{folder}: no such folder")
    return trial.run_partition(folder_partition(folder), folder_images(folder))


def site_validation_report(
    trial: SiteTrial,
    version: TrialVersion,
    reports_dir: Path,
    *,
    labels_path: Path | None = None,
    partitions: list[str] | None = None,
) -> tuple[SiteValidationReport, Path]:
    """Join the labels (into the log too) and write the report of the trial's partitions."""
    rows = trial_rows(trial.folder, partitions)
    if rows.empty:
        raise TrialSetupError(
            f"no partition of the trial at {trial.site} has been run yet (version "
            f"{version.version})"
        )
    join = by_request = None
    if labels_path is not None:
        labels = read_report_labels(labels_path, trial.uid_salt)
        join, by_request = join_trial_labels(rows, labels, trial.log, trial.retained)
    report = build_site_report(
        rows,
        site=trial.site,
        model_name=version.model_name,
        model_version=version.version,
        threshold=version.threshold,
        internal=version.internal,
        labels_by_request=by_request,
        join=join,
        labels_file=labels_path.name if labels_path else None,
    )
    root = reports_dir / "silent_trial" / site_folder_name(trial.site) / f"v{version.version}"
    folder = write_report(report, report_folder(root, trial.folder, labels_path, partitions))
    return report, folder

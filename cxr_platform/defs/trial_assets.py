"""Group "sites": a silent trial of the site ``CXR_SILENT_TRIAL_SITE`` over its archive
(``CXR_SITE_ARCHIVE_URL``). ``silent_trial_partition`` is partitioned by study date, so a year
of archive is a backfill whose runs go in parallel and whose failed days are retried alone; each
day is idempotent. ``silent_trial_report`` writes the site validation report of every day run
so far, joined with ``CXR_SILENT_TRIAL_LABELS`` when set."""
# No `from __future__ import annotations`: Dagster inspects these annotations at runtime.

from contextlib import AbstractContextManager
from datetime import date

import dagster as dg

from cxr_platform.calibration.silent_trial import SiteTrial
from cxr_platform.calibration.site_trial import (
    TrialVersion,
    archive_for,
    opened_trial,
    run_archive_day,
    site_validation_report,
)
from cxr_platform.defs.metadata import home_path, readable
from cxr_platform.defs.resources import PlatformSettings
from cxr_platform.sections import SiteTrialSection
from cxr_platform.settings import CxrSettings

GROUP = "sites"
TRIAL_JOB = "silent_trial"
TRIAL_REPORT_JOB = "report_silent_trial"  # not the asset's own name: Dagster refuses that
# Every run that pulls from a site's archive carries this tag, so the run queue can cap how many
# pull at once (deploy/kubernetes/dagster-values.yaml: tagConcurrencyLimits): a year's backfill
# must not take the PACS's WADO-RS from the radiologists reading on it.
ARCHIVE_PULL_TAG = {"cxr/site-archive": "pull"}
DAYS_PER_RUN = 7
PARTITION_ASSET = "silent_trial_partition"


def _opened(settings: CxrSettings) -> AbstractContextManager[tuple[SiteTrial, TrialVersion]]:
    """The trial of the configured site, with the version it would be served by."""
    section = settings.site_trial
    if not section.silent_trial_site:
        raise dg.Failure("set CXR_SILENT_TRIAL_SITE to the site the trial is for")
    return opened_trial(section, settings.registry, section.silent_trial_site)


def _partition_asset(study_dates: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name=PARTITION_ASSET,
        group_name=GROUP,
        partitions_def=study_dates,
        # A mid-sized site has ~140 chest radiographs a day: a day takes less time than a run's
        # pod takes to start, so a backfill's run takes a week of days (RESULTS.md).
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=DAYS_PER_RUN),
        kinds={"onnx"},
        description="Study dates of the site's archive scored as the site would be served "
        "(nothing sent back): QIDO-RS finds the CR/DX studies, WADO-RS streams them, every image "
        "an inference-log row (source silent-trial). Running a day again scores only what it "
        "has not.",
    )
    def silent_trial_partition(
        context: dg.AssetExecutionContext, platform: PlatformSettings
    ) -> dg.MaterializeResult:
        settings = platform.settings()
        days = [date.fromisoformat(key) for key in context.partition_keys]
        with _opened(settings) as (trial, version):
            archive = archive_for(settings.site_trial)
            summaries = []
            for day in days:
                summaries.append(run_archive_day(trial, archive, day))
                context.log.info("%s", summaries[-1].to_dict())
        totals = {
            name: sum(getattr(summary, name) for summary in summaries)
            for name in ("images", "scored", "refused", "failed", "resumed")
        }
        return dg.MaterializeResult(
            metadata=readable({"model_version": version.version, "days": len(days), **totals})
        )

    return silent_trial_partition


@dg.asset(
    group_name=GROUP,
    deps=[PARTITION_ASSET],
    kinds={"markdown"},
    description="The site validation report of the days run so far: AUC, sensitivity, "
    "specificity, PPV, NPV with intervals by study against the report labels, refusals by "
    "reason, subgroups, beside the version's internal test figures, and the verdict.",
)
def silent_trial_report(platform: PlatformSettings) -> dg.MaterializeResult:
    settings = platform.settings()
    section = settings.site_trial
    with _opened(settings) as (trial, version):
        report, folder = site_validation_report(
            trial, version, section.reports_dir, labels_path=section.silent_trial_labels
        )
    figures = "\n".join(
        f"| {f.name} | {_text(f.site)} | {_text(f.low)}-{_text(f.high)} | "
        f"{_text(f.internal)} | {'falls' if f.falls else ''} |"
        for f in report.figures
    )
    return dg.MaterializeResult(
        metadata=readable(
            {
                "verdict": report.verdict,
                "next_step": report.next_step,
                "model_version": version.version,
                "studies": report.studies,
                "images": report.images,
                "scored": report.scored,
                "refused": report.refused,
                "labelled_images": report.labelled_images,
                "figures": dg.MetadataValue.md(
                    "| figure | site | 95% CI | internal test | |\n"
                    "| --- | ---: | --- | ---: | --- |\n" + figures
                ),
                "report": home_path(folder / "report.md", settings.home),
            }
        )
    )


def build_trial_definitions(section: SiteTrialSection) -> dg.Definitions:
    """The partitions start at ``CXR_SILENT_TRIAL_START_DATE``: read when the code loads."""
    partitions = _partition_asset(
        dg.DailyPartitionsDefinition(start_date=section.silent_trial_start_date, end_offset=1)
    )
    return dg.Definitions(
        assets=[partitions, silent_trial_report],
        jobs=[
            dg.define_asset_job(
                TRIAL_JOB,
                selection=[partitions],
                tags=ARCHIVE_PULL_TAG,
                description="Score the site's archive by study date, sending nothing back; "
                "backfill a range of days to run them in parallel.",
            ),
            dg.define_asset_job(
                TRIAL_REPORT_JOB,
                selection=[silent_trial_report],
                description="The site validation report of the silent trial's days so far.",
            ),
        ],
    )


def _text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"

"""Group "inference": ``batch_predictions``, a folder scored from the Dagster UI as ``cxr predict``
scores it: through the scoring core (input gate, intended use), one CSV row per file, the
predictions and refusals in the inference log (source ``batch``)."""
# No `from __future__ import annotations`: Dagster inspects these annotations at runtime.

from pathlib import Path
from typing import Any

import dagster as dg

from cxr_platform.defs.metadata import home_path, readable
from cxr_platform.defs.resources import PlatformSettings
from cxr_platform.deployment.registry import registry_for
from cxr_platform.inference.batch import expand_inputs, predict_to_csv, read_ages_csv
from cxr_platform.inference.log import InferenceLog, site_name
from cxr_platform.model_version.aliases import PRODUCTION
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.redaction import uid_salt

GROUP = "inference"
BATCH_JOB = "score_folder"


class BatchConfig(dg.Config):
    """What to score: files or folders (PNG/JPEG/DICOM) on the run's machine."""

    inputs: list[str]
    model: str = PRODUCTION  # an alias or a version number
    site: str | None = None  # where the images come from, kept in the log
    ages_csv: str | None = None  # path,patient_age for images whose header says no age


@dg.asset(
    group_name=GROUP,
    kinds={"onnx"},
    description="A folder scored through the scoring core, as `cxr predict` scores it: one CSV "
    "row per file (probability, label, version, or the reason there is none: unreadable, not a "
    "chest radiograph, outside the version's intended use), every row in the inference log.",
)
def batch_predictions(
    context: dg.AssetExecutionContext, config: BatchConfig, platform: PlatformSettings
) -> dg.Output[dict[str, Any]]:
    settings = platform.settings()
    files = expand_inputs(config.inputs)
    registry = registry_for(settings.registry)
    info = registry.get(config.model)
    predictor = Predictor(
        registry.download(info.version),
        model_version=info.version,
        max_pixels=settings.serving.max_image_pixels,
    )
    out = settings.serving.home / "reports" / "batch" / f"{context.run.run_id}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = InferenceLog(settings.serving.inference_log_uri)
    try:
        with out.open("w", newline="") as handle:
            summary = predict_to_csv(
                predictor,
                files,
                handle,
                log=log,
                uid_salt=uid_salt(settings.serving.home, settings.serving.uid_salt),
                site=site_name(config.site),
                ages=read_ages_csv(Path(config.ages_csv)) if config.ages_csv else None,
            )
    finally:
        log.dispose()
    refused = "\n".join(f"| {why} | {n} |" for why, n in sorted(summary.refused.items()))
    return dg.Output(
        {"csv": str(out), "version": info.version, **summary.to_dict()},
        metadata=readable(
            {
                "model_version": info.version,
                "n_files": summary.n_files,
                "n_predicted": summary.n_predicted,
                "n_pneumonia": summary.n_pneumonia,
                "n_failed": summary.n_failed,
                "refused": dg.MetadataValue.md(
                    "| reason | images |\n| --- | ---: |\n" + refused if refused else "none"
                ),
                "csv": home_path(out, settings.home),
            }
        ),
    )


score_folder_job = dg.define_asset_job(
    BATCH_JOB,
    selection=[batch_predictions],
    description="Score a folder with a registered version (production by default) as "
    "`cxr predict` does, from the launchpad.",
)


def build_batch_definitions() -> dg.Definitions:
    return dg.Definitions(assets=[batch_predictions], jobs=[score_folder_job])

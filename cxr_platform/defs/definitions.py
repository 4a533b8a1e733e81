"""The platform's single Dagster ``Definitions`` (loaded by ``workspace.yaml``).

Each ``defs`` module contributes its own ``Definitions``; they are merged here with the jobs that
span groups and the resources, which only this module declares.
"""

from __future__ import annotations

import dagster as dg

from cxr_platform.defs.batch_assets import build_batch_definitions
from cxr_platform.defs.data_assets import build_data_definitions
from cxr_platform.defs.deployment_assets import build_deployment_definitions
from cxr_platform.defs.monitoring_assets import build_monitoring_definitions
from cxr_platform.defs.resources import PlatformSettings
from cxr_platform.defs.segmentation_assets import build_segmentation_definitions
from cxr_platform.defs.training_assets import build_training_definitions, model_names
from cxr_platform.defs.trial_assets import build_trial_definitions
from cxr_platform.redaction import withhold_logged_values
from cxr_platform.settings import CxrSettings, load_settings

DATA_JOB = "data_pipeline"
TRAINING_JOB = "train_and_evaluate"
# Everything up to a production model and its Bento: what `cxr demo` runs before it starts the
# service and drives the monitoring loop.
RELEASE_JOB = "train_and_release"


def _pipeline_jobs() -> dg.Definitions:
    data = dg.AssetSelection.groups("data")
    training = dg.AssetSelection.groups("training", "segmentation")
    release = dg.AssetSelection.groups("explainability", "deployment")
    return dg.Definitions(
        jobs=[
            dg.define_asset_job(
                DATA_JOB, selection=data, description="Discover, profile, split, cache."
            ),
            dg.define_asset_job(
                TRAINING_JOB,
                selection=data | training,
                description="Data, then train, evaluate and compare every configured model, and "
                "the lung segmentation version where lung masks exist.",
            ),
            dg.define_asset_job(
                RELEASE_JOB,
                selection=data | training | release,
                description="Data, training, then explain, export, register as shadow and let "
                "the promotion gate decide about production (what `cxr demo` runs before the "
                "monitoring loop).",
            ),
        ]
    )


def build_definitions(settings: CxrSettings | None = None) -> dg.Definitions:
    settings = settings or load_settings()
    models = settings.training.models
    resources = dg.Definitions(
        resources={
            "platform": PlatformSettings.from_settings(settings),
            "io_manager": dg.FilesystemIOManager(
                base_dir=str(settings.dagster.dagster_home / "storage")
            ),
        }
    )
    return dg.Definitions.merge(
        build_data_definitions(),
        build_training_definitions(models, settings.training.combines_models),
        build_segmentation_definitions(tuple(models)),
        build_deployment_definitions(model_names(models, settings.training.combines_models)),
        build_monitoring_definitions(settings.monitoring),
        build_batch_definitions(),
        build_trial_definitions(settings.site_trial),
        _pipeline_jobs(),
        resources,
    )


# Run workers and the code server import this module: what their steps log is redacted as well.
withhold_logged_values()
defs = build_definitions()

"""The platform's single Dagster ``Definitions`` (loaded by ``workspace.yaml``)."""

from __future__ import annotations

import dagster as dg

from cxr_platform.defs.data_assets import data_assets, split_checks
from cxr_platform.defs.deployment_assets import build_deployment_definitions
from cxr_platform.defs.monitoring_assets import build_monitoring_definitions
from cxr_platform.defs.resources import PlatformSettings
from cxr_platform.defs.training_assets import build_training_definitions
from cxr_platform.settings import CxrSettings, load_settings

DATA_JOB = "data_pipeline"
TRAINING_JOB = "train_and_evaluate"
RELEASE_JOB = "train_and_release"
# The job `cxr demo` runs; each stage of the platform adds its assets to it.
DEMO_JOB = "demo"


def build_definitions(settings: CxrSettings | None = None) -> dg.Definitions:
    settings = settings or load_settings()
    data = dg.AssetSelection.groups("data")
    training = dg.AssetSelection.groups("training")
    release = dg.AssetSelection.groups("explainability", "deployment")
    training_assets, training_checks = build_training_definitions(settings.models)
    deployment_assets = build_deployment_definitions(settings.models)
    monitoring = build_monitoring_definitions(settings)
    return dg.Definitions(
        assets=[*data_assets, *training_assets, *deployment_assets, *monitoring["assets"]],
        asset_checks=[*split_checks, *training_checks],
        jobs=[
            dg.define_asset_job(
                DATA_JOB, selection=data, description="Discover, profile, split, cache."
            ),
            dg.define_asset_job(
                TRAINING_JOB,
                selection=data | training,
                description="Data, then train, evaluate and compare every configured model.",
            ),
            dg.define_asset_job(
                RELEASE_JOB,
                selection=data | training | release,
                description="Data, training, then explain, export, register as shadow and let "
                "the promotion gate decide about production.",
            ),
            dg.define_asset_job(
                DEMO_JOB,
                selection=data | training | release,
                description="Everything `cxr demo` runs before it starts the service and "
                "drives the monitoring loop (drift_check, fine_tune, evaluate_shadow).",
            ),
            *monitoring["jobs"],
        ],
        sensors=monitoring["sensors"],
        schedules=monitoring["schedules"],
        resources={
            "platform": PlatformSettings.from_settings(settings),
            "io_manager": dg.FilesystemIOManager(base_dir=str(settings.dagster_home / "storage")),
        },
    )


defs = build_definitions()

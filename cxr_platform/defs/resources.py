"""Resources: the platform settings, overridable per run from the Dagster launchpad."""

from __future__ import annotations

import dagster as dg

from cxr_platform.settings import CxrSettings, load_settings


class PlatformSettings(dg.ConfigurableResource):
    """Unset fields fall back to the ``CXR_*`` environment (see :class:`CxrSettings`)."""

    home: str | None = None
    data_dir: str | None = None
    seed: int | None = None
    workers: int | None = None
    synthetic_patients: int | None = None
    image_size: int | None = None
    training_profile: str | None = None
    device: str | None = None
    mlflow_tracking_uri: str | None = None
    min_test_auc: float | None = None
    min_test_sensitivity: float | None = None
    min_test_specificity: float | None = None
    gate_max_auc_drop: float | None = None
    registry_model_name: str | None = None
    inference_log_url: str | None = None
    drift_window_size: int | None = None
    shadow_min_records: int | None = None
    shadow_min_labeled: int | None = None
    finetune_epochs: int | None = None
    finetune_lr: float | None = None

    def settings(self) -> CxrSettings:
        return load_settings(
            home=self.home,
            data_dir=self.data_dir,
            seed=self.seed,
            workers=self.workers,
            synthetic_patients=self.synthetic_patients,
            image_size=self.image_size,
            training_profile=self.training_profile,
            device=self.device,
            mlflow_tracking_uri=self.mlflow_tracking_uri,
            min_test_auc=self.min_test_auc,
            min_test_sensitivity=self.min_test_sensitivity,
            min_test_specificity=self.min_test_specificity,
            gate_max_auc_drop=self.gate_max_auc_drop,
            registry_model_name=self.registry_model_name,
            inference_log_url=self.inference_log_url,
            drift_window_size=self.drift_window_size,
            shadow_min_records=self.shadow_min_records,
            shadow_min_labeled=self.shadow_min_labeled,
            finetune_epochs=self.finetune_epochs,
            finetune_lr=self.finetune_lr,
        )

    @classmethod
    def from_settings(cls, settings: CxrSettings) -> PlatformSettings:
        return cls(
            home=str(settings.home),
            data_dir=str(settings.data_dir) if settings.data_dir else None,
            seed=settings.seed,
            workers=settings.workers,
            synthetic_patients=settings.synthetic_patients,
            image_size=settings.image_size,
            training_profile=settings.training_profile,
            device=settings.device,
            mlflow_tracking_uri=settings.mlflow_tracking_uri,
            min_test_auc=settings.min_test_auc,
            min_test_sensitivity=settings.min_test_sensitivity,
            min_test_specificity=settings.min_test_specificity,
            gate_max_auc_drop=settings.gate_max_auc_drop,
            registry_model_name=settings.registry_model_name,
            inference_log_url=settings.inference_log_url,
            drift_window_size=settings.drift_window_size,
            shadow_min_records=settings.shadow_min_records,
            shadow_min_labeled=settings.shadow_min_labeled,
            finetune_epochs=settings.finetune_epochs,
            finetune_lr=settings.finetune_lr,
        )

"""The platform's one settings object.

Everything local lives under ``home`` (env ``CXR_HOME``, default ``./.cxr``): Dagster storage,
MLflow's SQLite backend and artifacts, caches, reports, the inference log. Every store is a path
or URL derived here, so moving to PostgreSQL or object storage is configuration, not code.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SPLIT_RATIOS = (0.70, 0.15, 0.15)


class CxrSettings(BaseSettings):
    """Typed settings, read from ``CXR_*`` environment variables (and an optional ``.env``)."""

    model_config = SettingsConfigDict(
        env_prefix="CXR_", env_file=".env", extra="ignore", frozen=True
    )

    home: Path = Field(default=Path(".cxr"), description="Root of all local state.")
    data_dir: Path | None = Field(
        default=None,
        description="Image source; when unset the synthetic demo dataset is generated and used.",
    )
    seed: int = Field(default=1337, description="Seed for splits and the synthetic dataset.")
    split_ratios: tuple[float, float, float] = DEFAULT_SPLIT_RATIOS
    synthetic_patients: int = Field(default=160, ge=4)
    image_size: int = Field(default=224, ge=32)
    workers: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1),
        ge=1,
        description="Processes used to decode images.",
    )
    max_image_pixels: int = Field(
        default=100_000_000, description="Decompression-bomb guard: larger images are refused."
    )
    mlflow_tracking_uri: str | None = None
    models: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("baseline_cnn", "resnet18"),
        description="Architectures the Dagster code location trains (one asset chain each).",
    )
    training_profile: Literal["auto", "demo", "full"] = Field(
        default="auto", description="auto: demo on the synthetic set, full on real data."
    )
    device: str = Field(default="auto", description="torch device; auto = CUDA, then CPU.")
    torch_compile: bool = Field(
        default=False,
        description="torch.compile the training forward passes: tens of seconds to compile, "
        "then faster steps; pays off on long GPU runs.",
    )
    pretrained: Literal["auto", "required", "none"] = "auto"
    threshold_rule: Literal["sensitivity_target", "youden"] = "sensitivity_target"
    target_sensitivity: float = Field(default=0.95, gt=0, le=1)
    # Blocking floors on test AUC / sensitivity; unset means the profile's default.
    min_test_auc: float | None = Field(default=None, ge=0, le=1)
    min_test_sensitivity: float | None = Field(default=None, ge=0, le=1)
    min_test_specificity: float | None = Field(
        default=None, ge=0, le=1, description="Promotion floor; default depends on the profile."
    )
    gate_max_auc_drop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="A candidate's test AUC may be at most this much below production's; "
        "default depends on the profile.",
    )
    registry_model_name: str = "cxr-pneumonia-classifier"
    export_int8: bool = Field(
        default=True,
        description="Also export an INT8 ONNX model when validation AUC drops <= 0.005.",
    )
    inference_log_url: str | None = None
    dagster_port: int = 3000
    # BentoML also defaults to 3000; the service gets its own port so both can run side by side.
    service_port: int = 3100
    service_max_upload_mb: float = Field(
        default=64, gt=0, description="Larger uploads are refused with 413 before decoding."
    )
    service_api_key: SecretStr | None = Field(
        default=None,
        description="When set, /predict, /explain, /model and /feedback need it in X-API-Key.",
    )
    service_refresh_seconds: float = Field(
        default=10, gt=0, description="How often the service checks the registry's aliases."
    )
    service_max_batch_size: int = Field(
        default=32, ge=1, description="Most images per ONNX Runtime call (adaptive batching)."
    )
    service_threads: int | None = Field(
        default=None, ge=1, description="ONNX Runtime threads in the scorer; default: all cores."
    )
    serving_model: str | None = Field(
        default=None,
        description="A BentoML model tag to serve instead of following the registry (Bentos).",
    )
    service_precision: Literal["fp32", "int8"] = Field(
        default="fp32",
        description="int8 serves the quantized variant when the export kept one.",
    )

    retain_inputs_days: float = Field(
        default=30,
        ge=0,
        description="Days the service keeps each model input for a feedback label to make it "
        "training data (0: keep none).",
    )
    drift_window_size: int = Field(default=200, ge=10, description="Records per drift window.")
    drift_check_interval_seconds: int = Field(
        default=300, ge=1, description="How often the drift sensor looks at the inference log."
    )
    drift_feature_p_value: float = Field(default=0.01, gt=0, lt=1)
    drift_input_share: float = Field(
        default=0.5, gt=0, le=1, description="Input drift: share of features that drifted."
    )
    drift_severe_p_value: float = Field(
        default=1e-6, gt=0, lt=1, description="Input drift: one feature this far off suffices."
    )
    drift_prediction_p_value: float = Field(default=0.01, gt=0, lt=1)
    drift_positive_rate_change: float = Field(default=0.2, gt=0, le=1)
    drift_min_labeled: int = Field(default=30, ge=2)
    drift_max_auc_drop: float = Field(default=0.10, ge=0, le=1)
    drift_max_sensitivity_drop: float = Field(default=0.10, ge=0, le=1)
    drift_report_cron: str = Field(default="0 6 * * *", description="The daily drift report.")
    finetune_cooldown_windows: int = Field(
        default=10,
        ge=0,
        description="Windows to wait after a fine-tune request before another for the same "
        "production version.",
    )
    finetune_epochs: int | None = Field(default=None, ge=1, description="Default: 2 demo, 5 full.")
    finetune_lr: float | None = Field(default=None, gt=0, description="Default: 1e-4 demo, 1e-5.")
    shadow_min_records: int = Field(
        default=100, ge=0, description="Live requests a shadow scores before it is evaluated."
    )
    shadow_min_labeled: int = Field(
        default=30, ge=2, description="Labeled shadow requests needed to compare on live data."
    )

    # The DICOM node (``cxr dicom-node``): a Storage SCP that PACS routes chest X-rays to.
    dicom_ae_title: str = Field(default="CXR_AI", description="The node's own AE title.")
    dicom_host: str = Field(default="0.0.0.0", description="Address the node listens on.")
    dicom_port: int = Field(default=11112, ge=1, le=65535)
    dicom_destination: str | None = Field(
        default=None, description="Where results go: AET@HOST:PORT (the PACS or the router)."
    )
    dicom_allowed_aets: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Calling AE titles allowed to associate (comma-separated); empty allows any.",
    )
    dicom_max_associations: int = Field(default=10, ge=1)
    dicom_accept_lateral: bool = Field(
        default=False, description="Also classify lateral views (the model saw frontal ones)."
    )
    dicom_results: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("sr", "seg", "sc"), description="Objects returned to PACS: any of sr, seg, sc."
    )
    dicom_uid_root: str = Field(
        default="1.2.826.0.1.3680043.8.498.", description="UID root for the objects the node makes."
    )
    dicom_institution_name: str | None = None
    dicom_retry_initial_seconds: float = Field(default=2.0, gt=0)
    dicom_retry_max_seconds: float = Field(default=300.0, gt=0)
    dicom_tls_cert: Path | None = Field(default=None, description="PEM certificate: enables TLS.")
    dicom_tls_key: Path | None = None
    dicom_tls_ca: Path | None = Field(
        default=None, description="PEM CA bundle: when set, callers must present a certificate."
    )
    dicom_destination_tls_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle that signed the destination's certificate: sends results over "
        "TLS (with CXR_DICOM_TLS_CERT/KEY as the client certificate when set).",
    )

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute_data_dir(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @field_validator("service_api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: object) -> object:
        # CXR_SERVICE_API_KEY= (set but empty) must not demand an empty key.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("models", mode="before")
    @classmethod
    def _comma_separated_models(cls, value: object) -> object:
        # CXR_MODELS=baseline_cnn,resnet18,densenet121 reads more naturally than a JSON list.
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("dicom_allowed_aets", "dicom_results", mode="before")
    @classmethod
    def _comma_separated_names(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> CxrSettings:
        if abs(sum(self.split_ratios) - 1.0) > 1e-6 or min(self.split_ratios) <= 0:
            raise ValueError(f"split_ratios must be positive and sum to 1, got {self.split_ratios}")
        return self

    @cached_property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @cached_property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @cached_property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @cached_property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @cached_property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def inference_log_uri(self) -> str:
        if self.inference_log_url:
            return self.inference_log_url
        return f"sqlite:///{self.home / 'inference_log.db'}"

    @cached_property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def uses_synthetic_data(self) -> bool:
        return self.data_dir is None

    @property
    def resolved_training_profile(self) -> str:
        if self.training_profile != "auto":
            return self.training_profile
        return "demo" if self.uses_synthetic_data else "full"

    @property
    def evaluation_floors(self) -> tuple[float, float]:
        """(test AUC, test sensitivity) a model must reach before anything ships it.

        The demo profile trains from scratch for a few CPU minutes, so its floors only say
        "clearly better than chance"; real-data floors are what a screening tool needs.
        """
        demo = self.resolved_training_profile == "demo"
        auc = self.min_test_auc if self.min_test_auc is not None else (0.6 if demo else 0.85)
        sensitivity = self.min_test_sensitivity
        if sensitivity is None:
            sensitivity = 0.75 if demo else 0.90
        return auc, sensitivity

    @property
    def specificity_floor(self) -> float:
        """Specificity at the operating threshold a model needs for promotion. The threshold
        buys 0.95 sensitivity, so the demo's briefly trained models pay for it here."""
        if self.min_test_specificity is not None:
            return self.min_test_specificity
        return 0.2 if self.resolved_training_profile == "demo" else 0.7

    @property
    def max_auc_drop(self) -> float:
        """How far a candidate's test AUC may fall below production's. The demo's test split
        (about 60 images) cannot tell AUCs apart more finely than a few points (its bootstrap
        95% CI is about +-0.09 wide), so demo candidates get 0.03; real data 0.01."""
        if self.gate_max_auc_drop is not None:
            return self.gate_max_auc_drop
        return 0.03 if self.resolved_training_profile == "demo" else 0.01

    @property
    def service_max_upload_bytes(self) -> int:
        return int(self.service_max_upload_mb * 1024 * 1024)

    @property
    def retained_dir(self) -> Path:
        return self.home / "retained"

    @property
    def drift_reports_dir(self) -> Path:
        return self.reports_dir / "drift"

    @property
    def dicom_dir(self) -> Path:
        """The node's spool, outbox and state database."""
        return self.home / "dicom"

    @property
    def registry_cache_dir(self) -> Path:
        return self.home / "registry"

    def synthetic_dataset_dir(self) -> Path:
        return self.datasets_dir / f"synthetic-seed{self.seed}-p{self.synthetic_patients}"

    def ensure_dirs(self) -> None:
        for path in (
            self.home,
            self.dagster_home,
            self.datasets_dir,
            self.cache_dir,
            self.reports_dir,
            self.mlflow_dir,
            self.models_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)


def load_settings(**overrides: object) -> CxrSettings:
    """Settings from the environment, with explicit overrides (CLI flags, Dagster config) on top."""
    clean = {key: value for key, value in overrides.items() if value is not None}
    return CxrSettings(**clean)

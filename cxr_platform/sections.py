"""The platform's configuration, declared once, in sections.

Each section is a frozen dataclass holding what one part of the library needs (data, training,
registry, serving, dicom, monitoring; ``dagster`` for the orchestration shell). A field's name is
its environment variable with the ``CXR_`` prefix removed (``seed`` is ``CXR_SEED``), and the
same name in two sections is one setting that both read. :mod:`cxr_platform.settings` builds the
environment reader from these declarations, the Dagster resource and ``cxr config`` are built
from that reader, so **adding a setting means adding one field here** (with :func:`setting`) to
each section that needs it.

Standard library only: the training code imports this on the accelerator machine, which has torch
but not pydantic-settings, pydicom, MLflow or Dagster.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Literal, get_args

from cxr_platform.disk import DiskBudget
from cxr_platform.redaction import MIN_SALT_CHARACTERS

# Named choices: the settings, the library and the CLI's options all take them from here.
TrainingProfile = Literal["demo", "full"]
TRAINING_PROFILES: tuple[str, ...] = get_args(TrainingProfile)
ProfileChoice = Literal["auto", "demo", "full"]
PretrainedMode = Literal["auto", "required", "none"]
PRETRAINED_MODES: tuple[str, ...] = get_args(PretrainedMode)
# What a version's graph averages over besides the image itself.
TestTimeAugmentation = Literal["none", "flip"]
TEST_TIME_AUGMENTATIONS: tuple[str, ...] = get_args(TestTimeAugmentation)
ThresholdRuleName = Literal["sensitivity_target", "youden"]
THRESHOLD_RULES: tuple[str, ...] = get_args(ThresholdRuleName)
TrainingLauncher = Literal["in_process", "subprocess", "kubernetes"]
TRAINING_LAUNCHERS: tuple[str, ...] = get_args(TrainingLauncher)
Precision = Literal["fp32", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
RESULT_KINDS: tuple[str, ...] = ("sr", "seg", "pmap", "sc")
IMAGE_RESULT_KINDS: tuple[str, ...] = ("seg", "pmap", "sc")  # the ones with pixels to compress

DEFAULT_SPLIT_RATIOS = (0.70, 0.15, 0.15)

_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    *,
    doc: str = "",
    factory: Any = _MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    secret: bool = False,
) -> Any:
    """A setting's declaration: default, description and bounds.

    The bounds are checked when a section is built and by the environment reader; a ``secret``
    never appears in a repr, in Dagster run config or in ``cxr config``.
    """
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "secret": secret}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, repr=not secret, metadata=metadata)
    return dataclasses.field(default=default, repr=not secret, metadata=metadata)


_BOUNDS = {
    "ge": (lambda value, bound: value >= bound, ">="),
    "gt": (lambda value, bound: value > bound, ">"),
    "le": (lambda value, bound: value <= bound, "<="),
    "lt": (lambda value, bound: value < bound, "<"),
}


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota (a
    container's CPU limit), which ``os.cpu_count()`` ignores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # cgroup v1, or no cgroup: the affinity is all there is
    return max(1, cores)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@dataclass(frozen=True)
class HomeLayout:
    """Where everything local lives: one folder (``CXR_HOME``), laid out here and nowhere else."""

    home: Path = setting(Path(".cxr"), doc="Root of all local state.")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or isinstance(value, bool):
                continue
            for key, (holds, sign) in _BOUNDS.items():
                bound = field.metadata.get(key)
                if bound is not None and not holds(value, bound):
                    raise ValueError(f"{field.name} must be {sign} {bound}, got {value!r}")

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def splits_dir(self) -> Path:
        return self.home / "splits"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def drift_reports_dir(self) -> Path:
        return self.reports_dir / "drift"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def registry_cache_dir(self) -> Path:
        return self.home / "registry"

    @property
    def retained_dir(self) -> Path:
        return self.home / "retained"

    @property
    def dicom_dir(self) -> Path:
        """The node's spool, outbox and state database."""
        return self.home / "dicom"

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


def _data_dir() -> Any:
    return setting(
        None,
        doc="Image source; when unset the synthetic demo dataset is generated and used.",
    )


def _seed() -> Any:
    return setting(1337, doc="Seed for splits, the synthetic dataset, training and bootstraps.")


def _max_image_pixels() -> Any:
    return setting(100_000_000, doc="Decompression-bomb guard: larger images are refused.", ge=1)


def _retain_inputs_max_mb() -> Any:
    return setting(
        2048.0,
        doc="Byte budget (MB) of the kept inputs, labeled ones included (0: none). Past it the "
        "oldest unlabeled inputs make room; labeled ones are never deleted by it. ~50 KB each.",
        ge=0,
    )


def _retain_inputs_days() -> Any:
    return setting(
        30.0,
        doc="Days each model input is kept (by the service and the silent trial) for a feedback "
        "or report label to make it training data; unlabeled ones are deleted after (0: keep "
        "none).",
        ge=0,
    )


def default_log_url(home: Path) -> str:
    return sqlite_url(home / "inference_log.db")


def _inference_log_url() -> Any:
    return setting(
        None,
        doc="The inference log's database URL (default: SQLite in the home); keep a "
        "PostgreSQL password in PGPASSWORD or ~/.pgpass rather than in the URL.",
    )


@dataclass(frozen=True)
class TrackedSection(HomeLayout):
    """What the MLflow tracking store and the profile-dependent floors need."""

    data_dir: Path | None = _data_dir()
    seed: int = _seed()
    training_profile: ProfileChoice = setting(
        "auto", doc="auto: demo on the synthetic set, full on real data."
    )
    mlflow_tracking_uri: str | None = setting(
        None, doc="MLflow tracking URI (default: SQLite in the home)."
    )
    mlflow_ui_url: str | None = setting(
        None,
        doc="Where people open MLflow's UI, for links in Dagster and model cards (default: the "
        "tracking server when it is one; none for the embedded SQLite store).",
    )
    min_test_auc: float | None = setting(
        None, doc="Blocking floor on test AUC; default depends on the profile.", ge=0, le=1
    )
    min_test_sensitivity: float | None = setting(
        None, doc="Blocking floor on test sensitivity; default depends on the profile.", ge=0, le=1
    )
    min_test_dice: float | None = setting(
        None,
        doc="Blocking floor on the lung segmentation version's mean test Dice; default depends "
        "on the profile (demo 0.80, full 0.95).",
        ge=0,
        le=1,
    )

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or sqlite_url(self.mlflow_dir / "mlflow.db")

    @property
    def ui_url(self) -> str | None:
        if self.mlflow_ui_url:
            return self.mlflow_ui_url.rstrip("/")
        if self.tracking_uri.startswith(("http://", "https://")):
            return self.tracking_uri.rstrip("/")
        return None

    @property
    def profile(self) -> str:
        """The training profile in force: ``auto`` resolves by where the data comes from."""
        if self.training_profile != "auto":
            return self.training_profile
        return "demo" if self.data_dir is None else "full"

    @property
    def is_demo(self) -> bool:
        return self.profile == "demo"

    @property
    def evaluation_floors(self) -> tuple[float, float]:
        """(test AUC, test sensitivity) a model must reach before anything ships it.

        Real-data floors are what a screening tool needs. The demo's models reach test AUC
        0.95-0.98 on the synthetic set in a few CPU minutes (benchmarks/RESULTS.md); its floors
        sit below that by about the width of its test split's intervals, so a demo model that
        ships is a good one, and one that fails says something broke.
        """
        auc = self.min_test_auc
        if auc is None:
            auc = 0.9 if self.is_demo else 0.85
        sensitivity = self.min_test_sensitivity
        if sensitivity is None:
            sensitivity = 0.85 if self.is_demo else 0.90
        return auc, sensitivity

    @property
    def dice_floor(self) -> float:
        """Mean test Dice a lung segmentation version must reach: below 0.95 on real lungs its
        fields are not drawn well enough to say where a heatmap lies (the lung-fields issue's
        target). The demo's floor checks plumbing on its synthetic ellipses."""
        if self.min_test_dice is not None:
            return self.min_test_dice
        return 0.80 if self.is_demo else 0.95


@dataclass(frozen=True)
class DataSection(HomeLayout):
    """Discovery, profiling, the patient-level split and the preprocessed cache."""

    data_dir: Path | None = _data_dir()
    seed: int = _seed()
    split_ratios: tuple[float, float, float] = setting(
        DEFAULT_SPLIT_RATIOS, doc="train/val/test shares of patients (JSON list, sums to 1)."
    )
    synthetic_patients: int = setting(400, doc="Patients in the synthetic demo dataset.", ge=4)
    image_size: int = setting(224, doc="Model input side in pixels.", ge=32)
    workers: int = setting(factory=usable_cores, doc="Processes used to decode images.", ge=1)
    max_image_pixels: int = _max_image_pixels()
    lung_mask_dir: Path | None = setting(
        None,
        doc="Lung-field masks laid out like the images (<folder>/<image's folder>/<image's "
        "stem>.png, 0 background, 255 lung, each the size of its image): the main job then also "
        "trains, evaluates and registers a lung segmentation version. Unset: the synthetic set's "
        "own masks, or none for real data.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        ratios = tuple(self.split_ratios)
        if len(ratios) != 3 or abs(sum(ratios) - 1.0) > 1e-6 or min(ratios) <= 0:
            raise ValueError(f"split_ratios must be 3 positive shares summing to 1, got {ratios}")

    def synthetic_dataset_dir(self) -> Path:
        return self.datasets_dir / f"synthetic-seed{self.seed}-p{self.synthetic_patients}"


@dataclass(frozen=True)
class TrainingSection(TrackedSection):
    """Training and evaluation: which models, on what device, and the operating-point rule."""

    models: tuple[str, ...] = setting(
        ("baseline_cnn", "resnet18"),
        doc="Architectures the Dagster code location trains (comma-separated; one chain each).",
    )
    device: str = setting("auto", doc="torch device; auto = CUDA, then CPU.")
    lung_segmentation_epochs: int | None = setting(
        None,
        doc="Most epochs the lung segmentation version trains (it stops earlier when its "
        "validation Dice stalls); default depends on the profile (demo 5, full 10).",
        ge=1,
    )
    torch_compile: bool = setting(
        False,
        doc="torch.compile the training forward passes: tens of seconds to compile, then "
        "faster steps; pays off on long GPU runs.",
    )
    pretrained: PretrainedMode = setting("auto", doc="ImageNet weights: auto, required or none.")
    threshold_rule: ThresholdRuleName = setting(
        "sensitivity_target", doc="How validation picks the operating threshold."
    )
    target_sensitivity: float = setting(
        0.95, doc="Sensitivity the threshold is chosen for.", gt=0, le=1
    )
    training_nproc_per_node: int = setting(
        1,
        doc="Training processes on one machine with DistributedDataParallel: one per GPU, or "
        "CPU processes sharing the cores (`cxr train --nproc-per-node`, the training assets).",
        ge=1,
    )
    ensemble: bool | None = setting(
        None,
        doc="Also combine the trained models into one ensemble version (the `ensemble/` assets): "
        "each member's calibrated logit, averaged in one graph. It competes for shadow by "
        "validation AUC like the others. Unset: on for the full profile (real data) with two "
        "models or more, off for the demo (benchmarks/ensemble_search.py).",
    )
    ensemble_tta: TestTimeAugmentation = setting(
        "none",
        doc="The ensemble version's test-time augmentation: none, or flip (each image and its "
        "mirror image, twice the inference cost).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ensemble and len(set(self.models)) < 2:
            raise ValueError(
                f"ensemble needs two models or more to combine; models is {list(self.models)}"
            )

    @property
    def combines_models(self) -> bool:
        """Whether the release builds the ensemble version. On real data it holds the
        specificity of the better member under shifts where validation AUC alone would pick
        the other (benchmarks/RESULTS.md); the demo keeps its few minutes."""
        if self.ensemble is not None:
            return self.ensemble
        return not self.is_demo and len(set(self.models)) >= 2


@dataclass(frozen=True)
class RegistrySection(TrackedSection):
    """The model registry, export and the promotion gate."""

    registry_model_name: str = setting(
        "cxr-pneumonia-classifier", doc="The registered model's name in MLflow."
    )
    registry_lung_model_name: str = setting(
        "cxr-lung-fields",
        doc="The lung segmentation version's registered model in MLflow: its production "
        "version draws the lung fields the service and the DICOM node report on.",
    )
    min_test_specificity: float | None = setting(
        None, doc="Promotion floor on specificity; default depends on the profile.", ge=0, le=1
    )
    gate_max_auc_drop: float | None = setting(
        None,
        doc="A candidate's test AUC may be at most this much below production's; default "
        "depends on the profile.",
        ge=0,
        le=1,
    )
    export_int8: bool = setting(
        True, doc="Also export an INT8 ONNX model when validation AUC drops <= 0.005."
    )
    intended_age_years: str | None = setting(
        None,
        doc="The age range a version is declared for, in completed years (as 1-17), instead of "
        "what its training data says; needs CXR_INTENDED_AGE_REASON. Recorded on the version "
        "as declared and shown in bold on its card; the check by pixels stays.",
    )
    intended_age_reason: str | None = setting(
        None, doc="The evidence for CXR_INTENDED_AGE_YEARS (a local validation, a study)."
    )
    out_of_population_dir: tuple[Path, ...] = setting(
        (),
        doc="Images of patients a version is not for (for a paediatric model, adults' chest "
        "radiographs), one folder per collection, several separated as PATH separates them "
        "(or one folder whose subfolders are the collections). Export fits the check by pixels "
        "against all of them and records how many it refuses, cross-validated by patient and "
        "with each collection left out in turn. Unset: no check by pixels.",
    )
    inference_log_url: str | None = _inference_log_url()
    lock_url: str | None = setting(
        None,
        doc="Database whose lock serializes promotions: PostgreSQL (an advisory lock) when "
        "promoters run on several machines; default: the inference log's database.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        declared = (self.intended_age_years or "").strip()
        reason = (self.intended_age_reason or "").strip()
        if declared and not reason:
            raise ValueError(
                "intended_age_years needs intended_age_reason: a declared range says why"
            )
        if declared:
            parts = declared.split("-")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"intended_age_years must read as 1-17, not {declared!r}")
            if int(parts[0]) > int(parts[1]) or int(parts[1]) > 130:
                raise ValueError(f"intended_age_years must run upwards to at most 130: {declared}")

    @property
    def declared_age_range(self) -> tuple[int, int] | None:
        if not (self.intended_age_years or "").strip():
            return None
        low, high = self.intended_age_years.split("-")  # type: ignore[union-attr]
        return int(low), int(high)

    @property
    def lock_uri(self) -> str:
        return self.lock_url or self.inference_log_url or default_log_url(self.home)

    @property
    def specificity_floor(self) -> float:
        """Specificity at the operating threshold a model needs for promotion (the threshold
        buys 0.95 sensitivity on validation)."""
        if self.min_test_specificity is not None:
            return self.min_test_specificity
        return 0.7

    @property
    def max_auc_drop(self) -> float:
        """How far a candidate's test AUC may fall below production's. The demo's test split
        (about 150 images of 60 patients) cannot tell AUCs apart more finely than a few points
        (its patient-level 95% interval is about +-0.03 wide), so demo candidates get 0.03;
        real data 0.01."""
        if self.gate_max_auc_drop is not None:
            return self.gate_max_auc_drop
        return 0.03 if self.is_demo else 0.01


@dataclass(frozen=True)
class _Logged(HomeLayout):
    inference_log_url: str | None = _inference_log_url()
    uid_salt: str | None = setting(
        None,
        doc="The key that hashes study and instance UIDs in the inference log and in log lines "
        "(at least 32 characters). Set the same one on every replica and process that writes "
        "the log, or they hash one study differently; unset, each home makes its own.",
        secret=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        salt = self.uid_salt
        salt = salt.get_secret_value() if hasattr(salt, "get_secret_value") else salt
        if salt and len(salt.strip()) < MIN_SALT_CHARACTERS:
            # Refused when the settings are read (exit 2 with the variable's name), not at the
            # first scored image; the value is never echoed.
            raise ValueError(
                f"CXR_UID_SALT must be at least {MIN_SALT_CHARACTERS} characters (a short key "
                "makes the hashed UIDs guessable); make one with: openssl rand -hex 32"
            )

    @property
    def inference_log_uri(self) -> str:
        return self.inference_log_url or default_log_url(self.home)


@dataclass(frozen=True)
class _Scoring(_Logged):
    """What every edge that scores images shares: the log, the decoder guard, the live models."""

    max_image_pixels: int = _max_image_pixels()
    service_refresh_seconds: float = setting(
        10.0, doc="How often live models check the registry's aliases.", gt=0
    )
    service_threads: int | None = setting(
        None, doc="ONNX Runtime threads in the scorer; default: all cores.", ge=1
    )
    min_free_disk_mb: float = setting(
        1024.0,
        doc="Free-space watermark (MB) of the filesystem under the home: below it the service "
        "stops keeping inputs for feedback and the DICOM node refuses new instances (0: off).",
        ge=0,
    )


@dataclass(frozen=True)
class ServingSection(_Scoring):
    """The HTTP service (BentoML)."""

    # BentoML also defaults to 3000; the service gets its own port so both can run side by side.
    service_port: int = setting(3100, doc="The HTTP service's port.", ge=1, le=65535)
    service_max_upload_mb: float = setting(
        64.0, doc="Larger uploads are refused with 413 before decoding.", gt=0
    )
    service_api_key: str | None = setting(
        None,
        doc="When set, /predict, /explain, /model and /feedback need it in X-API-Key.",
        secret=True,
    )
    service_site_keys: str | None = setting(
        None,
        doc="Per-site API keys, site=key comma-separated: a request with a site's key is "
        "logged as that site and cannot claim another.",
        secret=True,
    )
    service_max_batch_size: int = setting(
        32, doc="Most images per ONNX Runtime call (adaptive batching).", ge=1
    )
    service_max_request_images: int = setting(
        64, doc="Most images in one POST /predict/batch (more: 413 too_many_images).", ge=1
    )
    serving_model: str | None = setting(
        None, doc="A BentoML model tag to serve instead of following the registry (Bentos)."
    )
    service_precision: Precision = setting(
        "fp32", doc="int8 serves the quantized variant when the export kept one."
    )
    retain_inputs_days: float = _retain_inputs_days()
    retain_inputs_max_mb: float = _retain_inputs_max_mb()

    @property
    def service_max_upload_bytes(self) -> int:
        return int(self.service_max_upload_mb * 1024 * 1024)

    @property
    def retained_budget(self) -> DiskBudget:
        return DiskBudget.from_megabytes(self.retain_inputs_max_mb, self.min_free_disk_mb)


@dataclass(frozen=True)
class DicomSection(_Scoring):
    """The DICOM node (``cxr dicom-node``): a Storage SCP that PACS routes chest X-rays to."""

    dicom_ae_title: str = setting("CXR_AI", doc="The node's own AE title.")
    dicom_host: str = setting("0.0.0.0", doc="Address the node listens on.")
    dicom_port: int = setting(
        11112, doc="Port the node listens on (0: one the system picks).", ge=0, le=65535
    )
    dicom_destination: str | None = setting(
        None, doc="Where results go: AET@HOST:PORT (the PACS or the router)."
    )
    dicom_allowed_aets: tuple[str, ...] = setting(
        (), doc="Calling AE titles allowed to associate (comma-separated); empty allows any."
    )
    dicom_max_associations: int = setting(10, doc="Concurrent associations accepted.", ge=1)
    dicom_workers: int = setting(
        usable_cores(),
        doc="Processes that score instances and build results (default: the cores); 0 scores "
        "in the node's own process, on one core.",
        ge=0,
    )
    dicom_send_associations: int = setting(
        4,
        doc="Studies whose results go to the destination at once, each over its own "
        "association (or STOW-RS request).",
        ge=1,
    )
    dicom_accept_lateral: bool = setting(
        False, doc="Also classify lateral views (the model saw frontal ones)."
    )
    dicom_results: tuple[str, ...] = setting(
        RESULT_KINDS,
        doc="Objects returned to PACS: any of sr, seg, pmap, sc (comma-separated); an image the "
        "input gate refuses gets its not-analysed SR whatever this says.",
    )
    dicom_uid_root: str = setting(
        "1.2.826.0.1.3680043.8.498.", doc="UID root for the objects the node makes."
    )
    dicom_refusal_sr: bool = setting(
        True,
        doc="When the input gate refuses an image whose header says it shows the chest, return "
        "a short SR saying it was not analysed and why (other refusals are only logged).",
    )
    dicom_institution_name: str | None = setting(None, doc="InstitutionName in the results.")
    dicom_compress_results: tuple[str, ...] = setting(
        ("seg", "pmap"),
        doc="Image results sent losslessly compressed where the destination accepts it (SEG "
        "and map deflated, SC in JPEG-LS): any of seg, pmap, sc (comma-separated; empty for "
        "none). On a 2000x1700 image the SEG shrinks ~24x for ~10 ms of CPU and the map ~13x "
        "for ~200 ms; the SC ~9x for ~90 ms, worth it on a slow link, not on a busy small host.",
    )
    dicom_retry_initial_seconds: float = setting(
        2.0, doc="First wait before resending a result.", gt=0
    )
    dicom_retry_max_seconds: float = setting(300.0, doc="Longest wait between resends.", gt=0)
    dicom_destination_dicomweb: str | None = setting(
        None,
        doc="A DICOMweb server's root URL results go to by STOW-RS instead of C-STORE "
        "(e.g. https://pacs.example/dicom-web).",
    )
    dicom_destination_dicomweb_auth: str | None = setting(
        None,
        doc="The Authorization header value for the DICOMweb destination (Bearer ... or "
        "Basic ...).",
        secret=True,
    )
    dicom_web_port: int | None = setting(
        None,
        doc="Port of the node's STOW-RS endpoint (POST /dicom-web/studies); unset: DIMSE only. "
        "Uses the node's TLS certificate when one is set.",
        ge=0,
        le=65535,
    )
    dicom_web_keys: str | None = setting(
        None,
        doc="DICOMweb clients allowed to store, name=key comma-separated; a client sends its "
        "key as Authorization: Bearer or X-API-Key, and its name is logged as the site. "
        "Required unless the node listens on 127.0.0.1.",
        secret=True,
    )
    dicom_web_max_upload_mb: float = setting(
        1024.0, doc="Largest STOW-RS request body (MB); larger ones get 413.", gt=0
    )
    dicom_spool_max_mb: float = setting(
        4096.0,
        doc="Byte budget (MB) of received instances waiting to be scored: past it C-STORE "
        "answers 0xA700 (out of resources) until the worker catches up (0: none).",
        ge=0,
    )
    dicom_outbox_max_mb: float = setting(
        4096.0,
        doc="Byte budget (MB) of results waiting for the destination: past it the worker stops "
        "scoring (instances wait in the spool) until PACS takes results again (0: none).",
        ge=0,
    )
    dicom_tls_cert: Path | None = setting(None, doc="PEM certificate: enables TLS.")
    dicom_tls_key: Path | None = setting(None, doc="PEM private key of the certificate.")
    dicom_tls_ca: Path | None = setting(
        None, doc="PEM CA bundle: when set, callers must present a certificate."
    )
    dicom_destination_tls_ca: Path | None = setting(
        None,
        doc="PEM CA bundle that signed the destination's certificate: sends results over TLS "
        "(with CXR_DICOM_TLS_CERT/KEY as the client certificate when set).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.dicom_results) - set(RESULT_KINDS))
        if unknown:
            raise ValueError(f"dicom_results: unknown kinds {unknown}; choose from {RESULT_KINDS}")
        unknown = sorted(set(self.dicom_compress_results) - set(IMAGE_RESULT_KINDS))
        if unknown:
            raise ValueError(
                f"dicom_compress_results: unknown kinds {unknown}; choose from {IMAGE_RESULT_KINDS}"
            )


@dataclass(frozen=True)
class MonitoringSection(_Logged):
    """Drift detection on the inference log, fine-tuning on feedback, and shadow evaluation."""

    drift_window_size: int = setting(200, doc="Records per drift window.", ge=10)
    drift_check_interval_seconds: int = setting(
        300, doc="How often the drift sensor looks at the inference log.", ge=1
    )
    drift_feature_p_value: float = setting(
        0.01, doc="Input drift: a feature drifted below this p-value.", gt=0, lt=1
    )
    drift_input_share: float = setting(
        0.5, doc="Input drift: share of features that drifted.", gt=0, le=1
    )
    drift_severe_p_value: float = setting(
        1e-6, doc="Input drift: one feature this far off suffices.", gt=0, lt=1
    )
    drift_prediction_p_value: float = setting(
        0.01, doc="Prediction drift: the score distribution moved below this p-value.", gt=0, lt=1
    )
    drift_positive_rate_change: float = setting(
        0.2, doc="Prediction drift: change in the positive rate that counts.", gt=0, le=1
    )
    drift_min_labeled: int = setting(
        30, doc="Labeled records a window needs before performance is judged.", ge=2
    )
    recalibration_min_negatives: int = setting(
        10,
        doc="NORMAL labels a site needs before its operating point is proposed and judged.",
        ge=5,
    )
    recalibration_margin: float = setting(
        0.02,
        doc="How far below the target sensitivity a site's new operating point may be at the "
        "low end of its 95% interval (the paired gate's floor is the target less this).",
        ge=0,
        lt=0.5,
    )
    recalibration_min_specificity_gain: float = setting(
        0.02,
        doc="Specificity a site's raised threshold must gain at the low end of its interval "
        "(a change smaller than this is not worth a new version).",
        ge=0,
        lt=1,
    )
    drift_max_auc_drop: float = setting(
        0.10, doc="Performance drift: AUC drop below the version's test AUC.", ge=0, le=1
    )
    drift_max_sensitivity_drop: float = setting(
        0.10, doc="Performance drift: sensitivity drop below the version's.", ge=0, le=1
    )
    drift_max_specificity_drop: float = setting(
        0.10,
        doc="Performance drift: specificity at the version's threshold below the version's.",
        ge=0,
        le=1,
    )
    drift_max_refusal_rate: float = setting(
        0.05,
        doc="Refusal drift: share of a window's images the input gate refused (misrouted or "
        "foreign images), when significantly above the gate's validation rate.",
        ge=0,
        le=1,
    )
    drift_commit_grace_seconds: float = setting(
        60.0,
        doc="How long the drift sensor waits for a log row that a writer has numbered but not "
        "yet committed (PostgreSQL) before cutting a window past it.",
        ge=0,
    )
    drift_report_cron: str = setting("0 6 * * *", doc="The daily drift report.")
    finetune_cooldown_windows: int = setting(
        10,
        doc="Windows to wait after a fine-tune request before another for the same production "
        "version.",
        ge=0,
    )
    finetune_epochs: int | None = setting(None, doc="Default: 2 demo, 5 full.", ge=1)
    finetune_lr: float | None = setting(None, doc="Default: 1e-4 demo, 1e-5 full.", gt=0)
    shadow_min_records: int = setting(
        100, doc="Live requests a shadow scores before it is evaluated.", ge=0
    )
    shadow_min_labeled: int = setting(
        30, doc="Labeled shadow requests needed to compare on live data.", ge=2
    )


@dataclass(frozen=True)
class SiteTrialSection(_Scoring):
    """A silent trial: a site's archive scored before go-live, answers sent to no one."""

    site_archive_url: str | None = setting(
        None,
        doc="The site PACS's DICOMweb root that a silent trial searches (QIDO-RS) and "
        "retrieves from (WADO-RS), e.g. https://pacs.example/dicom-web.",
    )
    site_archive_auth: str | None = setting(
        None,
        doc="The Authorization header value for the site archive (Basic ... or Bearer ...).",
        secret=True,
    )
    site_archive_tls_ca: Path | None = setting(
        None,
        doc="PEM CA bundle the archive's certificate is checked against (default: the system's; "
        "certificates are always checked).",
    )
    site_archive_timeout_seconds: float = setting(
        60.0, doc="How long one archive request may take.", gt=0
    )
    silent_trial_site: str | None = setting(
        None, doc="The site the Dagster job `silent_trial` scores, as the log names it."
    )
    silent_trial_start_date: str = setting(
        "2025-01-01",
        doc="The first study date the Dagster job `silent_trial` has a partition for "
        "(YYYY-MM-DD); one partition per day up to today.",
    )
    silent_trial_labels: Path | None = setting(
        None,
        doc="The site's report labels (CSV) that the Dagster asset `silent_trial_report` joins.",
    )
    # The trial keeps each model input, as the service does, so that a report label makes it
    # training data for a fine-tune; the same store, days and budget.
    retain_inputs_days: float = _retain_inputs_days()
    retain_inputs_max_mb: float = _retain_inputs_max_mb()

    @property
    def retained_budget(self) -> DiskBudget:
        return DiskBudget.from_megabytes(self.retain_inputs_max_mb, self.min_free_disk_mb)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            date.fromisoformat(self.silent_trial_start_date)
        except ValueError as exc:
            raise ValueError(
                f"silent_trial_start_date must be YYYY-MM-DD, not {self.silent_trial_start_date!r}"
            ) from exc


@dataclass(frozen=True)
class DagsterSection(HomeLayout):
    """The orchestration shell: where `dagster dev` listens (its instance lives in the home)."""

    dagster_port: int = setting(3000, doc="Port `dagster dev` is told to use.", ge=1, le=65535)
    dagster_postgres_url: str | None = setting(
        None,
        doc="Dagster's runs, events and schedules in this PostgreSQL database "
        "(postgresql+psycopg2://user@host:port/db; Dagster speaks psycopg2) instead of SQLite "
        "in the home.",
    )
    training_launcher: TrainingLauncher = setting(
        "in_process",
        doc="Where the training assets train: in the run's process, in a `cxr train` process "
        "(Dagster Pipes), or in a Kubernetes pod running `cxr train` (Dagster Pipes).",
    )
    training_k8s_image: str = setting(
        "cxr-platform:latest", doc="Image of the training pod (training_launcher=kubernetes)."
    )
    training_k8s_namespace: str = setting(
        "cxr-platform", doc="Namespace of the training pod (training_launcher=kubernetes)."
    )
    training_k8s_home_claim: str = setting(
        "cxr-home",
        doc="PersistentVolumeClaim the training pod mounts as CXR_HOME, shared with the runs "
        "(training_launcher=kubernetes).",
    )


@dataclass(frozen=True)
class ViewerSection(HomeLayout):
    """OHIF, where radiologists read the results, served on one origin with the PACS's
    DICOMweb root (`cxr viewer` here; the viewer image in a deployment reads the same names)."""

    viewer_pacs_url: str = setting(
        "http://127.0.0.1:8042",
        doc="The PACS (Orthanc) whose DICOMweb root, <url>/dicom-web, the viewer reads.",
    )
    viewer_host: str = setting("127.0.0.1", doc="Address the viewer listens on.")
    viewer_port: int = setting(8080, doc="The viewer's port.", ge=1, le=65535)
    viewer_tls_cert: Path | None = setting(
        None,
        doc="PEM certificate (chain) the viewer serves HTTPS with; needed on any address but "
        "loopback (readers' credentials cross the network).",
    )
    viewer_tls_key: Path | None = setting(None, doc="The viewer certificate's PEM private key.")
    viewer_cache_dir: Path = setting(
        factory=lambda: Path.home() / ".cache" / "cxr_platform" / "ohif",
        doc="Where the pinned, checksum-verified OHIF build is kept once fetched (shared by "
        "every home on the machine).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.viewer_pacs_url.startswith(("http://", "https://")):
            raise ValueError(
                f"viewer_pacs_url must be an http:// or https:// URL (Orthanc's root), not "
                f"{self.viewer_pacs_url!r}"
            )
        if (self.viewer_tls_cert is None) != (self.viewer_tls_key is None):
            raise ValueError("viewer_tls_cert and viewer_tls_key go together: set both or neither")

    @property
    def viewer_dir(self) -> Path:
        """The local nginx's configuration, logs and temporary files."""
        return self.home / "viewer"


SECTIONS: dict[str, type[HomeLayout]] = {
    "data": DataSection,
    "training": TrainingSection,
    "registry": RegistrySection,
    "serving": ServingSection,
    "dicom": DicomSection,
    "monitoring": MonitoringSection,
    "site_trial": SiteTrialSection,
    "dagster": DagsterSection,
    "viewer": ViewerSection,
}

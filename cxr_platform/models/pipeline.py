"""Training and evaluation as the platform runs them: tracked in MLflow, stored under the home.

Shared by the Dagster assets and the ``cxr`` CLI so both produce identical runs and files.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.transforms import TensorBatches
from cxr_platform.errors import CxrError
from cxr_platform.models.checkpoint import Checkpoint, file_sha256
from cxr_platform.models.distributed import (
    SINGLE,
    Ranks,
    from_main,
    join_from_environment,
    launch,
    leave,
    rank_device,
    share_cpu,
)
from cxr_platform.models.evaluation import (
    INTERVAL_FIELDS,
    EvaluationReport,
    ThresholdRule,
    evaluate_predictions,
)
from cxr_platform.models.recipe import TrainConfig, training_profile, with_epochs
from cxr_platform.models.reporting import plot_learning_curves, write_report_files
from cxr_platform.models.subgroups import evaluate_subgroups, subgroup_columns
from cxr_platform.models.training import (
    EpochRecord,
    TrainingData,
    TrainingResult,
    epoch_lines,
    predict_logits,
    select_device,
    train,
)
from cxr_platform.models.zoo import architecture
from cxr_platform.provenance import git_commit
from cxr_platform.sections import TrackedSection, TrainingSection
from cxr_platform.tracking import ExperimentTracker, TrackedRun

log = logging.getLogger(__name__)

LATEST_POINTER = "latest.json"


@dataclass(frozen=True)
class TrainedModel:
    """A finished training run: where its best checkpoint is and how it got there."""

    model_name: str
    arch: str
    checkpoint: Path
    mlflow_run_id: str
    profile: str
    best_epoch: int
    best_val_auc: float
    epochs_run: int
    stopped_early: bool
    pretrained: bool
    weights_source: str | None
    device: str
    wall_seconds: float
    train_images_per_s: float
    manifest_hash: str | None
    data_dir: str | None = None  # None: the synthetic demo set of the same settings
    schedule: str = ""  # the phases as run (the scratch schedule can differ from the config)
    # Taken when training wrote it; every later step checks the file against it.
    checkpoint_sha256: str | None = None
    world_size: int = 1  # the processes that trained it, as they ran (not as configured)
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # An ensemble's members with their own figures (models/ensemble.py Member.figures); [] for
    # a model that was trained.
    members: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("history")
        values["checkpoint"] = str(self.checkpoint)
        return values

    def to_json(self) -> dict[str, Any]:
        """Everything, history included, as JSON values (the latest pointer, a Pipes message)."""
        return {**self.summary(), "history": self.history}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TrainedModel:
        return cls(**{**values, "checkpoint": Path(values["checkpoint"])})


def tracker_for(store: TrackedSection) -> ExperimentTracker:
    store.ensure_dirs()
    return ExperimentTracker(store.tracking_uri, artifact_root=store.mlflow_dir / "artifacts")


def train_config_for(training: TrainingSection, arch: str, **overrides: Any) -> TrainConfig:
    profile = overrides.pop("profile", None) or training.profile
    epochs = overrides.pop("epochs", None)
    values: dict[str, Any] = {
        "seed": training.seed,
        "device": training.device,
        "compile": training.torch_compile,
    }
    if architecture(arch).imagenet_weights is not None:
        values["pretrained"] = training.pretrained
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = training_profile(profile, arch, **values)
    if epochs is not None:
        config = with_epochs(config, epochs)
    return config


def train_tracked(
    training: TrainingSection,
    cache: PreprocessedCache,
    config: TrainConfig,
    *,
    profile: str,
    manifest_hash: str | None = None,
    dagster_run_id: str | None = None,
    progress: bool = True,
    resume: bool = False,
    data: TrainingData | None = None,
    tags: dict[str, str | None] | None = None,
    on_epoch: Callable[[str], None] | None = None,
    ranks: Ranks = SINGLE,
) -> TrainedModel:
    """Train ``config`` on the cache's train/val splits, with every detail recorded in MLflow.

    ``resume`` continues the newest interrupted run of this architecture (same folder, same
    MLflow run) from its ``last.pt``. ``data`` replaces the cache's splits (fine-tuning adds
    labeled feedback images to the training split); it must use the cache's preprocessing.
    ``progress`` draws bars (a terminal); ``on_epoch`` gets each finished epoch's line.
    ``ranks``: rank 0's place in a distributed run (the other ranks run
    :func:`_train_beside_main`).
    """
    if not ranks.is_main:
        raise CxrError("only rank 0 tracks a run; the other ranks train beside it")
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    device = rank_device(select_device(config.device), ranks)
    data = _training_data(cache, preprocessing, device, data)
    tracker = tracker_for(training)
    if resume:
        run = _resumable_run(training, tracker, config.arch)
    else:
        run = _new_run(tracker, config, profile, manifest_hash, preprocessing, dagster_run_id)
    if tags:
        run.set_tags(tags)
    run.set_tags(
        {
            "cxr.world_size": ranks.world_size,
            # Which data ("": the synthetic set): what an ensemble of this run later
            # (`cxr ensemble RUN`) is evaluated on.
            "cxr.data_dir": str(training.data_dir) if training.data_dir else "",
        }
    )
    run.log_params(
        {**config.to_dict(), "preprocessing": preprocessing.to_dict(), "profile": profile}
    )
    out_dir = from_main(training.models_dir / config.arch / run.run_id, ranks)
    try:
        run.log_params(
            {
                "n_train": len(data.train),
                "n_val": len(data.val),
                "resolved_device": str(device),
                "world_size": ranks.world_size,
            }
        )
        result = train(
            config,
            data,
            out_dir,
            metrics_sink=run,
            progress=progress,
            resume=resume,
            on_epoch=on_epoch,
            ranks=ranks,
        )
    except BaseException:
        run.finish("FAILED")
        raise
    return _finish_training(
        training,
        run,
        config,
        result,
        out_dir,
        preprocessing,
        profile,
        manifest_hash,
        world_size=ranks.world_size,
    )


def _training_data(
    cache: PreprocessedCache,
    preprocessing: PreprocessingConfig,
    device: torch.device,
    data: TrainingData | None,
) -> TrainingData:
    if data is None:
        return TrainingData.from_cache(cache, device)
    if data.train.preprocessing != preprocessing:
        raise CxrError("training data prepared with other preprocessing than the cache")
    return data


def _train_beside_main(
    cache: PreprocessedCache, config: TrainConfig, resume: bool, ranks: Ranks
) -> None:
    """A rank other than 0: trains its share in rank 0's run folder; MLflow is rank 0's."""
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    device = rank_device(select_device(config.device), ranks)
    data = _training_data(cache, preprocessing, device, None)
    out_dir = from_main(None, ranks)  # rank 0 names it once its MLflow run exists
    train(config, data, out_dir, progress=False, resume=resume, ranks=ranks)


def train_tracked_rank(
    training: TrainingSection,
    cache: PreprocessedCache,
    config: TrainConfig,
    profile: str,
    manifest_hash: str | None,
    resume: bool,
    tags: dict[str, str | None] | None = None,
) -> TrainedModel | None:
    """One rank of a distributed :func:`train_tracked` (what the launcher starts per process):
    joins the process group, trains, leaves. Rank 0 returns the trained model."""
    ranks = join_from_environment(select_device(config.device))
    share_cpu(ranks)
    try:
        if not ranks.is_main:
            _train_beside_main(cache, config, resume, ranks)
            return None
        return train_tracked(
            training,
            cache,
            config,
            profile=profile,
            manifest_hash=manifest_hash,
            progress=ranks.is_main,
            resume=resume,
            tags=tags,
            ranks=ranks,
        )
    finally:
        leave(ranks)


def train_distributed(
    training: TrainingSection,
    cache: PreprocessedCache,
    config: TrainConfig,
    *,
    nproc_per_node: int,
    profile: str,
    manifest_hash: str | None = None,
    resume: bool = False,
    tags: dict[str, str | None] | None = None,
) -> TrainedModel:
    """:func:`train_tracked` in ``nproc_per_node`` processes of this machine with DDP."""
    trained = launch(
        nproc_per_node,
        train_tracked_rank,
        training,
        cache,
        config,
        profile,
        manifest_hash,
        resume,
        tags,
    )
    if trained is None:
        raise CxrError("rank 0 of the distributed run returned no trained model")
    return trained


def train_here(
    training: TrainingSection,
    cache: PreprocessedCache,
    config: TrainConfig,
    *,
    profile: str,
    manifest_hash: str | None = None,
    dagster_run_id: str | None = None,
    progress: bool = False,
    resume: bool = False,
    on_epoch: Callable[[str], None] | None = None,
) -> TrainedModel:
    """Train on this machine as the settings say: one process, or
    ``training_nproc_per_node`` processes with DDP. Both report one line per epoch to
    ``on_epoch``; a distributed run's epochs ran in worker processes, so their lines come once
    rank 0 has returned (the workers' own output streams meanwhile)."""
    nproc_per_node = training.training_nproc_per_node
    if nproc_per_node == 1:
        return train_tracked(
            training,
            cache,
            config,
            profile=profile,
            manifest_hash=manifest_hash,
            dagster_run_id=dagster_run_id,
            progress=progress,
            resume=resume,
            on_epoch=on_epoch,
        )
    trained = train_distributed(
        training,
        cache,
        config,
        nproc_per_node=nproc_per_node,
        profile=profile,
        manifest_hash=manifest_hash,
        resume=resume,
        tags={"dagster.run_id": dagster_run_id} if dagster_run_id else None,
    )
    if on_epoch is not None:
        records = [EpochRecord(**values) for values in trained.history]
        for line in epoch_lines(config, records):
            on_epoch(line)
    return trained


def _new_run(
    tracker: ExperimentTracker,
    config: TrainConfig,
    profile: str,
    manifest_hash: str | None,
    preprocessing: PreprocessingConfig,
    dagster_run_id: str | None,
) -> TrackedRun:
    return tracker.start_run(
        run_name=f"{config.arch}-{profile}",
        tags={
            "cxr.model_name": config.arch,
            "cxr.arch": config.arch,
            "cxr.profile": profile,
            "cxr.split_manifest_hash": manifest_hash,
            "cxr.preprocessing_fingerprint": preprocessing.fingerprint(),
            "dagster.run_id": dagster_run_id,
            "mlflow.source.git.commit": git_commit(),
        },
    )


def _resumable_run(training: TrainingSection, tracker: ExperimentTracker, arch: str) -> TrackedRun:
    candidates = sorted(
        (training.models_dir / arch).glob("*/last.pt"), key=lambda p: p.stat().st_mtime
    )
    if not candidates:
        raise CxrError(f"nothing to resume: no {arch} run under {training.models_dir / arch}")
    run_id = candidates[-1].parent.name
    tracker.client.update_run(run_id, status="RUNNING")
    return TrackedRun(tracker.client, run_id)


def _finish_training(
    training: TrainingSection,
    run: TrackedRun,
    config: TrainConfig,
    result: TrainingResult,
    out_dir: Path,
    preprocessing: PreprocessingConfig,
    profile: str,
    manifest_hash: str | None,
    world_size: int = 1,
) -> TrainedModel:
    # Logged only once it is known: "auto" may have fallen back to random initialisation.
    run.log_params({"pretrained_loaded": str(result.pretrained).lower()})
    run.set_tags(
        {
            "cxr.pretrained": str(result.pretrained).lower(),
            "cxr.weights_source": result.weights_source,
            "cxr.schedule": result.schedule,  # differs from the params when weights were missing
        }
    )
    history = [asdict(record) for record in result.history]
    run.log_metrics(
        {
            "best_val_auc": result.best_val_auc,
            "best_epoch": result.best_epoch,
            "train_wall_seconds": result.wall_seconds,
        }
    )
    curves = plot_learning_curves(history, out_dir / "learning_curves.png", config.arch)
    preprocessing_file = preprocessing.write_json(out_dir / "preprocessing.json")
    for path in (result.best_checkpoint, curves, preprocessing_file):
        run.log_artifact(path)
    trained = TrainedModel(
        model_name=config.arch,
        arch=config.arch,
        checkpoint=result.best_checkpoint,
        mlflow_run_id=run.run_id,
        profile=profile,
        best_epoch=result.best_epoch,
        best_val_auc=result.best_val_auc,
        epochs_run=len(result.history),
        stopped_early=result.stopped_early,
        pretrained=result.pretrained,
        weights_source=result.weights_source,
        device=result.device,
        wall_seconds=result.wall_seconds,
        train_images_per_s=result.train_images_per_s,
        manifest_hash=manifest_hash,
        data_dir=str(training.data_dir) if training.data_dir else None,
        schedule=result.schedule,
        checkpoint_sha256=file_sha256(result.best_checkpoint),
        world_size=world_size,
        history=history,
    )
    _write_latest(training, trained)
    run.finish()  # evaluation later adds its metrics to this same (finished) run
    return trained


def _write_latest(training: TrainingSection, trained: TrainedModel) -> None:
    pointer = training.models_dir / LATEST_POINTER
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(json.dumps(trained.to_json(), indent=2))
    tmp.replace(pointer)


def latest_trained(training: TrainingSection) -> TrainedModel:
    """The most recently trained model (what ``cxr evaluate`` scores until a registry exists)."""
    pointer = training.models_dir / LATEST_POINTER
    if not pointer.exists():
        raise CxrError(f"no trained model under {training.models_dir}; run `cxr train` first")
    return TrainedModel.from_json(json.loads(pointer.read_text()))


class CheckpointChangedError(CxrError):
    """A checkpoint on disk is not the file training wrote (artifacts are written once)."""


def verified_checkpoint(trained: TrainedModel) -> Checkpoint:
    """The trained model's checkpoint, refused when the file is not the one training wrote."""
    if trained.checkpoint_sha256 is not None:
        found = file_sha256(trained.checkpoint)
        if found != trained.checkpoint_sha256:
            raise CheckpointChangedError(
                f"{trained.checkpoint} changed after training (sha256 {found[:12]}, trained "
                f"{trained.checkpoint_sha256[:12]}); retrain rather than reuse it"
            )
    return Checkpoint.load(trained.checkpoint)


# The report folder is named by the checkpoint's content: no other checkpoint, and no later run of
# the same architecture (a fine-tune, a retraining), can write over a report. 16 hex digits of the
# sha256 keep names short and collisions out of reach.
REPORT_KEY_LENGTH = 16


def report_dir(training: TrainingSection, model_name: str, checkpoint_sha256: str) -> Path:
    return training.reports_dir / "evaluation" / model_name / checkpoint_sha256[:REPORT_KEY_LENGTH]


def evaluation_dir(training: TrainingSection, trained: TrainedModel) -> Path:
    """Where the evaluation of exactly this checkpoint lives."""
    sha256 = trained.checkpoint_sha256 or file_sha256(trained.checkpoint)
    return report_dir(training, trained.model_name, sha256)


def evaluate_trained(
    training: TrainingSection,
    cache: PreprocessedCache,
    trained: TrainedModel,
    *,
    n_bootstrap: int = 2000,
) -> tuple[EvaluationReport, dict[str, Path]]:
    """Validation fixes calibration and threshold; test is scored with both frozen.

    The checkpoint is only read: the operating point travels in the report, which names the
    checkpoint it is about by its sha256 and lives in that checkpoint's own folder
    (:func:`evaluation_dir`). Evaluating the same checkpoint again rewrites only its own report.
    """
    checkpoint = verified_checkpoint(trained)
    if checkpoint.preprocessing != cache.preprocessing:
        raise CxrError(
            f"{trained.checkpoint} was trained with other preprocessing than this cache; "
            "rebuild the cache with the model's settings"
        )
    device = select_device(training.device)
    model = checkpoint.scoring_model().to(device)
    val = TensorBatches.from_cache(cache, "val", device=device)
    val_logits = predict_logits(model, val)
    rule = ThresholdRule(training.threshold_rule, training.target_sensitivity)
    test = TensorBatches.from_cache(cache, "test", device=device)
    test_logits = predict_logits(model, test)
    report = evaluate_predictions(
        arch=trained.arch,
        model_name=trained.model_name,
        val=(val.labels_np, val_logits),
        test=(test.labels_np, test_logits),
        rule=rule,
        n_bootstrap=n_bootstrap,
        seed=training.seed,
        patients={
            split: cache.index(split)["patient_id"].astype(str).to_numpy()
            for split in ("val", "test")
        },
        training={
            "profile": trained.profile,
            "pretrained": trained.pretrained,
            "best_epoch": trained.best_epoch,
            "epochs_run": trained.epochs_run,
            "best_val_auc": trained.best_val_auc,
            "device": trained.device,
            "train_images_per_s": trained.train_images_per_s,
            "wall_seconds": trained.wall_seconds,
            "mlflow_run_id": trained.mlflow_run_id,
            **({"members": trained.members} if trained.members else {}),
        },
    )
    report.checkpoint_sha256 = trained.checkpoint_sha256 or file_sha256(trained.checkpoint)
    test_index = cache.index("test")
    report.subgroups = evaluate_subgroups(
        report.splits["test"],
        test.labels_np,
        test_logits,
        report.operating_point,
        subgroup_columns(test_index),
        test_index["patient_id"].astype(str).to_numpy(),
        n_bootstrap=max(200, n_bootstrap // 2),
        seed=training.seed,
    )

    out_dir = evaluation_dir(training, trained)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    files = write_report_files(report, out_dir, trained.history)
    _log_evaluation(training, trained, report, files)
    return report, files


def latest_evaluation(training: TrainingSection, trained: TrainedModel) -> EvaluationReport:
    """The evaluation ``cxr evaluate`` wrote for exactly this trained checkpoint."""
    path = evaluation_dir(training, trained) / "evaluation.json"
    if not path.exists():
        raise CxrError(f"{trained.model_name} has not been evaluated; run `cxr evaluate` first")
    report = EvaluationReport.read_json(path)
    stale_run = report.training.get("mlflow_run_id") != trained.mlflow_run_id
    other_file = trained.checkpoint_sha256 not in (None, report.checkpoint_sha256)
    if stale_run or other_file:
        raise CxrError(
            f"{path} is about an earlier training run of {trained.model_name}; "
            "run `cxr evaluate` for the latest one first"
        )
    return report


def _log_evaluation(
    training: TrainingSection,
    trained: TrainedModel,
    report: EvaluationReport,
    files: dict[str, Path],
) -> None:
    run = TrackedRun(tracker_for(training).client, trained.mlflow_run_id)
    metrics: dict[str, float | None] = {}
    for split, evaluation in report.splits.items():
        for key in (
            "auc",
            "accuracy",
            "sensitivity",
            "specificity",
            "ppv",
            "npv",
            "f1",
            "ece",
            "ece_uncalibrated",
            *INTERVAL_FIELDS,
        ):
            if split == "val" and key == "auc":
                continue  # val_auc is the per-epoch training curve; best_val_auc its peak
            metrics[f"{split}_{key}"] = getattr(evaluation, key)
    metrics["threshold"] = report.operating_point.threshold
    metrics["temperature"] = report.operating_point.temperature
    metrics["calibration_bias"] = report.operating_point.bias
    run.log_metrics(metrics)
    run.set_tags({"cxr.threshold_rule": report.operating_point.rule})
    for name, path in files.items():
        if name != "learning_curves":
            run.log_artifact(path, "evaluation")

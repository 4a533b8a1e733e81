"""Several trained models as one version: each member's calibrated logit, averaged in one graph.

An ensemble is a checkpoint like any other, whose architecture names its members
(``ensemble:baseline_cnn+resnet18``, :class:`~cxr_platform.models.zoo.Ensemble`). Built once from
trained and evaluated members, it is then evaluated (its own calibration and threshold, fitted on
validation), explained, exported, gated, registered and promoted by the same code as a single
model; its record lists the members with their own figures, which the model card shows.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from sklearn.metrics import roc_auc_score

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.transforms import TensorBatches
from cxr_platform.errors import CxrError
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.checkpoint import Checkpoint, file_sha256
from cxr_platform.models.evaluation import EvaluationReport
from cxr_platform.models.pipeline import (
    TrainedModel,
    _write_latest,
    report_dir,
    tracker_for,
    verified_checkpoint,
)
from cxr_platform.models.recipe import TrainConfig
from cxr_platform.models.training import predict_logits, select_device
from cxr_platform.models.zoo import Ensemble, ensemble_arch, ensemble_members
from cxr_platform.provenance import git_commit
from cxr_platform.sections import TEST_TIME_AUGMENTATIONS, TrainingSection

log = logging.getLogger(__name__)

ENSEMBLE_PROFILE = "ensemble"
# What `cxr ensemble` accepts as a run id or a model name: each becomes part of a glob pattern
# or a folder name.
RUN_ID = re.compile(r"[A-Za-z0-9_-]+")


class EnsembleError(CxrError):
    """The chosen models cannot be combined (too few, other data, not evaluated, ...)."""


@dataclass(frozen=True)
class Member:
    """One trained model as an ensemble uses it: its weights and its own operating point."""

    trained: TrainedModel
    evaluation: EvaluationReport

    def figures(self) -> dict[str, Any]:
        """What the model card lists for this member (measured on the same splits)."""
        test = self.evaluation.splits["test"]
        point = self.evaluation.operating_point
        return {
            "model_name": self.trained.model_name,
            "arch": self.trained.arch,
            "mlflow_run_id": self.trained.mlflow_run_id,
            "checkpoint_sha256": self.trained.checkpoint_sha256,
            "best_val_auc": self.trained.best_val_auc,
            "test_auc": test.auc,
            "test_auc_ci_low": test.auc_ci_low,
            "test_auc_ci_high": test.auc_ci_high,
            "test_sensitivity": test.sensitivity,
            "test_specificity": test.specificity,
            "temperature": point.temperature,
            "bias": point.bias,
            "wall_seconds": self.trained.wall_seconds,
        }


def combine(
    checkpoints: Sequence[Checkpoint],
    operating_points: Sequence[OperatingPoint],
    *,
    test_time_augmentation: str = "none",
) -> Checkpoint:
    """One checkpoint whose network averages the members' calibrated logits; the first member is
    the one Grad-CAM and the population check read. Nothing is trained: the calibrations are
    the ones each member's evaluation fitted on validation."""
    if len(checkpoints) < 2:
        raise EnsembleError("an ensemble needs at least two members")
    if len(checkpoints) != len(operating_points):
        raise EnsembleError("one operating point per member")
    if test_time_augmentation not in TEST_TIME_AUGMENTATIONS:
        raise EnsembleError(
            f"test-time augmentation must be one of {TEST_TIME_AUGMENTATIONS}, "
            f"not {test_time_augmentation!r}"
        )
    preprocessing = checkpoints[0].preprocessing
    for checkpoint in checkpoints[1:]:
        if checkpoint.preprocessing != preprocessing:
            raise EnsembleError(
                "members were trained with different preprocessing: one graph cannot feed them "
                "the same tensor"
            )
    nested = [c.arch for c in checkpoints if ensemble_members(c.arch)]
    if nested:
        raise EnsembleError(f"a member cannot itself be an ensemble ({nested[0]})")
    arch = ensemble_arch([c.arch for c in checkpoints])
    network = Ensemble([c.bare_model() for c in checkpoints])
    with torch.no_grad():
        network.scale.copy_(torch.tensor([1.0 / p.temperature for p in operating_points]))
        network.offset.copy_(torch.tensor([p.bias for p in operating_points]))
    config = TrainConfig(
        arch=arch,
        pretrained="none",
        frozen_epochs=0,
        finetune_epochs=1,  # a TrainConfig trains something; an ensemble never runs it
        tta_flip=test_time_augmentation == "flip",
    )
    return Checkpoint(
        arch=arch,
        model={k: v.detach().clone() for k, v in network.state_dict().items()},
        config=config,
        preprocessing=dict(preprocessing),
        epoch=0,
        phase=ENSEMBLE_PROFILE,
        metrics={},
        pretrained=any(c.pretrained for c in checkpoints),
        weights_source=None,
        pos_weight=None,
        history=[],
        best_epoch=0,
        best_val_auc=math.nan,
        epochs_without_improvement=0,
        optimizer={},
    )


def _check_members(members: Sequence[Member]) -> None:
    if len(members) < 2:
        raise EnsembleError("an ensemble needs at least two trained and evaluated models")
    run_ids = [m.trained.mlflow_run_id for m in members]
    if len(set(run_ids)) != len(run_ids):
        raise EnsembleError("the same training run is named twice")
    unrecorded = [m.trained for m in members if not m.trained.manifest_hash]
    if unrecorded:
        named = ", ".join(f"{t.model_name} ({t.mlflow_run_id})" for t in unrecorded)
        raise EnsembleError(
            f"the patient split {named} was trained on is not recorded (no "
            "cxr.split_manifest_hash tag): the members must be shown to share one split, or "
            "one member's validation and test images may be another's training images; train "
            "it again with `cxr train` or the Dagster job, which record it"
        )
    splits = {m.trained.manifest_hash for m in members}
    if len(splits) > 1:
        raise EnsembleError(
            "the members were trained on different patient splits; their validation and test "
            "images overlap other members' training images"
        )
    for member in members:
        sha = member.trained.checkpoint_sha256 or file_sha256(member.trained.checkpoint)
        if member.evaluation.checkpoint_sha256 not in (None, sha):
            raise EnsembleError(
                f"the evaluation given for {member.trained.model_name} "
                f"({member.trained.mlflow_run_id}) is about another checkpoint"
            )


def build_ensemble(
    training: TrainingSection,
    cache: PreprocessedCache,
    members: Sequence[Member],
    *,
    model_name: str = "ensemble",
    test_time_augmentation: str = "none",
    dagster_run_id: str | None = None,
    tags: dict[str, str | None] | None = None,
) -> TrainedModel:
    """Combine ``members`` into one tracked checkpoint under ``models/<model_name>/<run id>``.

    The result is a :class:`TrainedModel` like a training run's (the latest pointer included), so
    ``cxr evaluate`` and ``cxr export`` take it from there. Its ``best_val_auc`` is the combined
    AUC on validation, the figure model selection compares."""
    if not RUN_ID.fullmatch(model_name):
        raise EnsembleError(f"{model_name!r} is not a model name (letters, digits, - and _)")
    _check_members(members)
    started = time.perf_counter()
    checkpoints = [verified_checkpoint(member.trained) for member in members]
    if checkpoints[0].preprocessing != cache.preprocessing:
        raise EnsembleError("the members were trained with other preprocessing than this cache")
    combined = combine(
        checkpoints,
        [member.evaluation.operating_point for member in members],
        test_time_augmentation=test_time_augmentation,
    )
    device = select_device(training.device)
    val = TensorBatches.from_cache(cache, "val", device=device)
    val_logits = predict_logits(combined.scoring_model().to(device), val)
    val_auc = float(roc_auc_score(val.labels_np, val_logits))
    combined = replace(combined, best_val_auc=val_auc, metrics={"val_auc": val_auc})

    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    manifest_hash = members[0].trained.manifest_hash
    tracker = tracker_for(training)
    run = tracker.start_run(
        run_name=f"{model_name}-{len(members)}",
        tags={
            "cxr.model_name": model_name,
            "cxr.arch": combined.arch,
            "cxr.profile": ENSEMBLE_PROFILE,
            "cxr.members": ",".join(m.trained.mlflow_run_id for m in members),
            "cxr.split_manifest_hash": manifest_hash,
            "cxr.preprocessing_fingerprint": preprocessing.fingerprint(),
            "dagster.run_id": dagster_run_id,
            "mlflow.source.git.commit": git_commit(),
        },
    )
    try:
        if tags:
            run.set_tags(tags)
        run.log_params(
            {
                "profile": ENSEMBLE_PROFILE,
                "members": " + ".join(
                    f"{m.trained.model_name} ({m.trained.mlflow_run_id})" for m in members
                ),
                "test_time_augmentation": test_time_augmentation,
                "explained_by": members[0].trained.model_name,
                "preprocessing": preprocessing.to_dict(),
                "n_val": len(val),
            }
        )
        out_dir = training.models_dir / model_name / run.run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_path = combined.save(out_dir / "best.pt")
        preprocessing_file = preprocessing.write_json(out_dir / "preprocessing.json")
        for path in (checkpoint_path, preprocessing_file):
            run.log_artifact(path)
        wall_seconds = time.perf_counter() - started
        run.log_metrics({"best_val_auc": val_auc, "combine_wall_seconds": wall_seconds})
    except BaseException:
        run.finish("FAILED")
        raise
    trained = TrainedModel(
        model_name=model_name,
        arch=combined.arch,
        checkpoint=checkpoint_path,
        mlflow_run_id=run.run_id,
        profile=ENSEMBLE_PROFILE,
        best_epoch=0,
        best_val_auc=val_auc,
        epochs_run=0,
        stopped_early=False,
        pretrained=combined.pretrained,
        weights_source=None,
        device=str(device),
        # What the version cost to make: the members' training, not the seconds combining took.
        wall_seconds=sum(m.trained.wall_seconds for m in members),
        train_images_per_s=0.0,
        manifest_hash=manifest_hash,
        data_dir=members[0].trained.data_dir,
        schedule=f"ensemble of {len(members)}, test-time augmentation {test_time_augmentation}",
        checkpoint_sha256=file_sha256(checkpoint_path),
        members=[member.figures() for member in members],
    )
    _write_latest(training, trained)
    run.finish()
    log.info(
        "combined %s into %s: validation AUC %.4f",
        ", ".join(m.trained.model_name for m in members),
        combined.arch,
        val_auc,
    )
    return trained


def _data_dir(training: TrainingSection, tags: dict[str, str]) -> str | None:
    """The run's data folder; runs from before the tag existed: the settings' folder."""
    if "cxr.data_dir" in tags:
        return tags["cxr.data_dir"] or None
    return str(training.data_dir) if training.data_dir else None


def trained_run(training: TrainingSection, run_id: str) -> Member:
    """A finished and evaluated training run of this home, found by its MLflow run id (what
    ``cxr ensemble`` is given)."""
    if not RUN_ID.fullmatch(run_id):
        raise EnsembleError(f"{run_id!r} is not an MLflow run id (letters and digits)")
    found = sorted(training.models_dir.glob(f"*/{run_id}/best.pt"))
    if not found:
        raise EnsembleError(f"no trained model of run {run_id} under {training.models_dir}")
    checkpoint_path = found[0]
    model_name = checkpoint_path.parent.parent.name
    checkpoint = Checkpoint.load(checkpoint_path)
    sha256 = file_sha256(checkpoint_path)
    report_path = report_dir(training, model_name, sha256) / "evaluation.json"
    if not report_path.exists():
        raise EnsembleError(
            f"run {run_id} ({model_name}) has no evaluation of its checkpoint; evaluate it "
            "first (`cxr evaluate` right after training it, or its evaluation_report asset)"
        )
    evaluation = EvaluationReport.read_json(report_path)
    try:
        run = tracker_for(training).client.get_run(run_id)
    except Exception as error:  # noqa: BLE001 - MLflow's errors for a run it does not know
        raise EnsembleError(f"run {run_id} is not in the tracking store: {error}") from error
    tags, metrics = run.data.tags, run.data.metrics
    trained = TrainedModel(
        model_name=model_name,
        arch=checkpoint.arch,
        checkpoint=checkpoint_path,
        mlflow_run_id=run_id,
        profile=tags.get("cxr.profile", ""),
        best_epoch=checkpoint.best_epoch,
        best_val_auc=checkpoint.best_val_auc,
        epochs_run=len(checkpoint.history),
        stopped_early=False,
        pretrained=checkpoint.pretrained,
        weights_source=checkpoint.weights_source,
        device=str(evaluation.training.get("device", "")),
        wall_seconds=float(metrics.get("train_wall_seconds", 0.0)),
        train_images_per_s=float(evaluation.training.get("train_images_per_s", 0.0)),
        manifest_hash=tags.get("cxr.split_manifest_hash"),
        data_dir=_data_dir(training, tags),
        checkpoint_sha256=sha256,
    )
    return Member(trained, evaluation)

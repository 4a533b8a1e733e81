"""Fine-tune the production model on its training split plus labeled live images.

Starts from the production version's own weights (from the registry, not a local checkpoint),
trains every layer at a low learning rate, then goes through the same evaluation, export and
registration as any trained model and becomes the ``shadow`` candidate. An ensemble version is
fine-tuned member by member, each evaluated alone, and combined again. Only feedback given
before the job started is used, so live traffic the shadow scores afterwards stays unseen
data for the shadow evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.transforms import TensorBatches
from cxr_platform.deployment import pipeline as deployment
from cxr_platform.deployment.export import ExportedModel
from cxr_platform.deployment.registry import PRODUCTION, ModelRegistry, ModelVersionInfo
from cxr_platform.errors import CxrError
from cxr_platform.inference.log import InferenceLog
from cxr_platform.inference.retained import RetainedInputs
from cxr_platform.model_version.files import METADATA_FILE, WEIGHTS_FILE
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.models.ensemble import Member, build_ensemble
from cxr_platform.models.evaluation import EvaluationReport
from cxr_platform.models.pipeline import (
    TrainedModel,
    evaluate_trained,
    train_config_for,
    train_tracked,
)
from cxr_platform.models.training import TrainingData, select_device
from cxr_platform.models.zoo import ensemble_members
from cxr_platform.sections import MonitoringSection, RegistrySection, TrainingSection

FINETUNE_PROFILE = "finetune"


class FineTuneError(CxrError):
    pass


@dataclass(frozen=True)
class LabeledExamples:
    request_ids: list[str]
    images: np.ndarray  # uint8 (N, S, S)
    labels: np.ndarray  # float32, 1 = PNEUMONIA
    n_feedback: int  # labeled log rows, including those whose image is no longer kept

    def counts(self) -> dict[str, int]:
        positives = int(self.labels.sum())
        return {"PNEUMONIA": positives, "NORMAL": len(self.labels) - positives}


def labeled_examples(
    monitoring: MonitoringSection, *, image_size: int, before: datetime | None = None
) -> LabeledExamples:
    """Retained inputs with a feedback label (the latest one counts) logged before ``before``."""
    log = InferenceLog(monitoring.inference_log_uri)
    try:
        rows = log.records(labeled_only=True, created_before=before)
    finally:
        log.dispose()
    store = RetainedInputs(monitoring.retained_dir)
    labels_by_id = dict(zip(rows["request_id"], rows["feedback_label"], strict=True))
    found, images = store.load_labeled(labels_by_id)
    if len(found) and images.shape[1:] != (image_size, image_size):
        # Kept for a model with another input size: not usable for this one.
        found, images = [], np.zeros((0, image_size, image_size), dtype=np.uint8)
    labels = np.array([labels_by_id[i] == "PNEUMONIA" for i in found], dtype=np.float32)
    if not len(found):
        images = np.zeros((0, image_size, image_size), dtype=np.uint8)
    return LabeledExamples(found, images, labels, n_feedback=len(rows))


@dataclass(frozen=True)
class FineTuneResult:
    base: ModelVersionInfo
    trained: TrainedModel
    report: EvaluationReport
    labeled: LabeledExamples
    reason: str | None = None

    def summary(self) -> dict[str, Any]:
        test = self.report.splits["test"]
        return {
            "base_version": self.base.version,
            "arch": self.trained.arch,
            "mlflow_run_id": self.trained.mlflow_run_id,
            "labeled_examples": len(self.labeled.request_ids),
            "labeled_per_class": self.labeled.counts(),
            "feedback_rows": self.labeled.n_feedback,
            "best_epoch": self.trained.best_epoch,
            "best_val_auc": self.trained.best_val_auc,
            "test_auc": test.auc,
            "test_sensitivity": test.sensitivity,
            "test_specificity": test.specificity,
            "wall_seconds": self.trained.wall_seconds,
        }


def finetune_production(
    training: TrainingSection,
    monitoring: MonitoringSection,
    registry: ModelRegistry,
    cache: PreprocessedCache,
    *,
    reason: str | None = None,
    dagster_run_id: str | None = None,
    progress: bool = False,
    on_epoch: Callable[[str], None] | None = None,
) -> FineTuneResult:
    started = datetime.now(UTC)
    base = registry.find(PRODUCTION)
    if base is None:
        raise FineTuneError("there is no production model to fine-tune")
    folder = registry.download(base.version)
    metadata = json.loads((folder / METADATA_FILE).read_text())
    if metadata["preprocessing"] != cache.preprocessing:
        raise FineTuneError(
            f"production version {base.version} uses other preprocessing than this cache; "
            "rebuild the cache with its settings"
        )
    if not (folder / WEIGHTS_FILE).exists():
        raise FineTuneError(f"production version {base.version} has no {WEIGHTS_FILE}")
    arch = metadata["arch"]
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    labeled = labeled_examples(monitoring, image_size=preprocessing.image_size, before=started)

    demo = training.is_demo
    epochs = monitoring.finetune_epochs or (2 if demo else 5)
    device = select_device(training.device)
    train_images = cache.images("train", mmap=False)
    data = TrainingData(
        train=TensorBatches(
            np.concatenate([train_images, labeled.images]),
            np.concatenate([cache.labels("train"), labeled.labels]),
            preprocessing,
            device=device,
        ),
        val=TensorBatches.from_cache(cache, "val", device=device),
    )
    lineage = finetune_lineage(base, reason, labeled).to_tags()

    def finetune(member_arch: str, weights: Path) -> TrainedModel:
        config = train_config_for(training, member_arch, profile=training.profile)
        config = replace(
            config,
            pretrained="none",  # the production weights replace any initialisation
            weights_path=None,
            initial_weights=str(weights),
            frozen_epochs=0,
            finetune_epochs=epochs,
            finetune_lr=monitoring.finetune_lr or (1e-4 if demo else 1e-5),
            patience=epochs,
        )
        return train_tracked(
            training,
            cache,
            config,
            profile=FINETUNE_PROFILE,
            manifest_hash=base.release.data_version,
            dagster_run_id=dagster_run_id,
            progress=progress,
            data=data,
            tags=lineage,
            on_epoch=on_epoch,
        )

    member_archs = ensemble_members(arch)
    if not member_archs:
        trained = finetune(arch, folder / WEIGHTS_FILE)
    else:
        # Each member on its own, from its production weights, with its own evaluation (its
        # calibration), then combined again: the version stays members calibrated alone and
        # averaged, rather than networks tuned together through their mean.
        members = []
        for index, weights in enumerate(
            member_weights(folder / WEIGHTS_FILE, member_archs, training, base.version)
        ):
            member = finetune(member_archs[index], weights)
            members.append(Member(member, evaluate_trained(training, cache, member)[0]))
        trained = build_ensemble(
            training,
            cache,
            members,
            model_name=metadata.get("model_name") or "ensemble",
            test_time_augmentation=metadata.get("test_time_augmentation") or "none",
            dagster_run_id=dagster_run_id,
            tags=lineage,
        )
    report, _ = evaluate_trained(training, cache, trained)
    # The result is pickled by Dagster's IO manager: keep the ids and labels, not the pixels.
    kept = replace(labeled, images=labeled.images[:0])
    return FineTuneResult(base, trained, report, kept, reason)


def member_weights(
    weights: Path, member_archs: tuple[str, ...], training: TrainingSection, version: str
) -> list[Path]:
    """Each member's state dict from an ensemble version's weights, as files a training run can
    start from (written once per version, under the models folder)."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    folder = training.models_dir / "ensemble-members" / f"version-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, member_arch in enumerate(member_archs):
        prefix = f"members.{index}."
        path = folder / f"{index}-{member_arch}.pt"
        if not path.exists():
            member = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if not member:
                raise FineTuneError(f"version {version}'s weights hold no member {index}")
            tmp = path.with_suffix(".tmp")
            torch.save(member, tmp)
            tmp.replace(path)
        paths.append(path)
    return paths


def finetune_lineage(base: ModelVersionInfo, reason: str, labeled: LabeledExamples) -> VersionTags:
    """Recorded on the training run and on the registry version it becomes."""
    return VersionTags(
        finetuned_from=base.version,
        finetune_reason=reason,
        labeled_examples=len(labeled.request_ids),
    )


def register_finetuned(
    registry_settings: RegistrySection,
    cache: PreprocessedCache,
    result: FineTuneResult,
    *,
    triggered_by: str,
) -> tuple[ExportedModel, ModelVersionInfo]:
    """Export with the parity check, register, and make it the shadow candidate."""
    exported = deployment.export_trained(registry_settings, cache, result.trained, result.report)
    info = deployment.register_exported(
        registry_settings,
        exported,
        triggered_by=triggered_by,
        shadow=True,
        data_dir=result.base.release.data_dir,
        lineage=finetune_lineage(result.base, result.reason, result.labeled),
    )
    return exported, info

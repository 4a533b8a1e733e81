"""Export -> register -> gate -> promote, as the CLI and the Dagster assets both run it."""

from __future__ import annotations

import dataclasses
import getpass
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8
from cxr_platform.deployment.export import ExportedModel, ParityError, export_checkpoint
from cxr_platform.deployment.gate import (
    GateCheck,
    GateConfig,
    GateDecision,
    ModelScore,
    decide,
    score_predictions,
)
from cxr_platform.deployment.population import intended_use_for, population_check_for
from cxr_platform.deployment.quantize import add_int8_variant
from cxr_platform.deployment.reference import reference_from_cache, write_reference
from cxr_platform.deployment.registry import (
    PRODUCTION,
    ModelRegistry,
    ModelVersionInfo,
    ProductionMovedError,
    RegistryError,
    RegistryEvent,
    registry_for,
)
from cxr_platform.model_version.files import ExportError
from cxr_platform.model_version.input_gate import InputGate, fit_input_gate
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.models.evaluation import EvaluationReport
from cxr_platform.models.pipeline import TrainedModel, verified_checkpoint
from cxr_platform.provenance import git_commit
from cxr_platform.sections import RegistrySection

log = logging.getLogger(__name__)

PARITY_IMAGES = 32


def cli_trigger() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = "unknown"
    return f"cli:{user}"


def gate_config_for(registry_settings: RegistrySection) -> GateConfig:
    min_auc, min_sensitivity = registry_settings.evaluation_floors
    return GateConfig(
        min_auc=min_auc,
        min_sensitivity=min_sensitivity,
        min_specificity=registry_settings.specificity_floor,
        max_auc_drop=registry_settings.max_auc_drop,
    )


def parity_inputs(cache: PreprocessedCache, n: int = PARITY_IMAGES) -> torch.Tensor:
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    images = cache.images("test", mmap=False)[:n]
    return torch.from_numpy(normalize_uint8(images, preprocessing))[:, None]


def export_trained(
    registry_settings: RegistrySection,
    cache: PreprocessedCache,
    trained: TrainedModel,
    evaluation: EvaluationReport,
) -> ExportedModel:
    """The files carry the evaluation's operating point and headline metrics; the report must
    be about this very checkpoint."""
    checkpoint = verified_checkpoint(trained)
    if evaluation.checkpoint_sha256 not in (None, trained.checkpoint_sha256):
        raise ExportError(
            f"the evaluation report is about another checkpoint than {trained.checkpoint}; "
            "evaluate this one before exporting it"
        )
    out_dir = trained.checkpoint.parent / "export"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    exported = export_checkpoint(
        trained.checkpoint,
        evaluation.operating_point,
        out_dir,
        parity_inputs(cache),
        model_name=trained.model_name,
        mlflow_run_id=trained.mlflow_run_id,
        manifest_hash=trained.manifest_hash,
        git_commit=git_commit(),
        metrics=evaluation.version_metrics(),
        input_gate=gate_for(cache),
        intended_use=intended_use_for(cache, registry_settings, trained.data_dir),
        population_check=population_check_for(
            checkpoint, cache, registry_settings.out_of_population_dir, seed=registry_settings.seed
        ),
    )
    write_monitoring_reference(out_dir, cache)
    if not registry_settings.export_int8:
        return exported
    decision = add_int8_variant(
        out_dir, cache.images("val", mmap=False), cache.labels("val"), seed=registry_settings.seed
    )
    return dataclasses.replace(exported, int8=decision)


def gate_for(cache: PreprocessedCache) -> InputGate:
    """The input gate of a model trained on ``cache``: fitted on its training split, the
    threshold set on validation (never test)."""
    return fit_input_gate(cache.images("train", mmap=False), cache.images("val", mmap=False))


def write_monitoring_reference(export_dir: Path, cache: PreprocessedCache) -> Path:
    """Drift monitoring's reference, scored by the exported model itself (ONNX Runtime,
    calibrated), so it matches what the service will log."""
    return write_reference(export_dir, reference_from_cache(cache, Predictor(export_dir)))


def register_exported(
    registry_settings: RegistrySection,
    exported: ExportedModel,
    *,
    triggered_by: str,
    shadow: bool = True,
    data_dir: str | None = None,
    lineage: VersionTags | None = None,
) -> ModelVersionInfo:
    """A new registry version; with ``shadow`` it also becomes the shadow candidate.

    ``data_dir`` (None: the synthetic set) is where the gate finds the model's test split;
    ``lineage`` adds what a fine-tuned version was made from."""
    parity = exported.parity
    if not parity.passed:
        worst = max(parity.onnx_max_abs_diff, parity.torchscript_max_abs_diff)
        raise ParityError(
            f"{exported.metadata.model_name}: exported logits differ from PyTorch by "
            f"{worst:.2e} (> {parity.tolerance:.0e}); refusing to register"
        )
    metadata = exported.metadata
    if metadata.mlflow_run_id is None:
        raise ParityError("an exported model without a training run cannot be registered")
    registry = registry_for(registry_settings)
    int8 = exported.int8
    summary = metadata.summary()
    tags = VersionTags(
        model_name=metadata.model_name,
        arch=metadata.arch,
        threshold=metadata.threshold,
        threshold_rule=metadata.operating_point.get("rule"),
        calibration=f"T={metadata.calibration.temperature:.4f} b={metadata.calibration.bias:+.4f}",
        preprocessing=metadata.preprocessing,
        data_version=metadata.manifest_hash,
        data_dir=data_dir,
        git_commit=metadata.git_commit,
        parity_onnx_max_abs_diff=parity.onnx_max_abs_diff,
        parity_torchscript_max_abs_diff=parity.torchscript_max_abs_diff,
        int8=None if int8 is None else ("kept" if int8.kept else "refused"),
        int8_val_auc_change=None if int8 is None else int8.val_auc_int8 - int8.val_auc_fp32,
        input_gate=summary.get("input_gate"),
        intended_use=summary.get("intended_use"),
        population_check=summary.get("population_check"),
        metrics=dict(metadata.metrics),
    )
    if lineage is not None:
        tags = tags.updated(lineage)
    info = registry.register(
        exported,
        run_id=metadata.mlflow_run_id,
        tags=tags,
        triggered_by=triggered_by,
        description=f"{metadata.model_name} ({metadata.arch}), exported {metadata.exported_at}",
    )
    if shadow:
        info = registry.set_shadow(info.version, triggered_by=triggered_by)
    return info


@dataclass(frozen=True)
class EvaluationData:
    images: np.ndarray  # uint8 (N, S, S)
    labels: np.ndarray
    description: dict[str, Any]


def gate_evaluation_data(cache: PreprocessedCache) -> EvaluationData:
    """The test split: never used to choose anything during training or thresholding."""
    split = cache.splits["test"]
    return EvaluationData(
        images=cache.images("test", mmap=False),
        labels=cache.labels("test"),
        description={"split": "test", "cache_key": split.key, "n": split.n_images},
    )


def score_version(
    registry: ModelRegistry, info: ModelVersionInfo, data: EvaluationData
) -> ModelScore:
    predictor = Predictor(registry.download(info.version), model_version=info.version)
    size = predictor.preprocessing.image_size
    if data.images.shape[1:] != (size, size):
        raise ParityError(
            f"version {info.version} expects {size}x{size} inputs; the evaluation data is "
            f"{data.images.shape[1]}x{data.images.shape[2]}: rebuild the cache with its settings"
        )
    probabilities = predictor.probabilities_in_batches(data.images)
    return score_predictions(data.labels, probabilities, predictor.threshold, version=info.version)


def run_gate(
    registry_settings: RegistrySection,
    cache: PreprocessedCache,
    candidate_ref: str | int,
    *,
    extra_checks: Sequence[GateCheck] = (),
    extra_evidence: dict[str, Any] | None = None,
) -> GateDecision:
    registry = registry_for(registry_settings)
    candidate = registry.get(candidate_ref)
    production = registry.find(PRODUCTION)
    data = gate_evaluation_data(cache)
    candidate_score = score_version(registry, candidate, data)
    production_score = (
        score_version(registry, production, data)
        if production is not None and production.version != candidate.version
        else None
    )
    evaluated_on = {
        **data.description,
        "candidate_data_version": candidate.release.data_version,
        "production_version": production.version if production else None,
        "production_data_version": production.release.data_version if production else None,
        **(extra_evidence or {}),
    }
    return decide(
        candidate_score,
        production_score,
        gate_config_for(registry_settings),
        evaluated_on=evaluated_on,
        extra_checks=extra_checks,
    )


GATE_ROUNDS = 3


@dataclass(frozen=True)
class PromotionOutcome:
    decision: GateDecision
    event: RegistryEvent | None  # None: the gate refused
    production_version: str | None

    @property
    def promoted(self) -> bool:
        return self.event is not None


def promote_with_gate(
    registry_settings: RegistrySection,
    cache: PreprocessedCache,
    candidate_ref: str | int,
    *,
    triggered_by: str,
) -> PromotionOutcome:
    """Gate ``candidate_ref`` against production and promote it if it passes. When another
    promoter moves production meanwhile (another machine), the gate runs again against the new
    production: a candidate is never promoted on a comparison with a version it does not
    replace."""
    registry = registry_for(registry_settings)
    candidate = registry.get(candidate_ref)
    for _ in range(GATE_ROUNDS):
        current = registry.find(PRODUCTION)
        if current is not None and current.version == candidate.version:
            raise RegistryError(f"version {candidate.version} is already production")
        decision = run_gate(registry_settings, cache, candidate.version)
        compared_with = decision.evaluated_on["production_version"]
        if not decision.passed:
            return PromotionOutcome(decision, None, compared_with)
        try:
            event = registry.promote(
                candidate.version,
                triggered_by=triggered_by,
                gate=decision.to_dict(),
                replacing=compared_with,
            )
        except ProductionMovedError as moved:
            log.warning("%s; running the gate again", moved)
            continue
        return PromotionOutcome(decision, event, candidate.version)
    raise RegistryError(
        f"production moved {GATE_ROUNDS} times while the gate judged version "
        f"{candidate.version}; promote it again when the other promotions are done"
    )


def best_by_validation(candidates: list[tuple[TrainedModel, Any]]) -> tuple[TrainedModel, Any]:
    """Model selection uses validation AUC only: the test split stays for the gate."""
    return max(candidates, key=lambda pair: pair[0].best_val_auc)

"""Group "training": per architecture, trained_model -> evaluation_report; with ``CXR_ENSEMBLE``,
``ensemble/trained_model`` (every architecture's model and report in) -> its evaluation_report;
then model_comparison.

Asset keys are prefixed by architecture (``resnet18/trained_model``) so each model has its own
lineage and can be re-materialized alone. Which architectures exist is ``CXR_MODELS``.
"""
# No `from __future__ import annotations`: Dagster inspects these annotations at runtime.

import base64
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.splits import manifest_hash
from cxr_platform.defs.metadata import home_path, mlflow_run_link, readable
from cxr_platform.defs.resources import PlatformSettings
from cxr_platform.defs.training_launch import launch_training, train_arguments
from cxr_platform.defs.training_pipes import TrainingMessage
from cxr_platform.models import pipeline as model_pipeline
from cxr_platform.models.ensemble import Member, build_ensemble
from cxr_platform.models.evaluation import EvaluationReport
from cxr_platform.models.reporting import (
    comparison_markdown,
    report_markdown,
    subgroup_markdown,
)
from cxr_platform.models.zoo import architecture
from cxr_platform.sections import TrainingSection
from cxr_platform.settings import CxrSettings
from cxr_platform.terminal import interactive

GROUP = "training"
# The ensemble's asset prefix and model name: not an architecture, so no training asset has it.
ENSEMBLE = "ensemble"


class TrainingRunConfig(dg.Config):
    """Per-model launchpad overrides of the recipe; unset values come from the profile.

    The profile, pretrained weights and device are platform settings (``training_profile``,
    ``pretrained``, ``device`` on the ``platform`` resource), set once for every model."""

    epochs: int | None = None
    batch_size: int | None = None


def png_markdown(path: Path, title: str) -> str:
    """An inline image the Dagster UI renders inside Markdown metadata."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{encoded})"


def _interval(low: float | None, high: float | None) -> str:
    return "n/a" if low is None or high is None else f"{low:.3f}-{high:.3f}"


def trained_model_key(arch: str) -> dg.AssetKey:
    return dg.AssetKey([arch, "trained_model"])


def evaluation_report_key(arch: str) -> dg.AssetKey:
    return dg.AssetKey([arch, "evaluation_report"])


def _train(
    context: dg.AssetExecutionContext,
    settings: CxrSettings,
    arch: str,
    run_config: TrainingRunConfig,
    cache: PreprocessedCache,
    manifest: pd.DataFrame,
) -> TrainingMessage:
    """Where the settings say: in this run's process (one process or several), or `cxr train`
    launched through Dagster Pipes."""
    training = settings.training
    config = model_pipeline.train_config_for(
        training,
        arch,
        profile=training.profile,
        epochs=run_config.epochs,
        batch_size=run_config.batch_size,
    )
    if settings.dagster.training_launcher != "in_process":
        arguments = train_arguments(
            arch,
            nproc_per_node=training.training_nproc_per_node,
            epochs=run_config.epochs,
            batch_size=run_config.batch_size,
        )
        context.log.info(f"launching `cxr {' '.join(arguments)}` through Dagster Pipes")
        return launch_training(context, settings, arguments)
    trained = model_pipeline.train_here(
        training,
        cache,
        config,
        profile=training.profile,
        manifest_hash=manifest_hash(manifest),
        dagster_run_id=context.run.run_id,
        # A bar only where a person watches (cxr demo at a terminal); the run log gets one line
        # per epoch wherever the run executes.
        progress=interactive(),
        on_epoch=context.log.info,
    )
    return TrainingMessage(trained, config)


def _trained_model_metadata(settings: CxrSettings, ran: TrainingMessage) -> dict[str, Any]:
    training, trained = settings.training, ran.trained_model
    curves = trained.checkpoint.parent / "learning_curves.png"
    return readable(
        {
            "best_val_auc": trained.best_val_auc,
            "best_epoch": trained.best_epoch,
            "epochs_run": trained.epochs_run,
            "stopped_early": trained.stopped_early,
            "pretrained": trained.pretrained,
            "profile": trained.profile,
            "device": trained.device,
            "train_images_per_s": trained.train_images_per_s,
            "wall_seconds": trained.wall_seconds,
            "mlflow_run": mlflow_run_link(training, trained.mlflow_run_id),
            "checkpoint": home_path(trained.checkpoint, training.home),
            # Checkpoints are written once: later steps refuse a file that differs.
            "checkpoint_sha256": trained.checkpoint_sha256 or "",
            "config": dg.MetadataValue.json(ran.config.to_dict()),
            "world_size": trained.world_size,
            "launcher": settings.dagster.training_launcher,
            "learning_curves": dg.MetadataValue.md(png_markdown(curves, "learning curves")),
        }
    )


def _trained_model_asset(arch: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=trained_model_key(arch),
        group_name=GROUP,
        kinds={"pytorch", "mlflow"},
        ins={
            "preprocessed_cache": dg.AssetIn(dg.AssetKey("preprocessed_cache")),
            "patient_splits": dg.AssetIn(dg.AssetKey("patient_splits")),
        },
        description=f"{arch}: two-phase fine-tuning with early stopping on validation AUC; the "
        "best checkpoint, tracked in MLflow.",
    )
    def trained_model(
        context: dg.AssetExecutionContext,
        config: TrainingRunConfig,
        platform: PlatformSettings,
        preprocessed_cache: PreprocessedCache,
        patient_splits: pd.DataFrame,
    ) -> dg.Output[model_pipeline.TrainedModel]:
        settings = platform.settings()
        ran = _train(context, settings, arch, config, preprocessed_cache, patient_splits)
        return dg.Output(ran.trained_model, metadata=_trained_model_metadata(settings, ran))

    return trained_model


def _with_interval(values: dict[str, Any], name: str, split: Any) -> None:
    values[name] = getattr(split, name.removeprefix("test_"))
    low = getattr(split, f"{name.removeprefix('test_')}_ci_low")
    high = getattr(split, f"{name.removeprefix('test_')}_ci_high")
    values[f"{name}_ci"] = _interval(low, high)


def _evaluation_metadata(
    training: TrainingSection,
    trained: model_pipeline.TrainedModel,
    report: EvaluationReport,
    files: dict[str, Path],
) -> dict[str, Any]:
    test = report.splits["test"]
    plots = "\n\n".join(
        png_markdown(files[name], name) for name in ("roc", "confusion", "reliability")
    )
    values: dict[str, Any] = {}
    for name in ("test_auc", "test_sensitivity", "test_specificity", "test_ppv", "test_npv"):
        _with_interval(values, name, test)
    values.update(
        {
            "intervals_resample": f"{test.interval_unit}s ({test.n_patients or test.n})",
            "test_ece": test.ece,
            "threshold": report.operating_point.threshold,
            "temperature": report.operating_point.temperature,
            "calibration_bias": report.operating_point.bias,
            "n_test": test.n,
            "subgroups_flagged": len(report.flagged_subgroups),
            "subgroups": dg.MetadataValue.md(
                "\n".join(subgroup_markdown(report)) if report.subgroups else "none named"
            ),
            "report": dg.MetadataValue.md(report_markdown(report)),
            "plots": dg.MetadataValue.md(plots),
            "json": home_path(files["json"], training.home),
            "checkpoint_sha256": report.checkpoint_sha256 or "",
            "mlflow_run": mlflow_run_link(training, trained.mlflow_run_id),
        }
    )
    return readable(values)


def _evaluation_report_asset(arch: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=evaluation_report_key(arch),
        group_name=GROUP,
        kinds={"python"},
        ins={
            "trained_model": dg.AssetIn(trained_model_key(arch)),
            "preprocessed_cache": dg.AssetIn(dg.AssetKey("preprocessed_cache")),
        },
        description=f"{arch}: threshold and Platt calibration fixed on validation, then test "
        "metrics with bootstrap CIs, ROC, confusion matrix and reliability plots.",
    )
    def evaluation_report(
        context: dg.AssetExecutionContext,
        platform: PlatformSettings,
        trained_model: model_pipeline.TrainedModel,
        preprocessed_cache: PreprocessedCache,
    ) -> dg.Output[EvaluationReport]:
        training = platform.settings().training
        report, files = model_pipeline.evaluate_trained(training, preprocessed_cache, trained_model)
        return dg.Output(
            report, metadata=_evaluation_metadata(training, trained_model, report, files)
        )

    return evaluation_report


def _floor_checks(arch: str) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(
        asset=evaluation_report_key(arch),
        name="test_auc_floor",
        blocking=True,
        description="Test ROC AUC at or above the configured floor (CXR_MIN_TEST_AUC).",
    )
    def auc_floor(
        platform: PlatformSettings, evaluation_report: EvaluationReport
    ) -> dg.AssetCheckResult:
        floor, _ = platform.settings().training.evaluation_floors
        auc = evaluation_report.splits["test"].auc
        return dg.AssetCheckResult(
            passed=bool(auc >= floor), metadata=readable({"test_auc": auc, "floor": floor})
        )

    @dg.asset_check(
        asset=evaluation_report_key(arch),
        name="test_sensitivity_floor",
        blocking=True,
        description="Test sensitivity at the validation-chosen threshold at or above the floor "
        "(CXR_MIN_TEST_SENSITIVITY).",
    )
    def sensitivity_floor(
        platform: PlatformSettings, evaluation_report: EvaluationReport
    ) -> dg.AssetCheckResult:
        _, floor = platform.settings().training.evaluation_floors
        sensitivity = evaluation_report.splits["test"].sensitivity or 0.0
        return dg.AssetCheckResult(
            passed=bool(sensitivity >= floor),
            metadata=readable({"test_sensitivity": sensitivity, "floor": floor}),
        )

    return [auc_floor, sensitivity_floor]


def _subgroup_check(arch: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=evaluation_report_key(arch),
        name="subgroup_shortfalls",
        blocking=False,
        description="Warns when a subgroup of the test split (a source folder, a file-name "
        "family, a projection) has sensitivity or specificity whose 95% interval lies wholly "
        "below the split's own figure: the model may fail one source the average hides.",
    )
    def subgroup_shortfalls(evaluation_report: EvaluationReport) -> dg.AssetCheckResult:
        flagged = evaluation_report.flagged_subgroups
        return dg.AssetCheckResult(
            passed=not flagged,
            severity=dg.AssetCheckSeverity.WARN,
            description="; ".join(group.describe() for group in flagged) or None,
            metadata={
                "subgroups_judged": len(evaluation_report.subgroups),
                "flagged": len(flagged),
                "shortfalls": dg.MetadataValue.md(
                    "\n".join(f"- {group.describe()}" for group in flagged) or "none"
                ),
            },
        )

    return subgroup_shortfalls


def _ensemble_asset(archs: tuple[str, ...]) -> dg.AssetsDefinition:
    @dg.asset(
        key=trained_model_key(ENSEMBLE),
        group_name=GROUP,
        kinds={"pytorch", "mlflow"},
        ins={
            **{f"trained_{arch}": dg.AssetIn(trained_model_key(arch)) for arch in archs},
            **{f"report_{arch}": dg.AssetIn(evaluation_report_key(arch)) for arch in archs},
            "preprocessed_cache": dg.AssetIn(dg.AssetKey("preprocessed_cache")),
        },
        description=f"{' + '.join(archs)} as one model: each member's logit through its own "
        "calibration, averaged in one graph (nothing retrained). Evaluated, explained, exported "
        f"and registered like the others; Grad-CAM reads {archs[0]}.",
    )
    def ensemble(
        context: dg.AssetExecutionContext,
        platform: PlatformSettings,
        preprocessed_cache: PreprocessedCache,
        **inputs: Any,
    ) -> dg.Output[model_pipeline.TrainedModel]:
        training = platform.settings().training
        trained = build_ensemble(
            training,
            preprocessed_cache,
            [Member(inputs[f"trained_{arch}"], inputs[f"report_{arch}"]) for arch in archs],
            model_name=ENSEMBLE,
            test_time_augmentation=training.ensemble_tta,
            dagster_run_id=context.run.run_id,
        )
        members = "\n".join(
            f"| {m['model_name']} | {m['best_val_auc']:.4f} | {m['test_auc']:.4f} |"
            for m in trained.members
        )
        return dg.Output(
            trained,
            metadata=readable(
                {
                    "arch": trained.arch,
                    "best_val_auc": trained.best_val_auc,
                    "test_time_augmentation": training.ensemble_tta,
                    "members": dg.MetadataValue.md(
                        "| member | val AUC | test AUC |\n| --- | ---: | ---: |\n" + members
                    ),
                    "mlflow_run": mlflow_run_link(training, trained.mlflow_run_id),
                    "checkpoint": home_path(trained.checkpoint, training.home),
                    "checkpoint_sha256": trained.checkpoint_sha256 or "",
                }
            ),
        )

    return ensemble


def _evaluated_assets(name: str) -> list:
    """The evaluation report of a trained model (or the ensemble) and its checks."""
    return [_evaluation_report_asset(name), *_floor_checks(name), _subgroup_check(name)]


def model_names(archs: tuple[str, ...], ensemble: bool) -> tuple[str, ...]:
    """Every model the code location evaluates, exports and registers."""
    return (*archs, ENSEMBLE) if ensemble else archs


def build_training_definitions(archs: tuple[str, ...], ensemble: bool = False) -> dg.Definitions:
    """The assets and checks of the given architectures (and their ensemble), plus their
    comparison."""
    assets: list = []
    checks: list = []
    for arch in archs:
        architecture(arch)  # unknown names fail when the code location loads
        report, *arch_checks = _evaluated_assets(arch)
        assets += [_trained_model_asset(arch), report]
        checks += arch_checks
    if ensemble:
        report, *ensemble_checks = _evaluated_assets(ENSEMBLE)
        assets += [_ensemble_asset(archs), report]
        checks += ensemble_checks
    archs = model_names(archs, ensemble)

    @dg.asset(
        group_name=GROUP,
        kinds={"python"},
        ins={f"report_{arch}": dg.AssetIn(evaluation_report_key(arch)) for arch in archs},
        description="Baseline vs transfer models on the same test split, side by side.",
    )
    def model_comparison(
        context: dg.AssetExecutionContext, platform: PlatformSettings, **reports: EvaluationReport
    ) -> dg.Output[dict]:
        ordered = [reports[f"report_{arch}"] for arch in archs]
        table = comparison_markdown(ordered)
        training = platform.settings().training
        out_dir = training.reports_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model_comparison.md").write_text(table)
        rows = {r.model_name: r.headline("test") for r in ordered}
        (out_dir / "model_comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
        best = max(ordered, key=lambda r: r.splits["test"].auc)
        return dg.Output(
            rows,
            metadata={
                "comparison": dg.MetadataValue.md(table),
                "highest_test_auc": best.model_name,
                "json": home_path(out_dir / "model_comparison.json", training.home),
            },
        )

    return dg.Definitions(assets=[*assets, model_comparison], asset_checks=checks)

"""Groups "explainability" and "deployment".

Per architecture: ``<arch>/gradcam_gallery`` and ``<arch>/exported_model`` (blocking parity
check). Then ``registered_model_version`` (every export becomes a registry version; the best by
validation AUC becomes ``shadow``), ``production_model`` (the promotion gate decides) and
``bento`` (the HTTP service packaged with the production version inside).
"""
# No `from __future__ import annotations`: Dagster inspects these annotations at runtime.

from pathlib import Path
from typing import Any

import dagster as dg

from cxr_platform.calibration.site_follow import rejudge_site_versions
from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.defs.metadata import home_path, readable
from cxr_platform.defs.resources import PlatformSettings
from cxr_platform.defs.training_assets import evaluation_report_key, png_markdown, trained_model_key
from cxr_platform.deployment import pipeline as deployment
from cxr_platform.deployment.export import ExportedModel
from cxr_platform.deployment.gate import GateDecision
from cxr_platform.deployment.registry import RegistryEvent
from cxr_platform.explain.report import ExplanationReport, explain_checkpoint
from cxr_platform.models.evaluation import EvaluationReport
from cxr_platform.models.pipeline import TrainedModel
from cxr_platform.sections import RegistrySection
from cxr_platform.serving.packaging import build_bento

EXPLAIN_GROUP = "explainability"
DEPLOY_GROUP = "deployment"
PRODUCTION_MODEL_KEY = dg.AssetKey("production_model")


def gallery_key(arch: str) -> dg.AssetKey:
    return dg.AssetKey([arch, "gradcam_gallery"])


def exported_model_key(arch: str) -> dg.AssetKey:
    return dg.AssetKey([arch, "exported_model"])


def _evaluated_model_ins(arch: str) -> dict[str, dg.AssetIn]:
    """Both per-architecture assets read the checkpoint as training wrote it and take the
    operating point (and, for export, the headline metrics) from the evaluation report."""
    return {
        "trained_model": dg.AssetIn(trained_model_key(arch)),
        "evaluation_report": dg.AssetIn(evaluation_report_key(arch)),
        "preprocessed_cache": dg.AssetIn(dg.AssetKey("preprocessed_cache")),
    }


def _gallery_metadata(report: ExplanationReport, home: Path) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "gallery": dg.MetadataValue.md(png_markdown(report.gallery, "Grad-CAM gallery")),
        "randomization_mean_abs_spearman": report.randomization.mean_abs_rank_correlation,
        "randomization_passed": report.randomization.passed,
        "json": home_path(report.gallery.parent / "explanations.json", home),
    }
    if report.pointing_game is not None:
        game = report.pointing_game
        metadata.update(
            {
                "pointing_game_hit_rate": game.hit_rate,
                "pointing_game_random_point_rate": game.random_point_hit_rate,
                "pointing_game_p_value": game.p_value,
                "pointing_game_n": game.n,
            }
        )
    return readable(metadata)


def _gallery_asset(arch: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=gallery_key(arch),
        group_name=EXPLAIN_GROUP,
        kinds={"pytorch"},
        ins=_evaluated_model_ins(arch),
        check_specs=[
            dg.AssetCheckSpec(
                "randomization_sanity",
                asset=gallery_key(arch),
                description="Grad-CAM maps of the trained model differ from those of the same "
                "architecture with random weights (Adebayo et al. 2018).",
            )
        ],
        description=f"{arch}: Grad-CAM overlays of the most confident true/false positives and "
        "negatives on the test split, with the pointing game (synthetic lesion masks) and the "
        "model-randomization check.",
    )
    def gradcam_gallery(
        platform: PlatformSettings,
        trained_model: TrainedModel,
        evaluation_report: EvaluationReport,
        preprocessed_cache: PreprocessedCache,
    ):
        training = platform.settings().training
        report = explain_checkpoint(
            trained_model.checkpoint,
            evaluation_report.operating_point,
            preprocessed_cache,
            training.reports_dir / "explanations" / trained_model.model_name,
            model_name=trained_model.model_name,
            seed=training.seed,
        )
        yield dg.Output(report.to_dict(), metadata=_gallery_metadata(report, training.home))
        yield dg.AssetCheckResult(
            check_name="randomization_sanity",
            passed=report.randomization.passed,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=readable(report.randomization.to_dict()),
        )

    return gradcam_gallery


def _exported_model_metadata(exported: ExportedModel, home: Path) -> dict[str, Any]:
    parity, summary = exported.parity, exported.metadata.summary()
    return readable(
        {
            "onnx": home_path(exported.onnx_path, home),
            "torchscript": home_path(exported.torchscript_path, home),
            "onnx_max_abs_diff": parity.onnx_max_abs_diff,
            "torchscript_max_abs_diff": parity.torchscript_max_abs_diff,
            "threshold": exported.metadata.threshold,
            "input_gate": dg.MetadataValue.json(
                exported.metadata.summary().get("input_gate") or {}
            ),
            "int8": dg.MetadataValue.json(exported.int8.to_dict() if exported.int8 else {}),
            "model_metadata": dg.MetadataValue.json(summary),
        }
    )


def _exported_model_asset(arch: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=exported_model_key(arch),
        group_name=DEPLOY_GROUP,
        kinds={"onnx", "pytorch"},
        ins=_evaluated_model_ins(arch),
        check_specs=[
            dg.AssetCheckSpec(
                "parity",
                asset=exported_model_key(arch),
                blocking=True,
                description="ONNX Runtime and TorchScript logits within 1e-4 of PyTorch on 32 "
                "test images.",
            )
        ],
        description=f"{arch}: ONNX (dynamic batch) and TorchScript with preprocessing, "
        "operating point, architecture and run id inside the files.",
    )
    def exported_model(
        platform: PlatformSettings,
        trained_model: TrainedModel,
        evaluation_report: EvaluationReport,
        preprocessed_cache: PreprocessedCache,
    ):
        registry = platform.settings().registry
        exported = deployment.export_trained(
            registry, preprocessed_cache, trained_model, evaluation_report
        )
        parity = exported.parity
        yield dg.Output(exported, metadata=_exported_model_metadata(exported, registry.home))
        yield dg.AssetCheckResult(
            check_name="parity", passed=parity.passed, metadata=readable(parity.to_dict())
        )

    return exported_model


def gate_checks_markdown(decision: GateDecision) -> str:
    return "| check | value | limit | passed |\n| --- | ---: | ---: | --- |\n" + "\n".join(
        f"| {c.name} | {c.value:.3f} | {c.limit:.3f} | {'yes' if c.passed else 'NO'} |"
        for c in decision.checks
    )


def registry_event_metadata(event: RegistryEvent) -> dict[str, Any]:
    return {
        "action": event.action,
        "version": event.version,
        "previous_version": event.previous_version or "",
        "triggered_by": event.triggered_by,
        "at": event.at,
    }


def record_registry_event(
    registry_settings: RegistrySection, event: RegistryEvent, instance
) -> None:
    """A promotion or rollback made outside a run (the CLI) as a ``production_model``
    materialization, so the Dagster UI's history of that asset is complete."""
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=PRODUCTION_MODEL_KEY,
            description=f"{event.action} to version {event.version} by {event.triggered_by}",
            metadata={
                **registry_event_metadata(event),
                "gate": dg.MetadataValue.json(event.details.get("gate") or {}),
                "registered_model": registry_settings.registry_model_name,
            },
        )
    )


def _versions_table(archs: tuple[str, ...], versions: dict[str, str], trained: dict) -> str:
    header = "| architecture | version | best val AUC | model card |\n| --- | ---: | ---: | --- |\n"
    return header + "\n".join(
        f"| {arch} | {versions[arch]} | {trained[arch].best_val_auc:.3f} "
        f"| `cxr models --card {versions[arch]}` |"
        for arch in archs
    )


def _registered_model_version_asset(archs: tuple[str, ...]) -> dg.AssetsDefinition:
    @dg.asset(
        group_name=DEPLOY_GROUP,
        kinds={"mlflow"},
        ins={
            **{f"exported_{arch}": dg.AssetIn(exported_model_key(arch)) for arch in archs},
            **{f"trained_{arch}": dg.AssetIn(trained_model_key(arch)) for arch in archs},
        },
        description="Every exported model as a version of the registered model; the best by "
        "validation AUC (never test) gets the alias 'shadow'.",
    )
    def registered_model_version(
        context: dg.AssetExecutionContext, platform: PlatformSettings, **inputs: Any
    ) -> dg.Output[dict]:
        registry_settings = platform.settings().registry
        trigger = f"dagster:{context.run.run_id}"
        registry = deployment.registry_for(registry_settings)
        versions = {}
        cards = {}
        for arch in archs:
            info = deployment.register_exported(
                registry_settings,
                inputs[f"exported_{arch}"],
                triggered_by=trigger,
                shadow=False,
                data_dir=inputs[f"trained_{arch}"].data_dir,
            )
            versions[arch] = info.version
            cards[arch] = registry.card(info.version)
        best, best_name = deployment.best_by_validation(
            [(inputs[f"trained_{arch}"], arch) for arch in archs]
        )
        candidate = versions[best_name]
        registry.set_shadow(candidate, triggered_by=trigger)
        trained = {arch: inputs[f"trained_{arch}"] for arch in archs}
        table = _versions_table(archs, versions, trained)
        return dg.Output(
            {"versions": versions, "candidate": candidate, "candidate_arch": best_name},
            metadata={
                "registered_model": registry_settings.registry_model_name,
                "shadow_version": candidate,
                "shadow_arch": best.arch,
                "versions": dg.MetadataValue.md(table),
                # One card per version, in full: what a reviewer reads before promotion.
                **{f"model_card_{arch}": dg.MetadataValue.md(cards[arch]) for arch in archs},
            },
        )

    return registered_model_version


def _production_model_asset() -> dg.AssetsDefinition:
    @dg.asset(
        group_name=DEPLOY_GROUP,
        kinds={"mlflow"},
        ins={
            "registered_model_version": dg.AssetIn(dg.AssetKey("registered_model_version")),
            "preprocessed_cache": dg.AssetIn(dg.AssetKey("preprocessed_cache")),
        },
        check_specs=[
            dg.AssetCheckSpec(
                "promotion_gate",
                asset=PRODUCTION_MODEL_KEY,
                description="The shadow candidate against production on the same test split: "
                "AUC floor and allowed drop, sensitivity and specificity floors.",
            )
        ],
        description="The promotion gate moves 'production' to the shadow candidate when it "
        "passes; the replaced version stays addressable as 'previous-production'.",
    )
    def production_model(
        context: dg.AssetExecutionContext,
        platform: PlatformSettings,
        registered_model_version: dict,
        preprocessed_cache: PreprocessedCache,
    ):
        candidate = registered_model_version["candidate"]
        outcome = deployment.promote_with_gate(
            platform.settings().registry,
            preprocessed_cache,
            candidate,
            triggered_by=f"dagster:{context.run.run_id}",
        )
        decision = outcome.decision
        checks = gate_checks_markdown(decision)
        production = outcome.production_version
        settings = platform.settings()
        rejudged = (
            rejudge_site_versions(
                settings.monitoring,
                settings.registry,
                target_sensitivity=settings.training.target_sensitivity,
                triggered_by=f"dagster:{context.run.run_id}",
            )
            if outcome.promoted
            else []
        )
        yield dg.Output(
            {
                "production_version": production,
                "promoted": outcome.promoted,
                "candidate": candidate,
                "decision": decision.to_dict(),
            },
            metadata=readable(
                {
                    "production_version": production or "none",
                    "candidate_version": candidate,
                    "promoted": outcome.promoted,
                    "decision": decision.summary(),
                    "gate": dg.MetadataValue.md(checks),
                    "site_versions": "; ".join(r.summary() for r in rejudged) or "none",
                    **(registry_event_metadata(outcome.event) if outcome.event else {}),
                }
            ),
        )
        yield dg.AssetCheckResult(
            check_name="promotion_gate",
            passed=decision.passed,
            # A refused candidate is the gate working, not the pipeline failing.
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"summary": decision.summary(), "failed": ", ".join(decision.failed_checks)},
        )

    return production_model


def _bento_asset() -> dg.AssetsDefinition:
    @dg.asset(
        group_name=DEPLOY_GROUP,
        kinds={"bentoml"},
        ins={"production_model": dg.AssetIn(PRODUCTION_MODEL_KEY)},
        # Nothing to package while the gate has never promoted a model: not materialized then.
        output_required=False,
        description="A Bento (BentoML's deployable archive) of the HTTP service with the current "
        "production version inside it, in the platform's BentoML store.",
    )
    def bento(
        context: dg.AssetExecutionContext, platform: PlatformSettings, production_model: dict
    ):
        settings = platform.settings()
        version = production_model["production_version"]
        if version is None:
            context.log.warning("no production model yet: no Bento built")
            return
        built = build_bento(settings.registry, version)
        yield dg.Output(
            built.to_dict(),
            metadata={
                "bento": built.bento_tag,
                "model": built.model_tag,
                "registry_version": built.registry_version,
                "serve": dg.MetadataValue.md(
                    f"```\n{built.serve_command(settings.serving.service_port)}\n```"
                ),
            },
        )

    return bento


def build_deployment_definitions(archs: tuple[str, ...]) -> dg.Definitions:
    per_architecture = [
        asset for arch in archs for asset in (_gallery_asset(arch), _exported_model_asset(arch))
    ]
    return dg.Definitions(
        assets=[
            *per_architecture,
            _registered_model_version_asset(archs),
            _production_model_asset(),
            _bento_asset(),
        ]
    )

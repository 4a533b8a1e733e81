"""Explainability and deployment groups in a real Dagster instance."""

from __future__ import annotations

import dagster as dg

from cxr_platform.defs.definitions import RELEASE_JOB, build_definitions
from cxr_platform.deployment.registry import PRODUCTION, SHADOW, registry_for
from cxr_platform.models.checkpoint import file_sha256
from cxr_platform.settings import load_settings


def test_release_job_registers_a_shadow_and_the_gate_can_refuse_production(
    tiny_synthetic, tmp_path
):
    settings = load_settings(
        home=tmp_path / "home",
        data_dir=tiny_synthetic,
        image_size=64,
        workers=1,
        training_profile="demo",
        device="cpu",
        models=("baseline_cnn",),
        min_test_auc=0.0,
        min_test_sensitivity=0.0,
        # A briefly trained model at 0.95 sensitivity is far from perfect specificity.
        min_test_specificity=1.0,
    )
    result = (
        build_definitions(settings)
        .resolve_job_def(RELEASE_JOB)
        .execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    )
    assert result.success  # a refusal is the gate working, not a failed run
    checks = {
        f"{e.asset_key.to_user_string()}:{e.check_name}": e
        for e in result.get_asset_check_evaluations()
    }
    assert checks["baseline_cnn/exported_model:parity"].passed
    gate = checks["production_model:promotion_gate"]
    assert not gate.passed and gate.severity == dg.AssetCheckSeverity.WARN, gate.metadata
    assert "specificity_floor" in gate.metadata["failed"].value

    materialized = {
        e.asset_key.to_user_string(): e.materialization
        for e in result.get_asset_materialization_events()
    }
    gallery = materialized["baseline_cnn/gradcam_gallery"].metadata
    assert gallery["gallery"].value.startswith("![Grad-CAM gallery](data:image/png;base64,")
    assert 0 <= gallery["pointing_game_hit_rate"].value <= 1  # synthetic data has masks
    production = materialized["production_model"].metadata
    assert production["promoted"].value is False
    assert production["production_version"].value == "none"
    assert "bento" not in materialized  # nothing to package without a production model

    # The checkpoint the whole job used is the file training wrote, byte for byte.
    trained = materialized["baseline_cnn/trained_model"].metadata
    shown = trained["checkpoint"].value  # named from the home, as on every machine
    assert shown.startswith("$CXR_HOME/")
    checkpoint = settings.home / shown.removeprefix("$CXR_HOME/")
    assert file_sha256(checkpoint) == trained["checkpoint_sha256"].value
    report = result.asset_value(dg.AssetKey(["baseline_cnn", "evaluation_report"]))
    assert report.checkpoint_sha256 == trained["checkpoint_sha256"].value

    registry = registry_for(settings.registry)
    assert registry.aliases() == {SHADOW: "1"}
    assert PRODUCTION not in registry.aliases()
    assert registry.get("1").tags["cxr.data_dir"] == str(tiny_synthetic)

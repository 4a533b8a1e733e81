"""Aliases, rollback and the promotion gate against a real MLflow registry (SQLite)."""

from __future__ import annotations

import json

import pytest

from cxr_platform.deployment.gate import GateConfig, GateError, ModelScore, decide
from cxr_platform.deployment.pipeline import (
    promote_with_gate,
    register_exported,
    registry_for,
    run_gate,
)
from cxr_platform.deployment.registry import (
    PREVIOUS_PRODUCTION,
    PRODUCTION,
    SHADOW,
    ModelVersionNotFoundError,
    NothingToRollBackError,
    RegistryError,
)
from cxr_platform.model_version.predictor import Predictor

from .conftest import export_for_registry

CONFIG = GateConfig(min_auc=0.7, min_sensitivity=0.8, min_specificity=0.3, max_auc_drop=0.01)


def _score(version, auc, sensitivity=0.9, specificity=0.5):
    return ModelScore(str(version), 100, 60, auc, sensitivity, specificity, 0.5)


def test_gate_promotes_a_first_model_only_above_the_absolute_floors():
    assert decide(_score(1, 0.8), None, CONFIG).passed
    refused = decide(_score(1, 0.8, specificity=0.2), None, CONFIG)
    assert not refused.passed and refused.failed_checks == ["specificity_floor"]
    assert not decide(_score(1, 0.65), None, CONFIG).passed


def test_gate_compares_auc_with_production_within_the_allowed_drop():
    production = _score(1, 0.90)
    assert decide(_score(2, 0.895), production, CONFIG).passed  # within 0.01
    worse = decide(_score(2, 0.85), production, CONFIG)
    assert worse.failed_checks == ["auc_vs_production"]
    assert "FAIL" in worse.summary() and "production v1" in worse.summary()
    assert decide(_score(2, 0.95), production, CONFIG).passed
    with pytest.raises(GateError, match="same evaluation data"):
        decide(_score(2, 0.95), ModelScore("1", 90, 50, 0.9, 0.9, 0.5, 0.5), CONFIG)


@pytest.fixture()
def registered(settings, trained_checkpoint, untrained_checkpoint, learnable_cache, tmp_path):
    """v1: a trained baseline; v2: a near-chance one. Both registered, v2 ends up as shadow."""
    good = export_for_registry(
        settings, trained_checkpoint, learnable_cache, tmp_path / "a", "good"
    )
    bad = export_for_registry(
        settings, untrained_checkpoint, learnable_cache, tmp_path / "b", "bad"
    )
    v1 = register_exported(settings.registry, good, triggered_by="test")
    v2 = register_exported(settings.registry, bad, triggered_by="test")
    return v1, v2


def test_registration_records_files_tags_and_the_shadow_alias(settings, registered):
    v1, v2 = registered
    registry = registry_for(settings.registry)
    assert registry.aliases() == {SHADOW: v2.version}
    assert v1.tags["cxr.arch"] == "baseline_cnn"
    assert v1.tags["cxr.data_version"] == "manifest-under-test"
    assert v1.tags["cxr.git_commit"] == "0123abc"
    assert float(v1.tags["cxr.threshold"]) > 0
    assert json.loads(v1.tags["cxr.preprocessing"])["image_size"] == 96
    assert v1.metrics["best_val_auc"] == pytest.approx(0.8)
    folder = registry.download(v1.version)
    assert {"model.onnx", "model.torchscript.pt", "weights.pt", "metadata.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert registry.download(v1.version) == folder  # immutable: downloaded once
    assert Predictor(folder).model_name == "good"
    with pytest.raises(ModelVersionNotFoundError):
        registry.get("99")
    with pytest.raises(ModelVersionNotFoundError):
        registry.get(PRODUCTION)


def test_gate_refuses_a_worse_candidate_and_accepts_a_better_one(
    settings, registered, learnable_cache
):
    v1, v2 = registered
    registry = registry_for(settings.registry)
    first = promote_with_gate(settings.registry, learnable_cache, v1.version, triggered_by="test")
    assert first.promoted, first.decision.summary()
    assert first.decision.production is None  # the first model faces the floors only
    assert registry.aliases()[PRODUCTION] == v1.version

    refused = promote_with_gate(settings.registry, learnable_cache, v2.version, triggered_by="test")
    assert not refused.promoted
    assert "auc_vs_production" in refused.decision.failed_checks
    assert refused.decision.candidate.n == refused.decision.production.n  # same data
    assert registry.aliases()[PRODUCTION] == v1.version
    assert registry.aliases()[SHADOW] == v2.version

    # A re-registration of the good model is no worse than production: it passes.
    again = register_exported(
        settings.registry,
        _reexport(settings, registry, v1),
        triggered_by="test",
    )
    accepted = promote_with_gate(
        settings.registry, learnable_cache, again.version, triggered_by="test"
    )
    assert accepted.promoted, accepted.decision.summary()
    gate = json.loads(registry.get(again.version).tags["cxr.gate"])
    assert gate["passed"] and gate["production"]["version"] == v1.version


def _reexport(settings, registry, info):
    from cxr_platform.deployment.export import ExportedModel, ParityResult
    from cxr_platform.model_version.files import read_onnx_metadata

    folder = registry.download(info.version)
    return ExportedModel(
        directory=folder,
        metadata=read_onnx_metadata(folder / "model.onnx"),
        parity=ParityResult(32, 0.0, 0.0, 1e-4),
    )


def test_aliases_move_and_rollback_restores_the_previous_version(settings, registered):
    v1, v2 = registered
    registry = registry_for(settings.registry)
    with pytest.raises(NothingToRollBackError):
        registry.rollback(triggered_by="test")
    registry.promote(v1.version, triggered_by="alice")
    with pytest.raises(NothingToRollBackError):
        registry.rollback(triggered_by="test")  # the first production replaced nothing
    registry.promote(v2.version, triggered_by="bob")
    assert registry.aliases() == {PRODUCTION: v2.version, PREVIOUS_PRODUCTION: v1.version}
    with pytest.raises(RegistryError, match="already production"):
        registry.promote(v2.version, triggered_by="bob")

    event = registry.rollback(triggered_by="carol")
    assert (event.version, event.previous_version) == (v1.version, v2.version)
    assert registry.aliases() == {PRODUCTION: v1.version}
    assert registry.get(v2.version).tags["cxr.rolled_back_by"] == "carol"
    actions = [(e.action, e.version, e.triggered_by) for e in registry.events()]
    assert actions[-3:] == [
        ("promoted", v1.version, "alice"),
        ("promoted", v2.version, "bob"),
        ("rollback", v1.version, "carol"),
    ]


def test_gate_scores_candidate_and_production_on_the_same_test_split(
    settings, registered, learnable_cache
):
    v1, v2 = registered
    registry_for(settings.registry).promote(v1.version, triggered_by="test")
    decision = run_gate(settings.registry, learnable_cache, v2.version)
    assert decision.evaluated_on["split"] == "test"
    assert decision.evaluated_on["n"] == len(learnable_cache.labels("test"))
    assert decision.production.version == v1.version
    assert decision.production.auc > decision.candidate.auc


def test_a_new_tracking_database_never_serves_a_stale_cached_version(
    settings, trained_checkpoint, untrained_checkpoint, learnable_cache, tmp_path
):
    first = export_for_registry(settings, trained_checkpoint, learnable_cache, tmp_path / "a", "a")
    assert register_exported(settings.registry, first, triggered_by="test").version == "1"
    old_folder = registry_for(settings.registry).download("1")

    # Same home (and so the same local download cache), a fresh MLflow database: numbering
    # starts at 1 again, for a different model.
    fresh = settings.model_copy(
        update={"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'fresh.db'}"}
    )
    second = export_for_registry(fresh, untrained_checkpoint, learnable_cache, tmp_path / "b", "b")
    assert register_exported(fresh.registry, second, triggered_by="test").version == "1"
    new_folder = registry_for(fresh.registry).download("1")
    assert new_folder != old_folder
    assert Predictor(new_folder).model_name == "b" and Predictor(old_folder).model_name == "a"


def test_every_registered_version_gets_a_model_card_written_once(settings, registered):
    v1, v2 = registered
    registry = registry_for(settings.registry)
    for info in (v1, v2):
        folder = registry.download(info.version)
        markdown = (folder / "model_card.md").read_text()
        assert markdown == registry.card(info.version)
        assert markdown.startswith(f"# Model card: {registry.name} version {info.version}")
        for section in (
            "## Intended use",
            "## Not intended for",
            "## Training data and split",
            "## Operating point",
            "## Performance",
            "## Subgroups",
            "## Input gate",
            "## Known limitations",
            "## Lineage",
        ):
            assert section in markdown, section
        # Lineage and the facts the tags hold, not placeholders.
        assert "`manifest-under-test`" in markdown and "`0123abc`" in markdown
        assert f"`{info.run_id}`" in markdown
        gate = info.release.input_gate
        assert gate and f"{gate['val_refused']} of {gate['n_val']}" in markdown
        # The synthetic set: the card says its figures cannot be used clinically.
        assert "Evaluated on synthetic images only" in markdown
        html = (folder / "model_card.html").read_text()
        assert (
            html.startswith("<!DOCTYPE html>") and "<table>" in html and "<h2>Lineage</h2>" in html
        )
        # MLflow's UI shows the description first: a summary that points at the card.
        description = registry.client.get_model_version(registry.name, info.version).description
        assert "model_card.md" in description and f"--card {info.version}" in description
    # These runs logged no evaluation report: the card shows the version's own figures only.
    assert "| best_val_auc | 0.800 |" in registry.card(v1.version)
    assert "Test split" not in registry.card(v1.version)

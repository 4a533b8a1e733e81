"""Alias moves reach a running process without a restart and without a failed request."""

from __future__ import annotations

import threading
import time

from cxr_platform.deployment.pipeline import register_exported, registry_for
from cxr_platform.deployment.registry import PRODUCTION, SHADOW, lung_registry_for
from cxr_platform.inference.live import LiveModels
from cxr_platform.model_version.lung_fields import SEGMENTER_REPORT_FILE
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.tracking import ExperimentTracker
from cxr_platform_tests.conftest import release_lung_fields

from .conftest import export_for_registry


def test_alias_moves_swap_models_under_load_with_no_failed_request(
    settings, trained_checkpoint, untrained_checkpoint, learnable_cache, tmp_path
):
    good = export_for_registry(settings, trained_checkpoint, learnable_cache, tmp_path / "a", "a")
    bad = export_for_registry(settings, untrained_checkpoint, learnable_cache, tmp_path / "b", "b")
    v1 = register_exported(settings.registry, good, triggered_by="test", shadow=False)
    v2 = register_exported(settings.registry, bad, triggered_by="test", shadow=False)
    registry = registry_for(settings.registry)
    registry.promote(v1.version, triggered_by="test")

    live = LiveModels(registry, threads=1)
    assert live.refresh() and live.current().versions == {PRODUCTION: "1", SHADOW: None}
    assert not live.refresh()  # nothing moved: nothing reloaded

    images = learnable_cache.images("test", mmap=False)[:4]
    seen: set[str] = set()
    failures: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            snapshot = live.current()
            try:
                predictions = snapshot.production.predict_prepared(images)
                # One request, one version: never a mixture.
                assert {p.model_version for p in predictions} == {snapshot.production.model_version}
                seen.add(predictions[0].model_version)
            except BaseException as exc:  # noqa: BLE001 - the test counts every failure
                failures.append(exc)

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        registry.set_shadow(v2.version, triggered_by="test")
        assert live.refresh()
        assert live.current().versions == {PRODUCTION: "1", SHADOW: "2"}
        registry.promote(v2.version, triggered_by="test")  # also clears shadow
        assert live.refresh()
        assert live.current().versions == {PRODUCTION: "2", SHADOW: None}
        registry.rollback(triggered_by="test")
        assert live.refresh()
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
    assert not failures, failures[:3]
    assert seen == {"1", "2"}
    assert live.current().versions == {PRODUCTION: "1", SHADOW: None}


def test_polling_picks_up_a_promotion_and_survives_registry_errors(
    settings, trained_checkpoint, learnable_cache, tmp_path
):
    exported = export_for_registry(
        settings, trained_checkpoint, learnable_cache, tmp_path / "a", "a"
    )
    v1 = register_exported(settings.registry, exported, triggered_by="test")
    registry = registry_for(settings.registry)
    live = LiveModels(registry)
    live.refresh()
    assert live.current().versions == {PRODUCTION: None, SHADOW: v1.version}

    registry.promote(v1.version, triggered_by="test")
    original = registry.aliases
    calls = {"n": 0}

    def flaky_then_real():
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("registry briefly unreachable")
        return original()

    registry.aliases = flaky_then_real  # the loop must log and carry on, not die
    live.start_polling(0.05)
    try:
        # Waits until picked up (normally well under a second); generous for a loaded CI machine.
        deadline = time.monotonic() + 60
        while live.current().versions[PRODUCTION] != v1.version and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        live.stop()
    assert calls["n"] >= 2
    assert live.current().versions == {PRODUCTION: v1.version, SHADOW: None}


def test_a_lung_fields_version_follows_its_alias_and_a_broken_one_never_stops_the_classifiers(
    settings, trained_checkpoint, learnable_cache, lung_fields_export, tmp_path
):
    """A lung fields version loads beside the classifiers; one whose files cannot be loaded is
    logged and passed over, the classifiers still follow their aliases, and the last good lung
    version stays in service."""
    exported = export_for_registry(
        settings, trained_checkpoint, learnable_cache, tmp_path / "a", "a"
    )
    v1 = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
    registry = registry_for(settings.registry)
    registry.promote(v1.version, triggered_by="test")
    lungs = lung_registry_for(settings.registry)
    live = LiveModels(registry, threads=1, lung_registry=lungs)
    assert live.refresh() and live.current().lung_fields is None  # none registered yet

    good = release_lung_fields(settings.registry, lung_fields_export)
    assert live.refresh() and live.current().lung_fields_version == good
    squares = learnable_cache.images("test", mmap=False)[:2]
    snapshot = live.current()
    assert snapshot.fields_of(squares[0], snapshot.production).mask.shape == squares[0].shape

    # A version without its model file (a half-copied artifact store), promoted by hand.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / SEGMENTER_REPORT_FILE).write_text("{}")
    run_id = (
        ExperimentTracker(
            settings.registry.tracking_uri,
            experiment="lung-fields-test",
            artifact_root=settings.registry.mlflow_dir / "artifacts",
        )
        .start_run("broken", {})
        .run_id
    )
    bad = lungs.register_folder(broken, run_id=run_id, tags=VersionTags(), triggered_by="test")
    lungs.promote(bad.version, triggered_by="test")
    v2 = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
    registry.promote(v2.version, triggered_by="test")
    assert live.refresh()
    assert live.current().versions[PRODUCTION] == v2.version  # the classifier moved on
    assert live.current().lung_fields_version == good  # the last good lung version stays

"""A site's own version through its life: proposed and promoted on the site's labels with the
paired gate, monitored in drift windows against the site it was judged on, and re-judged when
production is promoted (same weights: kept; other weights never compared at the site: retired)
and rolled back (to the version it was made from: kept), each a registry event.

The site's traffic is written to the real inference log as the service writes it: the
synthetic model's validation rows (features and all), their logits moved as a calibration shift
moves them, so that the version's threshold calls the site's normal images pneumonia."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from itertools import count

import numpy as np
import pandas as pd
import pytest

from cxr_platform.calibration.recalibrated_version import write_recalibrated
from cxr_platform.calibration.refit import logits_from_probabilities, reference_logits
from cxr_platform.calibration.site import recalibrate_for_site
from cxr_platform.calibration.site_follow import rejudge_site_versions
from cxr_platform.calibration.site_point import logit_threshold
from cxr_platform.data.features import ImageFeatures
from cxr_platform.deployment.pipeline import (
    register_exported,
    registry_for,
    write_monitoring_reference,
)
from cxr_platform.deployment.reference import (
    LOGIT,
    PROBABILITY,
    load_reference,
    write_reference,
)
from cxr_platform.deployment.registry import PRODUCTION, ProductionMovedError
from cxr_platform.inference.log import InferenceLog, InferenceRecord
from cxr_platform.model_version.files import ONNX_FILE, read_onnx_metadata
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.monitoring.windows import (
    DriftCursor,
    check_window_versions,
    drift_sensor_step,
    ids_window,
)
from cxr_platform.settings import load_settings
from cxr_platform_tests.conftest import CXR
from cxr_platform_tests.deployment.conftest import export_for_registry

SITE, OTHER = "north", "south"
_ids = count()


def point_of(registry, version: str) -> OperatingPoint:
    return read_onnx_metadata(registry.download(version) / ONNX_FILE).calibration


def site_traffic(log, registry, version, site, rng, *, n, shift, labeled=True):
    """``n`` rows as ``version`` serves them at ``site``: reference images whose logits (in the
    weights' units) moved by ``shift``. Returns the request ids."""
    reference = load_reference(registry.download("1"))
    scored = reference[reference[PROBABILITY].notna()].reset_index(drop=True)
    home = point_of(registry, "1")
    served = point_of(registry, version)
    picked = scored.iloc[rng.integers(0, len(scored), n)].reset_index(drop=True)
    logits = reference_logits(picked, home) + shift
    probabilities = served.probabilities(logits)
    feature_names = [f for f in ImageFeatures.__dataclass_fields__ if f in picked]
    records, truth = [], {}
    for i, row in picked.iterrows():
        request = f"{site}-{version}-{next(_ids)}"
        values = {f: (None if pd.isna(row[f]) else row[f]) for f in feature_names}
        for integer in ("original_width", "original_height", "bit_depth"):
            if values.get(integer) is not None:
                values[integer] = int(values[integer])
        records.append(
            InferenceRecord(
                request_id=request,
                source="http",
                model_name="cxr",
                model_version=version,
                probability=float(probabilities[i]),
                label="PNEUMONIA" if probabilities[i] >= served.threshold else "NORMAL",
                threshold=served.threshold,
                features=ImageFeatures(**values),
                study_uid_hash=f"study-{request}",
                site=site,
            )
        )
        truth[request] = str(row["label"])
    log.write(records)
    if labeled:
        log.label_requests(truth, reporter="test")
    return list(truth)


def shift_for(registry) -> float:
    """A calibration shift that makes the version call every normal image of the site
    pneumonia (as blur did on the real model), with room to spare: the synthetic model's
    validation split holds 60 positives, so its sensitivity is known to a few percent only."""
    reference = load_reference(registry.download("1"))
    scored = reference[reference[PROBABILITY].notna()]
    home = point_of(registry, "1")
    negatives = logits_from_probabilities(
        scored.loc[scored["label"] == "NORMAL", PROBABILITY].to_numpy(float), home
    )
    return float(logit_threshold(home) - np.quantile(negatives, 0.05) + 1.0)


@pytest.fixture()
def monitored_home(tmp_path, trained_checkpoint, learnable_cache, other_population):
    """As ``site_home``, with the drift reference a release stores (validation rows scored)."""
    settings = load_settings(home=tmp_path / "home")
    exported = export_for_registry(
        settings, trained_checkpoint, learnable_cache, tmp_path / "x", "cxr", other_population
    )
    write_monitoring_reference(exported.directory, learnable_cache)
    info = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
    registry_for(settings.registry).promote(info.version, triggered_by="test")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["CXR_HOME"] = str(settings.home)
    return settings, info, env


@pytest.fixture()
def site_version(monitored_home):
    settings, info, _ = monitored_home
    registry = registry_for(settings.registry)
    log = InferenceLog(settings.monitoring.inference_log_uri)
    rng = np.random.default_rng(0)
    shift = shift_for(registry)
    site_traffic(log, registry, "1", SITE, rng, n=120, shift=shift)
    log.dispose()
    result = recalibrate_for_site(
        settings.monitoring,
        settings.registry,
        SITE,
        target_sensitivity=settings.training.target_sensitivity,
        triggered_by="test",
    )
    return settings, registry, result, shift


def test_a_site_version_is_proposed_judged_paired_and_monitored_on_its_site(site_version):
    settings, registry, result, shift = site_version
    assert result.promoted, result.summary()
    version = result.candidate_version
    assert registry.aliases()[f"production-site-{SITE}"] == version
    assert registry.aliases()[PRODUCTION] == "1"
    checks = {c.name: c for c in result.decision.checks}
    for name in ("site_specificity_gain", "site_sensitivity_floor", "site_sensitivity_target"):
        assert checks[name].passed, name
    assert result.evidence.judgement.direction == "raise"
    # Its drift reference is the site it was judged on, in its own calibration.
    reference = load_reference(registry.download(version))
    judged = reference[reference["split"] == "val"]
    assert len(judged) == 120
    point = point_of(registry, version)
    predicted = judged["predicted"] == "PNEUMONIA"
    # The file keeps six significant digits: rows that close to the threshold may round across.
    clear = (judged[PROBABILITY] - point.threshold).abs() > 1e-5
    assert clear.mean() > 0.9
    assert ((judged[PROBABILITY] >= point.threshold) == predicted)[clear].all()

    # The site moved on while another recalibration was judged: that promotion would rest on
    # a comparison that no longer holds, and nothing moves.
    with pytest.raises(ProductionMovedError, match=f"site {SITE} moved"):
        registry.promote_for_site(version, SITE, triggered_by="test", replacing="1")

    # A window with the site's own version beside production judges each against its own
    # reference, and the drift sensor speaks for both.
    log = InferenceLog(settings.monitoring.inference_log_uri)
    first = int(log.records()["id"].max()) + 1
    rng = np.random.default_rng(1)
    site_traffic(log, registry, version, SITE, rng, n=60, shift=shift)
    site_traffic(log, registry, "1", OTHER, rng, n=60, shift=0.0)
    last = int(log.records()["id"].max())
    log.dispose()
    judged = check_window_versions(settings.monitoring, ids_window(first, last), registry)
    by_version = {r.model_version: r for r in judged.results}
    assert set(by_version) == {"1", version}
    mine = by_version[version]
    assert mine.n_compared == 60 and mine.n_reference == len(reference)
    assert set(mine.by_site) == {SITE}
    assert mine.by_site[SITE].label_free.trusted == "refitted cbpe and adjusted count"
    assert set(by_version["1"].by_site) == {OTHER}
    step = drift_sensor_step(
        replace(settings.monitoring, drift_window_size=120),
        registry,
        DriftCursor(last_id=first - 1),
        now=1e12,
    )
    assert {r.model_version for r in step.results} == {"1", version}
    assert step.version_notes[version].startswith(f"site {SITE}'s own version")


def register_like(registry, settings, source: str, tmp_path, *, recalibrated: bool, threshold):
    """Version ``source``'s files with another threshold: as a recalibration of it (same
    weights, as the registry knows them) or as a fresh release."""
    folder = registry.download(source)
    point = point_of(registry, source)
    write_recalibrated(folder, tmp_path, replace(point, threshold=threshold), {})
    tags = VersionTags(recalibrated_from=source) if recalibrated else VersionTags()
    info = registry.register_folder(
        tmp_path, run_id=str(registry.get(source).run_id), tags=tags, triggered_by="test"
    )
    return info.version


def test_site_versions_are_rejudged_when_production_moves(site_version, monitored_home, tmp_path):
    settings, registry, result, _ = site_version
    version = result.candidate_version
    _, _, env = monitored_home
    target = settings.training.target_sensitivity

    def rejudge():
        return rejudge_site_versions(
            settings.monitoring, settings.registry, target_sensitivity=target, triggered_by="test"
        )

    # Production promoted to the same weights at the same threshold: the site's labels still
    # show its own threshold better. Kept, once.
    same = register_like(
        registry,
        settings,
        "1",
        tmp_path / "same",
        recalibrated=True,
        threshold=point_of(registry, "1").threshold,
    )
    registry.promote(same, triggered_by="test")
    [kept] = rejudge()
    assert kept.kept and kept.reason.startswith("same weights"), kept.summary()
    assert kept.event.action == "site_kept" and kept.event.previous_version == same
    assert rejudge() == []
    assert registry.version_for_site(SITE) == version

    # Rolled back through the CLI to the version the site's was made from: kept, and said.
    rolled = subprocess.run(
        [*CXR, "rollback"], capture_output=True, text=True, env=env, timeout=600
    )
    assert rolled.returncode == 0, rolled.stderr
    assert f"site {SITE}: version {version} kept" in rolled.stdout
    assert registry.aliases()[PRODUCTION] == "1"

    # A release with other weights that never scored the site: nothing shows the site's
    # version still better, so the site goes to production; the event says why.
    fresh = register_like(
        registry,
        settings,
        "1",
        tmp_path / "fresh",
        recalibrated=False,
        threshold=point_of(registry, "1").threshold,
    )
    registry.promote(fresh, triggered_by="test")
    [retired] = rejudge()
    assert not retired.kept and "scored by both" in retired.reason
    assert retired.event.action == "site_retired"
    assert f"production-site-{SITE}" not in registry.aliases()
    assert registry.version_for_site(SITE) == fresh
    events = [e for e in registry.events() if e.action in ("site_kept", "site_retired")]
    assert [e.action for e in events] == ["site_kept", "site_kept", "site_retired"]
    assert all(e.details["site"] == SITE and e.details["reason"] for e in events)


def test_a_recalibrated_versions_reference_is_in_its_own_calibration(monitored_home, tmp_path):
    settings, info, _ = monitored_home
    registry = registry_for(settings.registry)
    source = registry.download(info.version)
    before = point_of(registry, info.version)
    moved = replace(before, temperature=before.temperature * 2, bias=before.bias - 1.0)
    write_recalibrated(source, tmp_path / "moved", moved, {})
    old, new = load_reference(source), load_reference(tmp_path / "moved")
    scored = old[PROBABILITY].notna()
    # The same images, the same logits (kept beside the probabilities: six digits round a
    # confident call to 1 and would lose its logit): only what the calibration makes of them
    # changed, for every scored image.
    assert scored.any() and old.loc[scored, LOGIT].notna().all()
    assert new[LOGIT].equals(old[LOGIT])
    logits = old.loc[scored, LOGIT].to_numpy(float)
    assert np.allclose(old.loc[scored, PROBABILITY], before.probabilities(logits), rtol=1e-5)
    assert np.allclose(new.loc[scored, PROBABILITY], moved.probabilities(logits), rtol=1e-5)
    assert not np.allclose(new.loc[scored, PROBABILITY], old.loc[scored, PROBABILITY])
    called = new.loc[scored, PROBABILITY] >= moved.threshold
    assert (called == (new.loc[scored, "predicted"] == "PNEUMONIA")).all()
    assert new.loc[~scored].equals(old.loc[~scored])

    # A reference exported before the logits were kept: they are given back from the
    # probabilities, exactly where six digits did not round the probability to 0 or 1.
    older = tmp_path / "older"
    shutil.copytree(source, older)
    write_reference(older, old.drop(columns=[LOGIT]))
    write_recalibrated(older, tmp_path / "older-moved", moved, {})
    given_back = load_reference(tmp_path / "older-moved")
    resolved = scored & old[PROBABILITY].between(1e-5, 1 - 1e-5)
    assert resolved.any()
    assert np.allclose(
        logits_from_probabilities(given_back.loc[resolved, PROBABILITY].to_numpy(float), moved),
        old.loc[resolved, LOGIT].to_numpy(float),
        atol=1e-2,
    )

"""Site versions after production moves: each ``production-site-*`` re-judged on its site's labels.

A site's own version was judged against the version the site had then. When production is
promoted or rolled back, that judgement no longer says anything about the version the site
would otherwise get; left alone, the site would stay on old weights for good. So every site
version is judged again, on the site's labeled requests, against the new production:

- **Same weights** (production is the version the site's was recalibrated from, or shares its
  weights): the logged probabilities give back every logit, and the paired gate of
  :mod:`~cxr_platform.calibration.paired` judges the site's threshold against production's.
- **Other weights**: only requests both versions scored (one served, the other in shadow) can
  be compared; their decisions are compared paired (Newcombe), specificity superior and
  sensitivity within the margin.

Kept if shown still better, retired otherwise (the site falls back to production, and may be
recalibrated on production's own scores); each a registry event that says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cxr_platform.calibration.paired import judge, paired_difference
from cxr_platform.calibration.refit import logits_from_probabilities
from cxr_platform.calibration.site import (
    reference_positive_logits,
    site_labeled_records,
    study_groups,
)
from cxr_platform.calibration.site_point import calls, logit_threshold
from cxr_platform.deployment.registry import (
    PRODUCTION,
    ModelRegistry,
    RegistryEvent,
    registry_for,
)
from cxr_platform.model_version.files import ONNX_FILE, read_onnx_metadata
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.sections import MonitoringSection, RegistrySection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteRejudgement:
    site: str
    version: str
    production: str
    kept: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    event: RegistryEvent | None = None

    def summary(self) -> str:
        what = "kept" if self.kept else "retired (the site is served by production)"
        return (
            f"site {self.site}: version {self.version} {what} against production version "
            f"{self.production}: {self.reason}"
        )


def weights_of(registry: ModelRegistry, version: str) -> str:
    """The version whose weights ``version`` carries (recalibrations keep their source's)."""
    seen = set()
    while version not in seen:
        seen.add(version)
        source = registry.get(version).release.recalibrated_from
        if not source:
            return version
        version = str(source)
    return version


def _point(registry: ModelRegistry, version: str) -> OperatingPoint:
    return read_onnx_metadata(registry.download(version) / ONNX_FILE).calibration


def _logits_for(
    rows: pd.DataFrame, registry: ModelRegistry, weights: str, points: dict[str, OperatingPoint]
) -> np.ndarray:
    """Each row's logit under ``weights`` where one of the versions that scored it (served or
    shadow) carries them; NaN elsewhere."""
    logits = np.full(len(rows), np.nan)
    for column, probability in (
        ("model_version", "probability"),
        ("shadow_version", "shadow_probability"),
    ):
        for version in rows[column].dropna().astype(str).unique():
            if weights_of(registry, version) != weights:
                continue
            if version not in points:
                points[version] = _point(registry, version)
            mine = (rows[column].astype(str) == version).to_numpy() & np.isnan(logits)
            logits[mine] = logits_from_probabilities(
                rows.loc[mine, probability].to_numpy(dtype=float), points[version]
            )
    return logits


def rejudge_site(
    monitoring: MonitoringSection,
    registry: ModelRegistry,
    site: str,
    version: str,
    production: str,
    *,
    target_sensitivity: float,
) -> tuple[bool, str, dict[str, Any]]:
    """(keep, why, evidence) for one site version against production."""
    rows = site_labeled_records(monitoring.inference_log_uri, site)
    if rows.empty:
        return False, f"site {site} has no labeled requests to judge it on", {}
    labels = (rows["feedback_label"] == "PNEUMONIA").to_numpy(dtype=int)
    points: dict[str, OperatingPoint] = {}
    site_point, production_point = _point(registry, version), _point(registry, production)
    site_weights, production_weights = (
        weights_of(registry, version),
        weights_of(registry, production),
    )
    site_logits = _logits_for(rows, registry, site_weights, points)
    if site_weights == production_weights:
        usable = ~np.isnan(site_logits)
        if usable.sum() == 0 or labels[usable].min() == labels[usable].max():
            return False, "no labeled requests of both classes scored by these weights", {}
        folder = registry.download(production)
        judgement = judge(
            labels[usable],
            site_logits[usable],
            reference_positive_logits(folder, production_point, production),
            candidate_threshold=logit_threshold(site_point),
            current_threshold=logit_threshold(production_point),
            target_sensitivity=target_sensitivity,
            margin=monitoring.recalibration_margin,
            min_specificity_gain=monitoring.recalibration_min_specificity_gain,
            groups=study_groups(rows)[usable],
            candidate_calls=calls(site_point, site_logits[usable]),
            current_calls=calls(production_point, site_logits[usable]),
        )
        evidence = {"same_weights": True, "labels": int(usable.sum()), **judgement.to_dict()}
        why = f"same weights; paired on {int(usable.sum())} labels: {judgement.verdict}" + (
            f" ({'; '.join(judgement.reasons)})" if judgement.reasons else ""
        )
        return judgement.passed, why, evidence
    production_logits = _logits_for(rows, registry, production_weights, points)
    both = ~np.isnan(site_logits) & ~np.isnan(production_logits)
    if both.sum() == 0:
        return (
            False,
            f"no labeled request of site {site} was scored by both (production version "
            f"{production} has other weights and never scored this site beside it); recalibrate "
            "the site once production's own scores of it are labeled",
            {"same_weights": False, "paired_labels": 0},
        )
    site_calls = calls(site_point, site_logits[both])
    production_calls = calls(production_point, production_logits[both])
    truth = labels[both].astype(bool)
    studies = study_groups(rows)[both]
    specificity = paired_difference(
        ~site_calls[~truth],
        ~production_calls[~truth],
        studies=len(np.unique(studies[~truth])),
    )
    sensitivity = paired_difference(
        site_calls[truth], production_calls[truth], studies=len(np.unique(studies[truth]))
    )
    margin = monitoring.recalibration_margin
    min_gain = monitoring.recalibration_min_specificity_gain
    keep = specificity.low >= min_gain and sensitivity.low >= -margin
    evidence = {
        "same_weights": False,
        "paired_labels": int(both.sum()),
        "specificity": specificity.to_dict(),
        "sensitivity": sensitivity.to_dict(),
    }
    why = (
        f"paired on {int(both.sum())} labels both scored: specificity "
        f"{specificity.difference:+.3f} (lower {specificity.low:+.3f}, at least {min_gain:g} "
        f"wanted), sensitivity "
        f"{sensitivity.difference:+.3f} (lower {sensitivity.low:+.3f}, margin {margin:g}); "
        + ("still better" if keep else "not shown better")
    )
    return keep, why, evidence


def rejudge_site_versions(
    monitoring: MonitoringSection,
    registry_settings: RegistrySection,
    *,
    target_sensitivity: float,
    triggered_by: str,
) -> list[SiteRejudgement]:
    """Every site's own version judged against production as it is now, once per production
    version (a repeated call after the same move does nothing)."""
    registry = registry_for(registry_settings)
    production = registry.aliases().get(PRODUCTION)
    if production is None:
        return []
    settled = {
        (event.details.get("site"), event.version)
        for event in registry.events()
        if event.action in ("site_kept", "site_retired") and event.previous_version == production
    }
    outcomes = []
    for site, version in sorted(registry.site_productions().items()):
        if (site, version) in settled:
            continue
        if registry.get(version).release.recalibrated_from == production:
            # Made from this very production version (a rollback to it), and judged against it.
            keep, why, evidence = True, f"recalibrated from version {production} itself", {}
        else:
            keep, why, evidence = rejudge_site(
                monitoring,
                registry,
                site,
                version,
                production,
                target_sensitivity=target_sensitivity,
            )
        event = registry.settle_site(
            site,
            keep=keep,
            production=production,
            triggered_by=triggered_by,
            evidence={"reason": why, "evidence": evidence},
        )
        outcome = SiteRejudgement(site, version, production, keep, why, evidence, event)
        log.info(outcome.summary())
        outcomes.append(outcome)
    return outcomes

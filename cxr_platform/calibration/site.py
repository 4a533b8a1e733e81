"""A site's own operating point, from its labeled live requests, through shadow and the gate.

1. The site's labeled requests scored by the version it is served by are split by study: one
   part refits the operating point (:func:`~cxr_platform.calibration.refit.recalibrate`),
   the other is held out for the gate.
2. The refit is registered as a new version with the same weights (tags name the source
   version, the site, its prevalence and the labels used) and put in shadow.
3. The gate judges it on the held-out labels against the version the site has now: the usual
   floors, sensitivity not shown below the target (its 95% upper bound reaches it), and, where
   the current version already met the target, specificity at least as good. A pass makes it
   that site's production (``production-site-<name>``); every other site keeps ``production``.
   A refusal retires the shadow. Either way the decision is a registry event.

No model runs here: the weights are unchanged, so the logged probabilities and the version's
own calibration give back every logit.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from cxr_platform.calibration.prevalence import (
    PrevalenceEstimate,
    estimate_prevalence,
    prior_adjusted,
)
from cxr_platform.calibration.recalibrated_version import write_recalibrated
from cxr_platform.calibration.refit import (
    NotEnoughLabelsError,
    Recalibration,
    logits_from_probabilities,
    minimum_positives,
    recalibrate,
)
from cxr_platform.deployment.gate import GateCheck, GateDecision, decide, score_predictions
from cxr_platform.deployment.pipeline import gate_config_for
from cxr_platform.deployment.reference import PROBABILITY, load_reference
from cxr_platform.deployment.registry import ModelRegistry, ModelVersionInfo, registry_for
from cxr_platform.errors import CxrError
from cxr_platform.inference.log import InferenceLog
from cxr_platform.model_version.aliases import PRODUCTION, SHADOW, site_production_alias
from cxr_platform.model_version.files import ONNX_FILE, read_onnx_metadata
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.models.evaluation import cluster_bootstrap_intervals
from cxr_platform.sections import MonitoringSection, RegistrySection

log = logging.getLogger(__name__)

# What a new threshold changes; everything else about the version (AUC, calibration error of
# the ranking) is the source's.
_THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv")


class SiteRecalibrationError(CxrError):
    pass


@dataclass(frozen=True)
class SiteRecalibrationResult:
    site: str
    source_version: str
    candidate_version: str
    decision: GateDecision
    alias: str
    recalibration: Recalibration | None = None  # refitted on the site's labels
    prevalence: PrevalenceEstimate | None = None  # or moved to its estimated prevalence

    @property
    def promoted(self) -> bool:
        return self.decision.passed

    def summary(self) -> str:
        verdict = (
            f"site {self.site} is now served by version {self.candidate_version} ({self.alias})"
            if self.promoted
            else f"refused, version {self.candidate_version} retired: "
            + ", ".join(self.decision.failed_checks)
        )
        if self.recalibration is not None:
            r = self.recalibration
            how = (
                f"recalibrated on {r.n_positive} PNEUMONIA and {r.n_negative} NORMAL labels of "
                f"site {self.site}; threshold {r.operating_point.threshold:.4f} holds "
                f"sensitivity >= {r.operating_point.target_sensitivity:g} at its 95% lower "
                f"bound ({r.sensitivity_lower_bound:.3f}) at a specificity cost of "
                f"{r.specificity_cost:.3f} over the point estimate; gate on the held-out labels"
            )
        else:
            assert self.prevalence is not None
            how = (
                f"calibration moved to site {self.site}'s prevalence estimated from "
                f"{self.prevalence.n} unlabeled requests ({self.prevalence.prevalence:.3f}, "
                f"calibrated under {self.prevalence.training_prevalence:.3f}); gate on the "
                "site's labels"
            )
        return (
            f"version {self.candidate_version}: version {self.source_version} {how}: "
            f"{self.decision.summary()}; {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "source_version": self.source_version,
            "candidate_version": self.candidate_version,
            "promoted": self.promoted,
            "alias": self.alias,
            "recalibration": None if self.recalibration is None else self.recalibration.to_dict(),
            "prevalence": None if self.prevalence is None else asdict(self.prevalence),
            "gate": self.decision.to_dict(),
        }


def site_labeled_records(log_url: str, site: str, version: str) -> pd.DataFrame:
    inference_log = InferenceLog(log_url)
    try:
        rows = inference_log.records(site=site, labeled_only=True)
    finally:
        inference_log.dispose()
    return rows[rows["model_version"].astype(str) == version].reset_index(drop=True)


def study_groups(rows: pd.DataFrame) -> np.ndarray:
    """Each row's study; a row without one (PNG traffic) is its own."""
    studies = rows["study_uid_hash"] if "study_uid_hash" in rows else pd.Series(None, rows.index)
    return studies.fillna("request:" + rows["request_id"].astype(str)).to_numpy(dtype=str)


def split_by_study(
    groups: np.ndarray, labels: np.ndarray, held_out_share: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, held out): whole studies, drawn per class so both parts hold both."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for label in (0, 1):
        studies = np.unique(groups[labels == label])
        rng.shuffle(studies)
        chosen = set(studies[: int(round(held_out_share * len(studies)))])
        held += [i for i in np.flatnonzero(labels == label) if groups[i] in chosen]
    held_out = np.array(sorted(held), dtype=int)
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def _upper(successes: int, trials: int) -> float:
    return float(binomtest(successes, trials).proportion_ci(0.95, "wilson").high)


def held_out_intervals(
    labels: np.ndarray, scores: np.ndarray, called: np.ndarray, groups: np.ndarray
) -> dict[str, tuple[float | None, float | None]]:
    """95% intervals of the held-out figures, resampling whole studies."""
    return cluster_bootstrap_intervals(
        labels, scores, called.astype(float), 0.5, groups, n_bootstrap=1000, seed=0
    )


def site_checks(
    labels: np.ndarray,
    candidate_called: np.ndarray,
    current_called: np.ndarray,
    target: float,
    grouped_upper: float | None = None,
) -> list[GateCheck]:
    """``grouped_upper``: the candidate sensitivity's study-resampled upper bound; the wider
    of it and Wilson's is used, as the drift rule does."""
    positives, negatives = labels == 1, labels == 0
    detected = int(candidate_called[positives].sum())
    upper = max(_upper(detected, int(positives.sum())), grouped_upper or 0.0)
    checks = [GateCheck("site_sensitivity_not_below_target", upper >= target, upper, target)]
    current_upper = _upper(int(current_called[positives].sum()), int(positives.sum()))
    if current_upper >= target:
        # The current version may already hold the target here: the candidate must then earn
        # its place in specificity.
        candidate_specificity = float((~candidate_called[negatives]).mean())
        current_specificity = float((~current_called[negatives]).mean())
        checks.append(
            GateCheck(
                "site_specificity_vs_current",
                candidate_specificity >= current_specificity,
                candidate_specificity,
                current_specificity,
            )
        )
    return checks


def _served_version(registry: ModelRegistry, site: str) -> str | None:
    aliases = registry.aliases()
    return aliases.get(site_production_alias(site)) or aliases.get(PRODUCTION)


def missing_labels(
    monitoring: MonitoringSection,
    registry: ModelRegistry,
    site: str,
    target_sensitivity: float,
    *,
    seed: int = 0,
) -> dict[str, int]:
    """How many more labels of each class the site's refit part lacks (all zero: enough)."""
    version = _served_version(registry, site)
    needed = {
        "PNEUMONIA": minimum_positives(target_sensitivity),
        "NORMAL": monitoring.recalibration_min_negatives,
    }
    if version is None:
        return needed
    rows = site_labeled_records(monitoring.inference_log_uri, site, version)
    if rows.empty:
        return needed
    labels = (rows["feedback_label"] == "PNEUMONIA").to_numpy(dtype=int)
    groups = study_groups(rows)
    fit, _ = split_by_study(groups, labels, monitoring.recalibration_held_out_share, seed)
    have = {
        "PNEUMONIA": len(set(groups[fit][labels[fit] == 1])),
        "NORMAL": int((labels[fit] == 0).sum()),
    }
    return {name: max(0, needed[name] - have[name]) for name in needed}


def recalibration_refused(registry: ModelRegistry, site: str) -> bool:
    """Whether a recalibration of the version the site is served by now was refused before:
    the gate would see the same labels fail again; a fine-tune is the next step."""
    source = _served_version(registry, site)
    for event in registry.events():
        if event.action != "refused":
            continue
        release = registry.get(event.version).release
        if release.site == site and release.recalibrated_from == source:
            return True
    return False


def recalibrate_for_site(
    monitoring: MonitoringSection,
    registry_settings: RegistrySection,
    site: str,
    *,
    target_sensitivity: float,
    triggered_by: str,
    seed: int = 0,
) -> SiteRecalibrationResult:
    """Refit, register, shadow, gate, and promote for the site or retire. Raises
    :class:`~cxr_platform.calibration.refit.NotEnoughLabelsError` (with how many more
    labels of each class) and :class:`SiteRecalibrationError` for what cannot be done now."""
    registry = registry_for(registry_settings)
    alias = site_production_alias(site)
    aliases = registry.aliases()
    source_version = _served_version(registry, site)
    if source_version is None:
        raise SiteRecalibrationError("no production model to recalibrate")
    if aliases.get(SHADOW) is not None:
        raise SiteRecalibrationError(
            f"version {aliases[SHADOW]} is in shadow already; one candidate at a time"
        )
    source = registry.get(source_version)
    rows = site_labeled_records(monitoring.inference_log_uri, site, source.version)
    if rows.empty:
        raise NotEnoughLabelsError(
            f"site {site} has no labeled requests scored by version {source.version}",
            {"PNEUMONIA": 0, "NORMAL": 0},
        )
    folder = registry.download(source.version)
    current_point = read_onnx_metadata(folder / ONNX_FILE).calibration
    labels = (rows["feedback_label"] == "PNEUMONIA").to_numpy(dtype=int)
    logits = logits_from_probabilities(rows["probability"].to_numpy(dtype=float), current_point)
    groups = study_groups(rows)
    fit, held_out = split_by_study(groups, labels, monitoring.recalibration_held_out_share, seed)
    target = target_sensitivity
    try:
        recalibration = recalibrate(
            labels[fit],
            logits[fit],
            target_sensitivity=target,
            groups=groups[fit],
            min_negatives=monitoring.recalibration_min_negatives,
        )
    except NotEnoughLabelsError as exc:
        # Say it in labels of the whole site: the held-out part is drawn from the same pool.
        share = 1 - monitoring.recalibration_held_out_share
        missing = {name: int(np.ceil(count / share)) for name, count in exc.missing.items()}
        raise NotEnoughLabelsError(
            f"site {site}: {exc} (in the {share:.0%} used for the refit; about "
            + ", ".join(f"{n} more {name}" for name, n in missing.items() if n)
            + " labeled requests in all)",
            missing,
        ) from exc
    held_labels = labels[held_out]
    if held_labels.min() == held_labels.max():
        raise NotEnoughLabelsError(
            f"site {site}: the held-out part needs both classes", {"PNEUMONIA": 1, "NORMAL": 1}
        )
    point = recalibration.operating_point
    candidate_probabilities = point.probabilities(logits[held_out])
    candidate_called = candidate_probabilities >= point.threshold
    current_called = (rows["label"] == "PNEUMONIA").to_numpy()[held_out]
    held_metrics = {
        "test_sensitivity": float(candidate_called[held_labels == 1].mean()),
        "test_specificity": float((~candidate_called[held_labels == 0]).mean()),
    }
    metrics = {
        key: value
        for key, value in source.metrics.items()
        if not any(key.startswith(f"test_{name}") for name in _THRESHOLD_METRICS)
    }
    metrics.update(held_metrics)
    candidate = _register_in_shadow(
        registry,
        monitoring,
        source,
        folder,
        point,
        metrics,
        VersionTags(
            site_prevalence=float(labels.mean()),
            site_labels={
                "fit": {"PNEUMONIA": recalibration.n_positive, "NORMAL": recalibration.n_negative},
                "held_out": {
                    "PNEUMONIA": int(held_labels.sum()),
                    "NORMAL": int((held_labels == 0).sum()),
                },
                "studies": len(np.unique(groups)),
            },
        ),
        site=site,
        triggered_by=triggered_by,
    )
    candidate_score = score_predictions(
        held_labels, candidate_probabilities, point.threshold, version=candidate.version
    )
    current_score = score_predictions(
        held_labels,
        rows["probability"].to_numpy(dtype=float)[held_out],
        current_point.threshold,
        version=source.version,
    )
    held_groups = groups[held_out]
    intervals = {
        name: held_out_intervals(held_labels, logits[held_out], called, held_groups)
        for name, called in (("candidate", candidate_called), ("current", current_called))
    }
    decision = decide(
        candidate_score,
        current_score,
        gate_config_for(registry_settings),
        evaluated_on={
            "site": site,
            "held_out_labels": int(len(held_out)),
            "held_out_studies": int(len(np.unique(held_groups))),
            "grouped_by": "study",
            "intervals_95": {
                name: {metric: list(bounds) for metric, bounds in values.items()}
                for name, values in intervals.items()
            },
            "recalibration": recalibration.to_dict(),
        },
        extra_checks=site_checks(
            held_labels,
            candidate_called,
            current_called,
            target,
            intervals["candidate"]["sensitivity"][1],
        ),
    )
    _settle(registry, candidate.version, site, decision, triggered_by)
    result = SiteRecalibrationResult(
        site, source.version, candidate.version, decision, alias, recalibration=recalibration
    )
    log.info(result.summary())
    return result


def _register_in_shadow(
    registry: ModelRegistry,
    monitoring: MonitoringSection,
    source: ModelVersionInfo,
    folder: Path,
    point: OperatingPoint,
    metrics: dict[str, float],
    evidence: VersionTags,
    *,
    site: str,
    triggered_by: str,
) -> ModelVersionInfo:
    """The source's files with ``point`` inside, as a new version in shadow."""
    release = source.release
    tags = (
        VersionTags(**{name: getattr(release, name) for name in _RELEASE_FIELDS}, metrics=metrics)
        .updated(
            VersionTags(
                threshold=point.threshold,
                threshold_rule=point.rule,
                calibration=f"T={point.temperature:.4f} b={point.bias:+.4f}",
                recalibrated_from=source.version,
                site=site,
            )
        )
        .updated(evidence)
    )
    with tempfile.TemporaryDirectory(dir=monitoring.home) as work:
        model_dir = Path(work) / "model"
        write_recalibrated(folder, model_dir, point, metrics)
        candidate = registry.register_folder(
            model_dir,
            run_id=str(source.run_id),
            tags=tags,
            triggered_by=triggered_by,
            description=f"version {source.version} with an operating point for site {site}",
        )
    registry.set_shadow(candidate.version, triggered_by=triggered_by)
    return candidate


def _settle(
    registry: ModelRegistry, version: str, site: str, decision: GateDecision, triggered_by: str
) -> None:
    if decision.passed:
        registry.promote_for_site(version, site, triggered_by=triggered_by, gate=decision.to_dict())
    else:
        registry.retire_shadow(version, triggered_by=triggered_by, gate=decision.to_dict())


PRIOR_MIN_RECORDS = 100  # unlabeled requests an EM estimate of a site's prevalence needs
BRIER_TOLERANCE = 0.002  # a prior that barely moves may move the Brier score either way


def prior_adjust_for_site(
    monitoring: MonitoringSection,
    registry_settings: RegistrySection,
    site: str,
    *,
    triggered_by: str,
) -> SiteRecalibrationResult:
    """The label-free candidate: the calibration moved to the site's pneumonia prevalence
    estimated from its unlabeled traffic (EM). Decisions do not change under the
    sensitivity-target rule; reported probabilities (and so PPV and NPV) do. It goes through
    shadow and the same gate, judged on whatever labels the site has given (none used to make
    it); with none, there is nothing to judge it on and it is not made."""
    registry = registry_for(registry_settings)
    source_version = _served_version(registry, site)
    if source_version is None:
        raise SiteRecalibrationError("no production model to adjust")
    shadow = registry.aliases().get(SHADOW)
    if shadow is not None:
        raise SiteRecalibrationError(f"version {shadow} is in shadow already; one at a time")
    source = registry.get(source_version)
    inference_log = InferenceLog(monitoring.inference_log_uri)
    try:
        rows = inference_log.records(site=site)
    finally:
        inference_log.dispose()
    rows = rows[rows["model_version"].astype(str) == source.version].reset_index(drop=True)
    if len(rows) < PRIOR_MIN_RECORDS:
        raise NotEnoughLabelsError(
            f"site {site} has {len(rows)} requests scored by version {source.version}; an "
            f"estimate of its prevalence needs {PRIOR_MIN_RECORDS}",
            {"PNEUMONIA": 0, "NORMAL": 0},
        )
    labeled = rows[rows["feedback_label"].notna()]
    truth = (labeled["feedback_label"] == "PNEUMONIA").to_numpy(dtype=int)
    if len(set(truth.tolist())) < 2:
        raise NotEnoughLabelsError(
            f"site {site}: a prior-adjusted candidate is judged on the site's labels, and "
            "there are none of both classes yet",
            {"PNEUMONIA": int(not truth.any()), "NORMAL": int(truth.all() or not len(truth))},
        )
    folder = registry.download(source.version)
    reference = load_reference(folder)
    validation = reference[reference[PROBABILITY].notna()] if reference is not None else None
    if validation is None or validation.empty:
        raise SiteRecalibrationError(
            f"version {source.version} has no drift reference: the prevalence its calibration "
            "was fitted under is unknown"
        )
    training_prevalence = float((validation["label"] == "PNEUMONIA").mean())
    estimate = estimate_prevalence(rows["probability"].to_numpy(dtype=float), training_prevalence)
    if not estimate.converged:
        raise SiteRecalibrationError(f"the EM estimate for site {site} did not converge")
    current_point = read_onnx_metadata(folder / ONNX_FILE).calibration
    point = prior_adjusted(current_point, training_prevalence, estimate.prevalence)
    logits = logits_from_probabilities(labeled["probability"].to_numpy(dtype=float), current_point)
    candidate_probabilities = point.probabilities(logits)
    candidate_called = candidate_probabilities >= point.threshold
    current_called = (labeled["label"] == "PNEUMONIA").to_numpy()
    metrics = dict(source.metrics)
    candidate = _register_in_shadow(
        registry,
        monitoring,
        source,
        folder,
        point,
        metrics,
        VersionTags(
            site_prevalence=estimate.prevalence,
            site_labels={"estimated_from_unlabeled": estimate.n, "judged_on": len(labeled)},
        ),
        site=site,
        triggered_by=triggered_by,
    )
    current_probabilities = labeled["probability"].to_numpy(dtype=float)
    brier = {
        "candidate": float(np.mean((candidate_probabilities - truth) ** 2)),
        "current": float(np.mean((current_probabilities - truth) ** 2)),
    }
    unchanged = float(np.mean(candidate_called == current_called))
    decision = decide(
        score_predictions(
            truth, candidate_probabilities, point.threshold, version=candidate.version
        ),
        score_predictions(
            truth, current_probabilities, current_point.threshold, version=source.version
        ),
        gate_config_for(registry_settings),
        evaluated_on={
            "site": site,
            "labels": len(labeled),
            "estimated_prevalence": estimate.prevalence,
            "labeled_prevalence": float(truth.mean()),
            "brier_candidate": brier["candidate"],
            "brier_current": brier["current"],
        },
        # What the candidate is for: the same calls, with probabilities that mean what they say
        # at this site (the Brier score may not be worse beyond a rounding-sized tolerance).
        extra_checks=[
            GateCheck("site_calls_unchanged", unchanged == 1.0, unchanged, 1.0),
            GateCheck(
                "site_brier_vs_current",
                brier["candidate"] <= brier["current"] + BRIER_TOLERANCE,
                brier["candidate"],
                brier["current"] + BRIER_TOLERANCE,
            ),
        ],
    )
    _settle(registry, candidate.version, site, decision, triggered_by)
    result = SiteRecalibrationResult(
        site,
        source.version,
        candidate.version,
        decision,
        site_production_alias(site),
        prevalence=estimate,
    )
    log.info(result.summary())
    return result


# What a recalibrated version inherits from its source (release facts, not life events).
_RELEASE_FIELDS = (
    "model_name",
    "arch",
    "threshold",
    "threshold_rule",
    "calibration",
    "preprocessing",
    "data_version",
    "data_dir",
    "git_commit",
    "parity_onnx_max_abs_diff",
    "parity_torchscript_max_abs_diff",
    "int8",
    "int8_val_auc_change",
    "finetuned_from",
    "finetune_reason",
    "labeled_examples",
    "input_gate",
)

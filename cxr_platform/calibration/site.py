"""A site's own operating point, from its labeled live requests, through shadow and the gate.

1. The site's labeled requests scored by the version it is served by propose a threshold and
   judge it paired against that version (:mod:`~cxr_platform.calibration.paired`,
   :func:`~cxr_platform.calibration.site_point.site_operating_point`): the positives, with the
   validation split's moved by their shift where the site's lower tail does not contradict
   them, say where the site's sensitivity lies; the negatives, which the proposal never reads,
   what it buys.
2. The candidate is registered as a new version with the same weights (tags name the source
   version, the site, its prevalence and the labels used), its drift reference the site's own
   rows, and put in shadow.
3. The gate decides: the usual floors, and the paired checks (for a higher threshold the
   sensitivity claim, the site's own positives, and a specificity gain worth a new version;
   for a lower one the current threshold shown below the target and the same claim). A pass
   makes it that site's production (``production-site-<name>``); every other site keeps
   ``production``. A refusal retires the shadow and says how many more labels would decide.
   Either way the decision is a registry event.

No model runs here: the weights are unchanged, so the logged probabilities and the version's
own calibration give back every logit.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_platform.calibration.paired import SAME, ReferencePositives
from cxr_platform.calibration.prevalence import (
    PrevalenceEstimate,
    estimate_prevalence,
    prior_adjusted,
)
from cxr_platform.calibration.recalibrated_version import write_recalibrated
from cxr_platform.calibration.refit import (
    NotEnoughLabelsError,
    logits_from_probabilities,
    reference_logits,
)
from cxr_platform.calibration.site_point import (
    MIN_POSITIVE_STUDIES,
    SiteEvidence,
    calls,
    labels_missing,
    require_labels,
    site_operating_point,
)
from cxr_platform.deployment.gate import GateCheck, GateDecision, decide, score_predictions
from cxr_platform.deployment.pipeline import gate_config_for
from cxr_platform.deployment.reference import (
    ACQUISITION_FEATURES,
    CASE,
    CONTENT_FEATURES,
    PREDICTED,
    PROBABILITY,
    SOURCE_FORMAT,
    SPLIT,
    load_reference,
    write_reference,
)
from cxr_platform.deployment.registry import ModelRegistry, ModelVersionInfo, registry_for
from cxr_platform.errors import CxrError
from cxr_platform.inference.log import InferenceLog
from cxr_platform.model_version.aliases import PRODUCTION, SHADOW, site_production_alias
from cxr_platform.model_version.files import ONNX_FILE, read_onnx_metadata
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.sections import MonitoringSection, RegistrySection

log = logging.getLogger(__name__)

# What a new threshold changes; everything else about the version (AUC, calibration error of
# the ranking) is the source's.
_THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv")


class SiteRecalibrationError(CxrError):
    pass


class NoBetterThresholdError(SiteRecalibrationError):
    """The site's labels show no threshold other than the current one to be safe and better."""

    def __init__(self, message: str, labels_to_decide: dict[str, int] | None) -> None:
        super().__init__(message)
        self.labels_to_decide = labels_to_decide


@dataclass(frozen=True)
class SiteRecalibrationResult:
    site: str
    source_version: str
    candidate_version: str
    decision: GateDecision
    alias: str
    evidence: SiteEvidence | None = None  # proposed and judged on the site's labels
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
        if self.evidence is not None:
            how = describe_evidence(self.site, self.evidence)
            needed = self.evidence.labels_to_decide
            if not self.promoted and needed:
                verdict += "; " + labels_to_decide_text(needed)
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
            "evidence": None if self.evidence is None else self.evidence.to_dict(),
            "prevalence": None if self.prevalence is None else asdict(self.prevalence),
            "gate": self.decision.to_dict(),
        }


def labels_to_decide_text(needed: dict[str, int]) -> str:
    return (
        "about "
        + " and ".join(f"{count} more {name}" for name, count in needed.items() if count)
        + " labels at the same rates would decide"
    )


def no_threshold_text(version: str, evidence: SiteEvidence) -> str:
    """Why the current threshold stays, never calling it safe where it is shown short."""
    current = evidence.proposal.current_expected_sensitivity
    if evidence.proposal.current_shown_below_target:
        return (
            f"version {version} detects at most {current.high:.3f} here, shown below the "
            f"target, and no lower threshold is shown to restore it"
        )
    return f"no threshold other than version {version}'s is shown better here"


def describe_evidence(site: str, evidence: SiteEvidence) -> str:
    proposal, judgement = evidence.proposal, evidence.judgement
    low_sens, high_sens = judgement.candidate_sensitivity[1:]
    gain = judgement.specificity
    tail = proposal.shift.tail
    return (
        f"with a threshold proposed for site {site} from {evidence.n_positive} PNEUMONIA labels "
        f"({evidence.n_positive_studies} studies; sensitivity from the "
        f"{proposal.sensitivity_from}: {tail.missed_now} studies missed now where the shift "
        f"predicts {tail.expected_missed_now:.1f}, lower-tail scan p = {tail.p_value:.3f}) and "
        f"judged on them and {evidence.n_negative} NORMAL labels: expected sensitivity "
        f"{judgement.candidate_sensitivity[0]:.3f} ({low_sens:.3f}-{high_sens:.3f}) against "
        f"{judgement.current_sensitivity[0]:.3f} now, specificity {gain.difference:+.3f} "
        f"({gain.low:+.3f} to {gain.high:+.3f})"
    )


def site_labeled_records(log_url: str, site: str, version: str | None = None) -> pd.DataFrame:
    """The site's labeled rows (of ``version`` only, when given)."""
    inference_log = InferenceLog(log_url)
    try:
        rows = inference_log.records(site=site, labeled_only=True)
    finally:
        inference_log.dispose()
    if version is None:
        return rows.reset_index(drop=True)
    return rows[rows["model_version"].astype(str) == version].reset_index(drop=True)


def study_groups(rows: pd.DataFrame) -> np.ndarray:
    """Each row's study; a row without one (PNG traffic) is its own."""
    studies = rows["study_uid_hash"] if "study_uid_hash" in rows else pd.Series(None, rows.index)
    return studies.fillna("request:" + rows["request_id"].astype(str)).to_numpy(dtype=str)


def reference_positive_logits(
    folder: Path, point: OperatingPoint, version: str
) -> ReferencePositives:
    """The validation positives' logits, from the drift reference stored with the version, and
    how many patients they are (a reference made before it kept them counts images)."""
    reference = load_reference(folder)
    scored = reference[reference[PROBABILITY].notna()] if reference is not None else None
    if scored is None or not (scored["label"] == "PNEUMONIA").any():
        raise SiteRecalibrationError(
            f"version {version} has no drift reference with scored positives: how a pneumonia "
            "case scores is unknown; export and register it again"
        )
    positives = scored[scored["label"] == "PNEUMONIA"]
    logits = reference_logits(positives, point)
    cases = (
        positives[CASE].nunique()
        if CASE in positives and positives[CASE].notna().all()
        else len(positives)
    )
    return ReferencePositives(logits, int(cases))


def _served_version(registry: ModelRegistry, site: str) -> str | None:
    aliases = registry.aliases()
    return aliases.get(site_production_alias(site)) or aliases.get(PRODUCTION)


def missing_labels(
    monitoring: MonitoringSection, registry: ModelRegistry, site: str
) -> dict[str, int]:
    """How many more labels of each class the site needs before a threshold can be proposed
    (all zero: enough)."""
    version = _served_version(registry, site)
    if version is None:
        return {"PNEUMONIA": MIN_POSITIVE_STUDIES, "NORMAL": monitoring.recalibration_min_negatives}
    rows = site_labeled_records(monitoring.inference_log_uri, site, version)
    labels = (rows["feedback_label"] == "PNEUMONIA").to_numpy(dtype=int)
    return labels_missing(labels, study_groups(rows), monitoring.recalibration_min_negatives)


def recalibration_refused(
    monitoring: MonitoringSection, registry: ModelRegistry, site: str
) -> bool:
    """Whether a recalibration of the version the site is served by now was refused on the
    labels it has now: the gate would see the same labels fail again. New labels since (a
    refusal for want of evidence says how many would decide) allow another try."""
    source = _served_version(registry, site)
    labeled = None
    for event in registry.events():
        if event.action != "refused":
            continue
        release = registry.get(event.version).release
        if release.site != site or release.recalibrated_from != source:
            continue
        if labeled is None:
            labeled = len(site_labeled_records(monitoring.inference_log_uri, site, source))
        # The version's tags say how many labels it was judged on (an event's details may be
        # cut short when the gate's evidence is long).
        used = release.site_labels or {}
        judged_on = int(used.get("PNEUMONIA", 0)) + int(used.get("NORMAL", 0))
        if not judged_on or labeled <= judged_on:
            return True
    return False


def recalibrate_for_site(
    monitoring: MonitoringSection,
    registry_settings: RegistrySection,
    site: str,
    *,
    target_sensitivity: float,
    triggered_by: str,
) -> SiteRecalibrationResult:
    """Propose, register, shadow, gate, and promote for the site or retire. Raises
    :class:`~cxr_platform.calibration.refit.NotEnoughLabelsError` (with how many more labels
    of each class), :class:`NoBetterThresholdError` when the labels show no threshold but the
    current one to be safe, and :class:`SiteRecalibrationError` for what cannot be done now."""
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
            {"PNEUMONIA": MIN_POSITIVE_STUDIES, "NORMAL": monitoring.recalibration_min_negatives},
        )
    folder = registry.download(source.version)
    current_point = read_onnx_metadata(folder / ONNX_FILE).calibration
    labels = (rows["feedback_label"] == "PNEUMONIA").to_numpy(dtype=int)
    logits = logits_from_probabilities(rows["probability"].to_numpy(dtype=float), current_point)
    groups = study_groups(rows)
    current_called = (rows["label"] == "PNEUMONIA").to_numpy()
    try:
        # Labels first: what the site can do about it, before what the version lacks.
        require_labels(labels, groups, monitoring.recalibration_min_negatives)
        evidence = site_operating_point(
            labels,
            logits,
            groups,
            reference_positive_logits(folder, current_point, source.version),
            current_point,
            target_sensitivity=target_sensitivity,
            margin=monitoring.recalibration_margin,
            min_negatives=monitoring.recalibration_min_negatives,
            min_specificity_gain=monitoring.recalibration_min_specificity_gain,
            current_calls=current_called,
        )
    except NotEnoughLabelsError as exc:
        raise NotEnoughLabelsError(f"site {site}: {exc}", exc.missing) from exc
    if evidence.proposal.direction == SAME:
        needed = evidence.labels_to_decide
        raise NoBetterThresholdError(
            f"site {site}: {no_threshold_text(source.version, evidence)} "
            f"({describe_evidence(site, evidence)}); "
            + (
                labels_to_decide_text(needed)
                if needed
                else "the site's labels put the threshold where it is"
            ),
            needed,
        )
    point = evidence.operating_point
    candidate_called = calls(point, logits)
    site_metrics = {
        "test_sensitivity": float(candidate_called[labels == 1].mean()),
        "test_specificity": float((~candidate_called[labels == 0]).mean()),
    }
    metrics = {
        key: value
        for key, value in source.metrics.items()
        if not any(key.startswith(f"test_{name}") for name in _THRESHOLD_METRICS)
    }
    metrics.update(site_metrics)
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
                "PNEUMONIA": evidence.n_positive,
                "NORMAL": evidence.n_negative,
                "studies": len(np.unique(groups)),
            },
        ),
        site=site,
        triggered_by=triggered_by,
        site_reference=site_reference(monitoring, site, source.version, current_point, point),
    )
    probabilities = rows["probability"].to_numpy(dtype=float)
    current_score = score_predictions(
        labels, probabilities, current_point.threshold, version=source.version
    )
    config = gate_config_for(registry_settings)
    evaluated_on: dict[str, Any] = {
        "site": site,
        "labels": int(len(rows)),
        "studies": int(len(np.unique(groups))),
        "grouped_by": "study",
        "paired": evidence.to_dict(),
    }
    if current_score.specificity < config.min_specificity:
        # The site's version is below the deployment's specificity floor already: refusing a
        # better operating point for missing that floor would only keep the worse one. The
        # candidate must beat the current one instead, and the shortfall is recorded.
        evaluated_on["specificity_floor_not_met_by_current"] = {
            "floor": config.min_specificity,
            "current": current_score.specificity,
        }
        config = replace(config, min_specificity=current_score.specificity)
    decision = decide(
        score_predictions(
            labels, point.probabilities(logits), point.threshold, version=candidate.version
        ),
        current_score,
        config,
        evaluated_on=evaluated_on,
        extra_checks=paired_checks(evidence),
    )
    _settle(registry, candidate.version, site, decision, triggered_by, source.version)
    result = SiteRecalibrationResult(
        site, source.version, candidate.version, decision, alias, evidence=evidence
    )
    log.info(result.summary())
    return result


def paired_checks(evidence: SiteEvidence) -> list[GateCheck]:
    """The paired judgement's checks as gate checks."""
    return [
        GateCheck(check.name, check.passed, check.value, check.limit)
        for check in evidence.judgement.checks
    ]


def site_reference(
    monitoring: MonitoringSection,
    site: str,
    version: str,
    current: OperatingPoint,
    candidate: OperatingPoint,
) -> pd.DataFrame:
    """The site's rows scored by ``version`` as the candidate's drift reference: its labeled
    rows with their probabilities under the candidate's calibration, the rest as features only.
    A site version is monitored against the site it was judged on, not the training site."""
    inference_log = InferenceLog(monitoring.inference_log_uri)
    try:
        rows = inference_log.records(site=site)
    finally:
        inference_log.dispose()
    rows = rows[rows["model_version"].astype(str) == version].reset_index(drop=True)
    columns = [c for c in (*CONTENT_FEATURES, *ACQUISITION_FEATURES) if c in rows]
    frame = rows[columns].astype(float)
    frame[SOURCE_FORMAT] = rows.get(SOURCE_FORMAT)
    frame["photometric_interpretation"] = rows.get("photometric_interpretation")
    labeled = rows["feedback_label"].notna().to_numpy()
    logits = logits_from_probabilities(rows["probability"].to_numpy(dtype=float), current)
    probabilities = candidate.probabilities(logits)
    frame[PROBABILITY] = np.where(labeled, probabilities, np.nan)
    frame[PREDICTED] = np.where(
        labeled, np.where(probabilities >= candidate.threshold, "PNEUMONIA", "NORMAL"), None
    )
    frame["label"] = rows["feedback_label"].where(labeled, None)
    frame[SPLIT] = np.where(labeled, "val", "site")
    return frame


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
    site_reference: pd.DataFrame | None = None,
) -> ModelVersionInfo:
    """The source's files with ``point`` inside, as a new version in shadow; with
    ``site_reference``, that as its drift reference."""
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
        if site_reference is not None:
            write_reference(model_dir, site_reference)
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
    registry: ModelRegistry,
    version: str,
    site: str,
    decision: GateDecision,
    triggered_by: str,
    replacing: str,
) -> None:
    if decision.passed:
        # If the site's version moved while the gate compared, this raises and moves nothing.
        registry.promote_for_site(
            version, site, triggered_by=triggered_by, gate=decision.to_dict(), replacing=replacing
        )
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
    _settle(registry, candidate.version, site, decision, triggered_by, source.version)
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

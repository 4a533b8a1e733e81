"""Shadow evaluation: the candidate against production, then the promotion gate decides.

Evidence, all recorded with the decision:

- the held-out test split, both models at their own operating thresholds (the registry gate's
  floors and allowed AUC drop);
- live traffic the shadow scored that later got a feedback label: both models' AUC on the same
  requests (a gate check once ``shadow_min_labeled`` labels with both classes exist);
- the agreement rate between the two on every live request the shadow scored (reported; after
  drift a better candidate is expected to disagree, so it is not a gate).

On success ``production`` moves (the service follows the alias) and the replaced version stays
as ``previous-production``; on refusal the shadow alias is removed so the service stops scoring
it. Either way the decision is a registry event and a JSON file under the reports folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_platform.calibration.site_follow import SiteRejudgement, rejudge_site_versions
from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.deployment import pipeline as deployment
from cxr_platform.deployment.gate import GateCheck, GateDecision
from cxr_platform.deployment.registry import PRODUCTION, SHADOW, RegistryEvent
from cxr_platform.errors import CxrError
from cxr_platform.inference.log import InferenceLog
from cxr_platform.sections import MonitoringSection, RegistrySection


class ShadowEvaluationError(CxrError):
    pass


@dataclass(frozen=True)
class LiveComparison:
    n_scored: int  # live requests both models scored
    agreement_rate: float | None
    n_labeled: int
    n_labeled_positive: int
    candidate_auc: float | None
    production_auc: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def live_comparison(
    log: InferenceLog, candidate_version: str, production_version: str | None
) -> LiveComparison:
    rows = log.records(shadow_version=candidate_version)
    if production_version is not None:
        rows = rows[rows["model_version"] == production_version]
    rows = rows[rows["shadow_probability"].notna()]
    agreement = float((rows["label"] == rows["shadow_label"]).mean()) if len(rows) else None
    labeled = rows[rows["feedback_label"].notna()]
    truth = (labeled["feedback_label"] == "PNEUMONIA").to_numpy()
    candidate_auc = production_auc = None
    if len(labeled) and 0 < truth.sum() < len(truth):
        candidate_auc = float(roc_auc_score(truth, labeled["shadow_probability"].to_numpy()))
        production_auc = float(roc_auc_score(truth, labeled["probability"].to_numpy()))
    return LiveComparison(
        n_scored=len(rows),
        agreement_rate=agreement,
        n_labeled=len(labeled),
        n_labeled_positive=int(np.sum(truth)),
        candidate_auc=candidate_auc,
        production_auc=production_auc,
    )


def live_checks(live: LiveComparison, *, min_labeled: int, max_auc_drop: float) -> list[GateCheck]:
    if live.candidate_auc is None or live.production_auc is None or live.n_labeled < min_labeled:
        return []
    limit = live.production_auc - max_auc_drop
    return [
        GateCheck(
            "live_auc_vs_production", live.candidate_auc >= limit - 1e-12, live.candidate_auc, limit
        )
    ]


@dataclass(frozen=True)
class ShadowOutcome:
    candidate: str
    production_before: str | None
    decision: GateDecision
    live: LiveComparison
    event: RegistryEvent
    record_path: Path
    site_versions: tuple[SiteRejudgement, ...] = ()  # re-judged after a promotion

    @property
    def promoted(self) -> bool:
        return self.event.action == "promoted"

    def summary(self) -> str:
        verdict = "promoted" if self.promoted else "refused"
        return f"shadow v{self.candidate} {verdict}: {self.decision.summary()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "production_before": self.production_before,
            "promoted": self.promoted,
            "decision": self.decision.to_dict(),
            "live": self.live.to_dict(),
            "event": self.event.to_dict(),
            "site_versions": [
                {"site": r.site, "version": r.version, "kept": r.kept, "reason": r.reason}
                for r in self.site_versions
            ],
        }


def evaluate_shadow(
    monitoring: MonitoringSection,
    registry_settings: RegistrySection,
    cache: PreprocessedCache,
    *,
    triggered_by: str,
    target_sensitivity: float = 0.95,
) -> ShadowOutcome:
    registry = deployment.registry_for(registry_settings)
    candidate = registry.find(SHADOW)
    if candidate is None:
        raise ShadowEvaluationError("there is no shadow model to evaluate")
    production = registry.find(PRODUCTION)
    log = InferenceLog(monitoring.inference_log_uri)
    try:
        live = live_comparison(log, candidate.version, production.version if production else None)
    finally:
        log.dispose()
    decision = deployment.run_gate(
        registry_settings,
        cache,
        candidate.version,
        extra_checks=live_checks(
            live,
            min_labeled=monitoring.shadow_min_labeled,
            max_auc_drop=registry_settings.max_auc_drop,
        ),
        extra_evidence={"live_shadow_traffic": live.to_dict()},
    )
    if decision.passed:
        # If another promoter moved production meanwhile, this raises rather than promote on
        # a comparison with a version the candidate would not replace.
        event = registry.promote(
            candidate.version,
            triggered_by=triggered_by,
            gate=decision.to_dict(),
            replacing=decision.evaluated_on["production_version"],
        )
        sites = rejudge_site_versions(
            monitoring,
            registry_settings,
            target_sensitivity=target_sensitivity,
            triggered_by=triggered_by,
        )
    else:
        sites = []
        event = registry.retire_shadow(
            candidate.version, triggered_by=triggered_by, gate=decision.to_dict()
        )
    folder = monitoring.reports_dir / "shadow_evaluations"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    outcome = ShadowOutcome(
        candidate=candidate.version,
        production_before=production.version if production else None,
        decision=decision,
        live=live,
        event=event,
        record_path=folder / f"v{candidate.version}-{stamp}.json",
        site_versions=tuple(sites),
    )
    outcome.record_path.write_text(json.dumps(outcome.to_dict(), indent=2) + "\n")
    return outcome

"""Drift windows over the inference log, and the decisions the monitoring sensors make.

A window is named by what it covers, so its name is also its Dagster partition key:
``ids-000000101-000000300`` (log rows 101..300, what the drift sensor cuts) or
``day-2026-11-26`` (one UTC day, the daily report). The sensors' logic lives here as plain
functions of the monitoring section, the registry and a cursor; the Dagster sensors only
translate the result.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, timedelta

import pandas as pd

from cxr_platform.calibration.label_free import SiteLabels
from cxr_platform.calibration.refit import logits_from_probabilities
from cxr_platform.deployment.reference import load_reference
from cxr_platform.deployment.registry import (
    PRODUCTION,
    SHADOW,
    ModelRegistry,
    ModelVersionNotFoundError,
)
from cxr_platform.errors import CxrError
from cxr_platform.inference.log import LIVE_SOURCES, InferenceLog
from cxr_platform.model_version.files import ONNX_FILE, read_onnx_metadata
from cxr_platform.model_version.intended_use import OUTSIDE_INTENDED_USE
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.monitoring.drift import (
    UNNAMED_SITE,
    DriftResult,
    DriftRule,
    evaluate_window,
)
from cxr_platform.sections import MonitoringSection

_IDS = re.compile(r"^ids-(\d{9})-(\d{9})$")
_DAY = re.compile(r"^day-(\d{4}-\d{2}-\d{2})$")


class WindowError(CxrError):
    pass


class NoReferenceError(WindowError):
    """The model version was exported before drift monitoring: it carries no reference."""


def ids_window(first_id: int, last_id: int) -> str:
    return f"ids-{first_id:09d}-{last_id:09d}"


def day_window(day: date) -> str:
    return f"day-{day.isoformat()}"


def window_records(log: InferenceLog, key: str, *, site: str | None = None) -> pd.DataFrame:
    """A window's rows; with ``site``, only that site's."""
    if match := _IDS.match(key):
        first, last = int(match.group(1)), int(match.group(2))
        return log.records(since_id=first - 1, until_id=last, site=site, sources=LIVE_SOURCES)
    if match := _DAY.match(key):
        start = datetime.combine(date.fromisoformat(match.group(1)), datetime.min.time(), UTC)
        return log.records(
            created_from=start,
            created_before=start + timedelta(days=1),
            site=site,
            sources=LIVE_SOURCES,
        )
    raise WindowError(f"{key!r} is not a drift window (ids-<first>-<last> or day-<YYYY-MM-DD>)")


def read_window(
    monitoring: MonitoringSection, key: str, *, site: str | None = None
) -> pd.DataFrame:
    """A window's rows from the deployment's inference log (opened and closed here)."""
    log = InferenceLog(monitoring.inference_log_uri)
    try:
        return window_records(log, key, site=site)
    finally:
        log.dispose()


def drift_rule(monitoring: MonitoringSection) -> DriftRule:
    return DriftRule(
        feature_p_value=monitoring.drift_feature_p_value,
        input_drift_share=monitoring.drift_input_share,
        severe_p_value=monitoring.drift_severe_p_value,
        prediction_p_value=monitoring.drift_prediction_p_value,
        positive_rate_change=monitoring.drift_positive_rate_change,
        min_labeled=monitoring.drift_min_labeled,
        max_auc_drop=monitoring.drift_max_auc_drop,
        max_sensitivity_drop=monitoring.drift_max_sensitivity_drop,
        max_specificity_drop=monitoring.drift_max_specificity_drop,
        max_refusal_rate=monitoring.drift_max_refusal_rate,
    )


@dataclass(frozen=True)
class WindowJudgement:
    """Each model version's rows in a window judged against that version's own reference, most
    rows first; versions that could not be judged, with why."""

    results: tuple[DriftResult, ...]
    skipped: dict[str, str]

    @property
    def primary(self) -> DriftResult:
        return self.results[0]

    def for_version(self, version: str) -> DriftResult | None:
        return next((r for r in self.results if r.model_version == version), None)


def check_window_versions(
    monitoring: MonitoringSection,
    key: str,
    registry: ModelRegistry,
    *,
    records: pd.DataFrame | None = None,
    site: str | None = None,
) -> WindowJudgement:
    """Every version that scored rows of the window, each against its own reference: a window
    that spans a promotion, or holds a site's own version beside production, judges each.
    ``records``: the window's rows when the caller has just read them; ``site``: only that
    site's. Raises :class:`WindowError` when no version can be judged."""
    if records is None:
        records = read_window(monitoring, key, site=site)
    if records.empty:
        where = f" from site {site}" if site is not None else ""
        raise WindowError(f"window {key} holds no inference records{where}")
    counts = Counter(records["model_version"].dropna().astype(str)).most_common()
    if not counts:
        raise WindowError(f"window {key} has no records with a model version")
    refused = refusals_during(monitoring, records, site=site)
    results, skipped = [], {}
    for version, _ in counts:
        rows = records[records["model_version"].astype(str) == version]
        mine = refused[refused["model_version"].astype(str) == version]
        try:
            results.append(_judge_version(monitoring, key, registry, version, rows, mine))
        except WindowError as exc:
            skipped[version] = str(exc)
    if not results:
        raise WindowError("; ".join(skipped.values()))
    return WindowJudgement(tuple(results), skipped)


def check_window(
    monitoring: MonitoringSection,
    key: str,
    registry: ModelRegistry,
    *,
    records: pd.DataFrame | None = None,
    site: str | None = None,
) -> DriftResult:
    """The window's rows of the version that scored most of it, against its reference (see
    :func:`check_window_versions` for every version's)."""
    return check_window_versions(monitoring, key, registry, records=records, site=site).primary


def _judge_version(
    monitoring: MonitoringSection,
    key: str,
    registry: ModelRegistry,
    model_version: str,
    records: pd.DataFrame,
    refused: pd.DataFrame,
) -> DriftResult:
    try:
        info = registry.get(model_version)
    except ModelVersionNotFoundError as exc:
        raise WindowError(f"window {key} was scored by version {model_version}: {exc}") from exc
    outside = refused[refused["reason"] == OUTSIDE_INTENDED_USE]
    gate = refused[refused["reason"] != OUTSIDE_INTENDED_USE]
    folder = registry.download(model_version)
    reference = load_reference(folder)
    if reference is None:
        raise NoReferenceError(
            f"version {model_version} has no drift reference (exported before drift "
            "monitoring); export and register the model again"
        )
    point = read_onnx_metadata(folder / ONNX_FILE).calibration
    return evaluate_window(
        reference,
        records,
        window=key,
        rule=drift_rule(monitoring),
        model_version=model_version,
        expected_metrics=info.metrics,
        n_refused=len(gate),
        refused_by_site=gate["site"].fillna(UNNAMED_SITE).value_counts().to_dict(),
        n_outside_intended_use=len(outside),
        outside_by_site=outside["site"].fillna(UNNAMED_SITE).value_counts().to_dict(),
        operating_point=point,
        site_labels=site_labels_for(monitoring, records, model_version, point),
    )


def site_labels_for(
    monitoring: MonitoringSection, records: pd.DataFrame, version: str, point: OperatingPoint
) -> dict[str, SiteLabels]:
    """Each named site's labeled rows scored by ``version``, from any time and any source (a
    silent trial's labels too): what lets a window's label-free estimates stop assuming the
    version's calibration holds at that site."""
    sites = sorted(set(records["site"].dropna().astype(str))) if "site" in records else []
    found: dict[str, SiteLabels] = {}
    if not sites:
        return found
    log = InferenceLog(monitoring.inference_log_uri)
    try:
        for site in sites:
            rows = log.records(site=site, labeled_only=True)
            rows = rows[rows["model_version"].astype(str) == version]
            if rows.empty:
                continue
            found[site] = SiteLabels(
                logits=logits_from_probabilities(rows["probability"].to_numpy(float), point),
                labels=(rows["feedback_label"] == "PNEUMONIA").to_numpy(dtype=int),
                called=(rows["label"] == "PNEUMONIA").to_numpy(),
            )
    finally:
        log.dispose()
    return found


def refusals_during(
    monitoring: MonitoringSection, records: pd.DataFrame, *, site: str | None = None
) -> pd.DataFrame:
    """Images refused between a window's first and last record (of ``site``): by the input
    gate, or as outside the version's intended use (``reason``)."""
    created = pd.to_datetime(records["created_at"], utc=True)
    log = InferenceLog(monitoring.inference_log_uri)
    try:
        return log.refusals(
            created_from=created.min().to_pydatetime(),
            created_before=created.max().to_pydatetime() + timedelta(microseconds=1),
            site=site,
            sources=LIVE_SOURCES,
        )
    finally:
        log.dispose()


@dataclass(frozen=True)
class DriftCursor:
    """The drift sensor's position in the log and its memory of fine-tune requests.

    On PostgreSQL a row's id is drawn when it is inserted and becomes visible when its
    transaction commits, so ids can appear out of order: row 101 may still be in flight when
    102..300 are readable. A window is never cut past a missing id until the missing id has had
    the grace period to commit; after that it is taken as a rolled-back insert. ``gap_horizon``
    is the highest id read when missing ids were first seen, ``gap_seen_at`` when (epoch
    seconds): every id missing below the horizon was already numbered at that moment.
    """

    last_id: int = 0
    windows: int = 0
    finetune_window: int | None = None  # value of ``windows`` when fine-tune was last requested
    finetune_production: str | None = None  # the production version it was requested for
    gap_horizon: int | None = None
    gap_seen_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> DriftCursor:
        return cls(**json.loads(text)) if text else cls()


@dataclass(frozen=True)
class DriftStep:
    cursor: DriftCursor
    skip_reason: str | None = None
    window: str | None = None
    result: DriftResult | None = None
    request_finetune: bool = False
    finetune_note: str = ""
    recalibrate_site: str | None = None  # a site to recalibrate for, tried before a fine-tune
    # Every version judged in the window (``result`` is production's where it served some).
    results: tuple[DriftResult, ...] = ()
    version_notes: dict[str, str] = field(default_factory=dict)

    @property
    def fired(self) -> bool:
        return any(result.fired for result in self.results or (self.result,) if result)


def _first_missing_id(ids: pd.Series, after: int) -> int | None:
    """The lowest id above ``after`` that ``ids`` (ascending) skips, if any."""
    expected = pd.RangeIndex(after + 1, after + 1 + len(ids))
    skipped = ids.to_numpy() != expected.to_numpy()
    return int(expected[skipped.argmax()]) if skipped.any() else None


def _settled(
    cursor: DriftCursor, ids: pd.Series, grace_seconds: float, now: float
) -> tuple[bool, DriftCursor, str]:
    """Whether every id missing below the window's last row has had the grace period to commit;
    the cursor carries when missing ids were first seen."""
    missing = _first_missing_id(ids, cursor.last_id)
    if missing is None:
        return True, replace(cursor, gap_horizon=None, gap_seen_at=None), ""
    last = int(ids.iloc[-1])
    horizon, seen_at = cursor.gap_horizon, cursor.gap_seen_at
    if horizon is None or seen_at is None or last > horizon:
        # Ids missing above an earlier horizon may have been numbered since: a fresh wait.
        horizon, seen_at = last, now
    waiting = replace(cursor, gap_horizon=horizon, gap_seen_at=seen_at)
    if now - seen_at >= grace_seconds:
        return True, waiting, ""
    return (
        False,
        waiting,
        f"log row {missing} is numbered but not committed; the window waits up to "
        f"{grace_seconds:g} s for it (rows up to {last} are readable)",
    )


@dataclass(frozen=True)
class WindowCut:
    """The next window's rows, or why there is none yet; ``cursor`` keeps what was learnt about
    missing ids either way."""

    cursor: DriftCursor
    rows: pd.DataFrame | None = None
    skip_reason: str | None = None

    @property
    def key(self) -> str:
        assert self.rows is not None
        return ids_window(int(self.rows["id"].iloc[0]), int(self.rows["id"].iloc[-1]))

    @property
    def advanced(self) -> DriftCursor:
        """The cursor past this window."""
        assert self.rows is not None
        return replace(
            self.cursor,
            last_id=int(self.rows["id"].iloc[-1]),
            windows=self.cursor.windows + 1,
            gap_horizon=None,
            gap_seen_at=None,
        )


def cut_window(
    log: InferenceLog, cursor: DriftCursor, *, size: int, grace_seconds: float, now: float
) -> WindowCut:
    """The next ``size`` rows after the cursor, once no row below them can still commit."""
    waiting = log.count(since_id=cursor.last_id, sources=LIVE_SOURCES)
    if waiting < size:
        return WindowCut(
            cursor,
            skip_reason=f"{waiting} new inference records after id {cursor.last_id}; "
            f"a drift window needs {size}",
        )
    # A silent trial's rows are numbered among the traffic's: not missing, only not ours. The
    # ids are read before the rows, so a row committing between the two reads is in the rows
    # (never skipped) or in neither (a gap, waited for).
    committed = log.ids(since_id=cursor.last_id)
    rows = log.records(since_id=cursor.last_id, limit=size, sources=LIVE_SOURCES)
    last = int(rows["id"].iloc[-1])
    numbered = pd.Series(sorted({*committed[committed <= last], *rows["id"]}), dtype="int64")
    settled, cursor, waiting_for = _settled(cursor, numbered, grace_seconds, now)
    if not settled:
        return WindowCut(cursor, skip_reason=waiting_for)
    return WindowCut(cursor, rows=rows)


def drift_sensor_step(
    monitoring: MonitoringSection,
    registry: ModelRegistry,
    cursor: DriftCursor,
    *,
    target_sensitivity: float = 0.95,
    now: float | None = None,
) -> DriftStep:
    """One evaluation of the drift sensor: cut the next full window, judge it, and say whether
    a site's recalibration or the fine-tune job should run. The cursor only advances past a
    window that was judged, and a window is not cut past a row that may still commit
    (``now``: epoch seconds, for tests)."""
    production = registry.find(PRODUCTION)
    if production is None:
        return DriftStep(cursor, skip_reason="no production model: nothing to monitor")
    log = InferenceLog(monitoring.inference_log_uri)
    try:
        cut = cut_window(
            log,
            cursor,
            size=monitoring.drift_window_size,
            grace_seconds=monitoring.drift_commit_grace_seconds,
            now=time.time() if now is None else now,
        )
        if cut.rows is None:
            return DriftStep(cut.cursor, skip_reason=cut.skip_reason)
        rows, key, advanced = cut.rows, cut.key, cut.advanced
        try:
            judged = check_window_versions(monitoring, key, registry, records=rows)
        except WindowError as exc:
            # Judging it again would fail the same way: skip it, say why, move on.
            return DriftStep(advanced, skip_reason=f"window {key} skipped: {exc}", window=key)
    finally:
        log.dispose()
    served_at = {version: site for site, version in registry.site_productions().items()}
    notes = dict(judged.skipped)
    recalibrate = None
    for result in judged.results:
        version = str(result.model_version)
        if version == production.version:
            continue
        if version in served_at:
            site = served_at[version]
            if not result.fired:
                notes[version] = f"site {site}'s own version: no drift"
            elif recalibrate is None and result.model_drift:
                if registry.find(SHADOW) is not None:
                    notes[version] = (
                        f"site {site}'s own version drifted; a shadow candidate is waiting, so "
                        "no recalibration now (one candidate at a time)"
                    )
                    continue
                recalibrate = _site_to_recalibrate(monitoring, registry, result, target_sensitivity)
                notes[version] = f"site {site}'s own version drifted: " + (
                    "its recalibration is requested"
                    if recalibrate
                    else "no recalibration possible yet (labels, or refused on these labels)"
                )
            else:
                notes[version] = f"site {site}'s own version: " + result.summary()
        else:
            notes[version] = f"version {version} no longer serves any site: not acted on"
    result = judged.for_version(production.version) or judged.primary
    base = DriftStep(
        advanced,
        window=key,
        result=result,
        results=judged.results,
        version_notes=notes,
        recalibrate_site=recalibrate,
    )
    if result.model_version != production.version:
        note = f"no rows of production version {production.version} in this window: " + (
            "; ".join(f"{v}: {n}" for v, n in notes.items()) or "nothing to act on"
        )
        return replace(base, finetune_note=note)
    if not result.fired:
        return replace(base, finetune_note="no drift")
    if not result.model_drift:
        note = (
            "only refusals fired (not chest radiographs, or patients outside the intended "
            "use): check the routing; a fine-tune would not help"
        )
        return replace(base, finetune_note=note)
    if registry.find(SHADOW) is not None:
        note = "a shadow candidate is already waiting for evaluation; no second fine-tune"
        return replace(base, finetune_note=note, recalibrate_site=None)
    site = recalibrate or _site_to_recalibrate(monitoring, registry, result, target_sensitivity)
    if site is not None:
        note = (
            f"site {site} failed on its own labels: its recalibration is tried before a fine-tune"
        )
        return replace(base, finetune_note=note, recalibrate_site=site)
    if (
        cursor.finetune_production == production.version
        and cursor.finetune_window is not None
        and advanced.windows - cursor.finetune_window < monitoring.finetune_cooldown_windows
    ):
        note = (
            f"fine-tune for version {production.version} already requested "
            f"{advanced.windows - cursor.finetune_window} window(s) ago (cool-down "
            f"{monitoring.finetune_cooldown_windows})"
        )
        return replace(base, finetune_note=note)
    requested = replace(
        advanced, finetune_window=advanced.windows, finetune_production=production.version
    )
    return replace(
        base,
        cursor=requested,
        request_finetune=True,
        finetune_note=f"fine-tune of production version {production.version} requested",
    )


def _site_to_recalibrate(
    monitoring: MonitoringSection,
    registry: ModelRegistry,
    result: DriftResult,
    target_sensitivity: float,
) -> str | None:
    """The first site whose sensitivity or specificity failed, that has labels enough to refit
    its operating point, and whose recalibration of the version it is served by was not refused
    before. A failed AUC alone is the ranking's: a threshold cannot mend it."""
    from cxr_platform.calibration.site import missing_labels, recalibration_refused

    for site, failed in result.failed_sites.items():
        if site == UNNAMED_SITE or not set(failed) & {"sensitivity", "specificity"}:
            continue
        if recalibration_refused(monitoring, registry, site):
            continue
        if not any(missing_labels(monitoring, registry, site).values()):
            return site
    return None


@dataclass(frozen=True)
class ShadowStep:
    evaluated_version: str | None  # the cursor: the last shadow version sent for evaluation
    skip_reason: str | None = None
    candidate: str | None = None


def shadow_sensor_step(
    monitoring: MonitoringSection, registry: ModelRegistry, evaluated_version: str | None
) -> ShadowStep:
    """Ask for a shadow evaluation once the shadow has scored enough live traffic."""
    shadow = registry.find(SHADOW)
    if shadow is None:
        return ShadowStep(evaluated_version, skip_reason="no shadow model")
    if shadow.version == evaluated_version:
        return ShadowStep(
            evaluated_version, skip_reason=f"shadow version {shadow.version} already evaluated"
        )
    log = InferenceLog(monitoring.inference_log_uri)
    try:
        scored = log.count(shadow_version=shadow.version)
    finally:
        log.dispose()
    if scored < monitoring.shadow_min_records:
        return ShadowStep(
            evaluated_version,
            skip_reason=f"shadow version {shadow.version} has scored {scored} live requests; "
            f"evaluation waits for {monitoring.shadow_min_records}",
        )
    return ShadowStep(shadow.version, candidate=shadow.version)


def previous_utc_day(now: datetime) -> date:
    return (now.astimezone(UTC) - timedelta(days=1)).date()

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
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime, timedelta

import pandas as pd

from cxr_platform.deployment.reference import load_reference
from cxr_platform.deployment.registry import (
    PRODUCTION,
    SHADOW,
    ModelRegistry,
    ModelVersionNotFoundError,
)
from cxr_platform.errors import CxrError
from cxr_platform.inference.log import LIVE_SOURCES, InferenceLog
from cxr_platform.model_version.intended_use import OUTSIDE_INTENDED_USE
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


def check_window(
    monitoring: MonitoringSection,
    key: str,
    registry: ModelRegistry,
    *,
    records: pd.DataFrame | None = None,
    site: str | None = None,
) -> DriftResult:
    """The window against the reference of the version that scored most of it. ``records``:
    the window's rows when the caller has just read them; ``site``: judge only that site's."""
    if records is None:
        records = read_window(monitoring, key, site=site)
    if records.empty:
        where = f" from site {site}" if site is not None else ""
        raise WindowError(f"window {key} holds no inference records{where}")
    version = Counter(records["model_version"].dropna().astype(str)).most_common(1)
    if not version:
        raise WindowError(f"window {key} has no records with a model version")
    model_version = version[0][0]
    try:
        info = registry.get(model_version)
    except ModelVersionNotFoundError as exc:
        raise WindowError(f"window {key} was scored by version {model_version}: {exc}") from exc
    refused = refusals_during(monitoring, records, site=site)
    outside = refused[refused["reason"] == OUTSIDE_INTENDED_USE]
    gate = refused[refused["reason"] != OUTSIDE_INTENDED_USE]
    reference = load_reference(registry.download(model_version))
    if reference is None:
        raise NoReferenceError(
            f"version {model_version} has no drift reference (exported before drift "
            "monitoring); export and register the model again"
        )
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
    )


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
            result = check_window(monitoring, key, registry, records=rows)
        except WindowError as exc:
            # Judging it again would fail the same way: skip it, say why, move on.
            return DriftStep(advanced, skip_reason=f"window {key} skipped: {exc}", window=key)
    finally:
        log.dispose()
    if not result.fired:
        return DriftStep(advanced, window=key, result=result, finetune_note="no drift")
    if not result.model_drift:
        note = (
            "only refusals fired (not chest radiographs, or patients outside the intended "
            "use): check the routing; a fine-tune would not help"
        )
        return DriftStep(advanced, window=key, result=result, finetune_note=note)
    if result.model_version != production.version:
        note = (
            f"drift on version {result.model_version}, but production is now "
            f"{production.version}: the new model gets its own windows"
        )
        return DriftStep(advanced, window=key, result=result, finetune_note=note)
    if registry.find(SHADOW) is not None:
        note = "a shadow candidate is already waiting for evaluation; no second fine-tune"
        return DriftStep(advanced, window=key, result=result, finetune_note=note)
    site = _site_to_recalibrate(monitoring, registry, result, target_sensitivity)
    if site is not None:
        note = (
            f"site {site} failed on its own labels: its recalibration is tried before a fine-tune"
        )
        return DriftStep(
            advanced, window=key, result=result, finetune_note=note, recalibrate_site=site
        )
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
        return DriftStep(advanced, window=key, result=result, finetune_note=note)
    requested = replace(
        advanced, finetune_window=advanced.windows, finetune_production=production.version
    )
    return DriftStep(
        requested,
        window=key,
        result=result,
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
        if recalibration_refused(registry, site):
            continue
        if not any(missing_labels(monitoring, registry, site, target_sensitivity).values()):
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

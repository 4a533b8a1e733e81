"""The daily drift report's schedule: yesterday's records become one partition, or a skip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import numpy as np

from cxr_platform.data.features import ImageFeatures, intensity_features
from cxr_platform.defs.definitions import build_definitions
from cxr_platform.defs.monitoring_assets import DAILY_SCHEDULE, DRIFT_WINDOWS
from cxr_platform.inference.log import InferenceLog, InferenceRecord
from cxr_platform.monitoring.windows import window_records
from cxr_platform.settings import load_settings


def _evaluate(defs, instance, when):
    schedule = defs.resolve_schedule_def(DAILY_SCHEDULE)
    with dg.build_schedule_context(
        instance=instance, scheduled_execution_time=when, resources=dict(defs.resources)
    ) as context:
        return schedule(context)


def test_daily_report_covers_yesterday_or_says_why_not(tmp_path):
    settings = load_settings(home=tmp_path / "home")
    defs = build_definitions(settings)
    # A persistent (temporary) instance: a schedule invoked directly reaches it by reference.
    (tmp_path / "dagster").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster"))
    now = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)

    quiet = _evaluate(defs, instance, now)
    assert isinstance(quiet, dg.SkipReason)
    assert quiet.skip_message == "no inference records in day-2026-11-25"

    log = InferenceLog(settings.monitoring.inference_log_uri)
    features = ImageFeatures(**intensity_features(np.full((8, 8), 90, np.uint8)))
    for hours, request_id in ((-31, "before-yesterday"), (-10, "late-yesterday"), (-2, "today")):
        log.write(
            [
                InferenceRecord(
                    request_id=request_id,
                    source="http",
                    model_name="m",
                    model_version="1",
                    probability=0.4,
                    label="NORMAL",
                    threshold=0.5,
                    features=features,
                    created_at=now + timedelta(hours=hours),
                )
            ]
        )
    request = _evaluate(defs, instance, now)
    assert isinstance(request, dg.RunRequest)
    assert request.partition_key == "day-2026-11-25"
    assert "day-2026-11-25" in instance.get_dynamic_partitions(DRIFT_WINDOWS.name)
    assert list(window_records(log, "day-2026-11-25")["request_id"]) == ["late-yesterday"]
    log.dispose()

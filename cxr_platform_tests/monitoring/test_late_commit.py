"""The drift sensor's cursor on a real PostgreSQL, where ids become visible out of order."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from dataclasses import replace

import numpy as np
import sqlalchemy as sa

from cxr_platform.data.features import ImageFeatures, intensity_features
from cxr_platform.inference.log import (
    SILENT_TRIAL,
    InferenceLog,
    InferenceRecord,
    predictions_table,
)
from cxr_platform.monitoring.windows import DriftCursor, cut_window, ids_window, window_records


def _record(request_id: str) -> InferenceRecord:
    pixels = np.full((8, 8), 128, dtype=np.uint8)
    return InferenceRecord(
        request_id=request_id,
        source="http",
        model_name="resnet18",
        model_version="1",
        probability=0.7,
        label="PNEUMONIA",
        threshold=0.5,
        features=ImageFeatures(**intensity_features(pixels), original_width=8, bit_depth=8),
    )


def test_a_row_that_commits_late_lands_in_its_window(postgres_database):
    log = InferenceLog(postgres_database)
    slow_writer = log.engine.connect()
    transaction = slow_writer.begin()
    slow_writer.execute(predictions_table.insert(), [_record("late").row()])  # numbered 1
    log.write([_record(f"on-time-{i}") for i in range(5)])  # 2..6, committed first

    cut = cut_window(log, DriftCursor(), size=5, grace_seconds=60, now=1000.0)
    # A cursor by id alone would cut 2..6 here and never look at row 1 again.
    assert cut.rows is None
    assert "row 1 is numbered but not committed" in cut.skip_reason
    assert (cut.cursor.gap_horizon, cut.cursor.gap_seen_at) == (6, 1000.0)

    transaction.commit()
    slow_writer.close()
    cut = cut_window(log, cut.cursor, size=5, grace_seconds=60, now=1010.0)
    assert cut.key == ids_window(1, 5)
    assert cut.rows["request_id"].tolist() == ["late"] + [f"on-time-{i}" for i in range(4)]
    after = cut_window(log, cut.advanced, size=1, grace_seconds=60, now=1011.0)
    assert after.rows["request_id"].tolist() == ["on-time-4"]
    log.dispose()


def test_a_rolled_back_insert_holds_the_window_only_for_the_grace_period(postgres_database):
    log = InferenceLog(postgres_database)
    with log.engine.connect() as failed_writer:
        transaction = failed_writer.begin()
        failed_writer.execute(predictions_table.insert(), [_record("rolled-back").row()])
        log.write([_record(f"kept-{i}") for i in range(5)])
        transaction.rollback()

    first = cut_window(log, DriftCursor(), size=5, grace_seconds=60, now=1000.0)
    within_grace = cut_window(log, first.cursor, size=5, grace_seconds=60, now=1059.0)
    assert first.rows is None and within_grace.rows is None
    past_grace = cut_window(log, within_grace.cursor, size=5, grace_seconds=60, now=1060.0)
    assert past_grace.key == ids_window(2, 6)
    assert past_grace.advanced.gap_horizon is None and past_grace.advanced.last_id == 6
    log.dispose()


def _slow_writer(url: str, prefix: str, count: int, seed: int) -> None:
    """Commits each row a random while after numbering it, as a busy scoring process might."""
    rng = random.Random(seed)
    log = InferenceLog(url)
    for index in range(count):
        with log.engine.begin() as connection:
            connection.execute(predictions_table.insert(), [_record(f"{prefix}-{index}").row()])
            time.sleep(rng.uniform(0, 0.05))
    log.dispose()


def test_several_writers_and_the_sensor_lose_and_repeat_nothing(postgres_database):
    """Two processes and two threads write with late commits while windows are cut: every row
    lands in exactly one window."""
    per_writer, size = 60, 20
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_slow_writer, args=(postgres_database, f"process{n}", per_writer, n))
        for n in range(2)
    ]
    threads = [
        threading.Thread(
            target=_slow_writer, args=(postgres_database, f"thread{n}", per_writer, 10 + n)
        )
        for n in range(2)
    ]
    for writer in (*processes, *threads):
        writer.start()

    log = InferenceLog(postgres_database)
    cursor, windows = DriftCursor(), []

    def cut_what_is_ready() -> None:
        nonlocal cursor
        while True:
            cut = cut_window(log, cursor, size=size, grace_seconds=1.0, now=time.time())
            cursor = cut.cursor
            if cut.rows is None:
                return
            windows.append(cut.rows["request_id"].tolist())
            cursor = cut.advanced

    while any(writer.is_alive() for writer in (*processes, *threads)):
        cut_what_is_ready()
        time.sleep(0.05)
    for process in processes:
        process.join()
        assert process.exitcode == 0
    for thread in threads:
        thread.join()
    cut_what_is_ready()

    windowed = [request for window in windows for request in window]
    assert len(windows) == 4 * per_writer // size
    assert len(windowed) == len(set(windowed)) == 4 * per_writer
    with log.engine.connect() as connection:
        stored = connection.execute(sa.select(sa.func.count()).select_from(predictions_table))
        assert stored.scalar_one() == 4 * per_writer
    log.dispose()


def test_a_silent_trial_between_live_requests_is_neither_traffic_nor_a_gap(tmp_path):
    """A trial's rows are numbered among the traffic's: windows leave them out, and do not wait
    for them as for rows not yet committed."""
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    log.write([_record("live-0"), _record("live-1")])
    log.write([replace(_record(f"trial-{i}"), source=SILENT_TRIAL) for i in range(3)])
    log.write([_record("live-2"), _record("live-3")])

    cut = cut_window(log, DriftCursor(), size=4, grace_seconds=60, now=1000.0)
    assert cut.rows is not None, cut.skip_reason
    assert cut.rows["request_id"].tolist() == [f"live-{i}" for i in range(4)]
    assert window_records(log, cut.key)["request_id"].tolist() == [f"live-{i}" for i in range(4)]
    assert cut_window(log, cut.advanced, size=1, grace_seconds=60, now=1001.0).rows is None
    assert len(log.records()) == 7  # the trial's rows are all there, for its report
    log.dispose()

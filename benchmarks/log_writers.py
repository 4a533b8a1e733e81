"""The inference log under several writers: SQLite (WAL, the embedded default) against a real
PostgreSQL, both started here.

Each writer process writes one row per transaction, as the service, the node and `cxr predict`
do for a single image, and all writers start together. Printed per store and writer count: rows
per second over the whole run, the ratio against SQLite with one writer measured in the same run,
the p99 of one write, and whether every row landed once.

    .venv/bin/python benchmarks/log_writers.py [--rows 400] [--writers 1,2,4,8]

PostgreSQL runs on the same machine with fsync off (as the tests run it): a shared server over a
network adds the round trip to every write, and a server with fsync on adds the flush.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_platform.data.features import ImageFeatures, intensity_features  # noqa: E402
from cxr_platform.inference.log import (  # noqa: E402
    InferenceLog,
    InferenceRecord,
    predictions_table,
)
from cxr_platform_tests.postgres import create_database, temporary_postgres  # noqa: E402

FEATURES = ImageFeatures(
    **intensity_features(np.full((8, 8), 128, dtype=np.uint8)), original_width=8, bit_depth=8
)


def _writer(url: str, prefix: str, rows: int, start: float, out) -> None:
    log = InferenceLog(url)
    while time.time() < start:
        time.sleep(0.001)
    latencies = []
    for index in range(rows):
        record = InferenceRecord(
            request_id=f"{prefix}-{index}",
            source="http",
            model_name="resnet18",
            model_version="1",
            probability=0.7,
            label="PNEUMONIA",
            threshold=0.5,
            features=FEATURES,
        )
        began = time.perf_counter()
        log.write([record])
        latencies.append(time.perf_counter() - began)
    log.dispose()
    out.put(latencies)


def run(url: str, writers: int, rows: int) -> dict[str, float]:
    InferenceLog(url).dispose()  # tables first, so creation is not timed
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start = time.time() + 2.0  # every process imported and connected before the clock starts
    processes = [
        context.Process(target=_writer, args=(url, f"w{n}", rows, start, queue))
        for n in range(writers)
    ]
    for process in processes:
        process.start()
    latencies = [value for _ in processes for value in queue.get()]
    for process in processes:
        process.join()
    wall = time.time() - start
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        stored = connection.execute(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(predictions_table.c.request_id)))
        ).one()
    engine.dispose()
    return {
        "rows_per_s": writers * rows / wall,
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "complete": stored[0] == stored[1] == writers * rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400, help="rows per writer")
    parser.add_argument("--writers", default="1,2,4,8")
    args = parser.parse_args()
    counts = [int(n) for n in args.writers.split(",")]
    base = Path(tempfile.mkdtemp(prefix="cxr-bench-log-"))
    results = []
    try:
        with temporary_postgres(base) as server:
            for writers in counts:
                sqlite_url = f"sqlite:///{base / f'log-{writers}.db'}"
                postgres = create_database(server, f"bench_{writers}")
                results.append(("sqlite", writers, run(sqlite_url, writers, args.rows)))
                results.append(("postgresql", writers, run(postgres, writers, args.rows)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    baseline = results[0][2]["rows_per_s"]
    print(f"{args.rows} single-row transactions per writer; baseline: SQLite, 1 writer")
    print("| store | writers | rows/s | vs baseline | p99 write (ms) | every row once |")
    print("| --- | --- | --- | --- | --- | --- |")
    for store, writers, figures in results:
        print(
            f"| {store} | {writers} | {figures['rows_per_s']:.0f} | "
            f"{figures['rows_per_s'] / baseline:.2f}x | {figures['p99_ms']:.1f} | "
            f"{'yes' if figures['complete'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()

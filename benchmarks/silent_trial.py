"""The silent trial: how fast a site's archive is pulled and scored, and whether its report
agrees with ``cxr evaluate``.

Throughput (``--n`` images): a real Orthanc with its DICOMweb plugin behind basic
authentication holds realistic CRs (12-bit, MONOCHROME1, detector-sized, built from synthetic
patients, one image per study) over ``--days`` study dates. Against the production model of
``CXR_HOME``, in one run:

  - retrieval alone: QIDO-RS and WADO-RS of every day, the instances read and dropped
    (the baseline: what the archive and the network cost);
  - the folder trial: the same files from disk, scored and logged (no network);
  - the archive trial: retrieval, scoring and logging, day by day (what a partition does);
  - the archive trial again: every image already scored (a retried partition).

Agreement (``--heldout-home``): the test split of a real-data home (its patient split) as a
folder the site exported, with its labels, through ``cxr silent-trial``; the report's figures
beside the evaluation report of the checkpoint the production version was exported from.

    CXR_HOME=<home> .venv/bin/python benchmarks/silent_trial.py [--n 100] [--days 2]
    .venv/bin/python benchmarks/silent_trial.py --heldout-home <real-data home> --skip-throughput
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# The Orthanc and DICOM fixtures live with the tests, beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_platform.calibration.site_trial import (  # noqa: E402
    archive_for,
    opened_trial,
    run_archive_day,
    run_folder,
)
from cxr_platform.calibration.trial_sources import TrialImage  # noqa: E402
from cxr_platform.data.sources import discover_images  # noqa: E402
from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset  # noqa: E402
from cxr_platform.ports import free_port  # noqa: E402
from cxr_platform.sections import sqlite_url  # noqa: E402
from cxr_platform.settings import load_settings  # noqa: E402
from cxr_platform_tests.orthanc import NodeAddress, OrthancProcess  # noqa: E402
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset  # noqa: E402

FIRST_DAY = date(2026, 2, 2)


def archive_images(n: int, days: int, rows: int, columns: int, work: Path) -> list[bytes]:
    root = generate_synthetic_dataset(
        work / "synthetic", SyntheticSpec(n_patients=max(4, n // 2 + 2), seed=4343), progress=False
    )
    paths = discover_images(root).records["path"].tolist()[:n]
    files = []
    for index, path in enumerate(paths):
        gray = Image.open(path).convert("L").resize((columns, rows), Image.Resampling.BILINEAR)
        spec = RadiographSpec(
            photometric="MONOCHROME1",
            patient_id=f"TRIAL-{index:04d}",
            accession_number=f"T{index:05d}",
        )
        dataset = radiograph_dataset(np.asarray(gray), spec)
        day = (FIRST_DAY + timedelta(days=index % days)).strftime("%Y%m%d")
        dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = day
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


def throughput(args: argparse.Namespace) -> None:
    settings = load_settings()
    work = Path(tempfile.mkdtemp(prefix="cxr-trial-bench-"))
    files = archive_images(args.n, args.days, args.rows, args.columns, work)
    folder = work / "export"
    folder.mkdir()
    for index, data in enumerate(files):
        (folder / f"{index:05d}.dcm").write_bytes(data)
    days = [FIRST_DAY + timedelta(days=d) for d in range(args.days)]
    user, password = "bench", "bench-pass"
    orthanc = OrthancProcess(
        work / "orthanc",
        NodeAddress("CXR_AI", "127.0.0.1", free_port()),
        routing=False,
        archive_users={user: password},
    ).start()
    try:
        for data in files:
            orthanc.upload(data)
        section = replace(
            settings.site_trial,
            home=work / "home",  # the trial's records and log here, the registry from CXR_HOME
            inference_log_url=sqlite_url(work / "log.db"),
            site_archive_url=f"{orthanc.url}/dicom-web",
            site_archive_auth="Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(),
        )
        archive = archive_for(section)

        started = time.perf_counter()
        studies = retrieved = 0
        for day in days:
            studies += len(archive.studies(day))
            retrieved += sum(isinstance(item, TrialImage) for item in archive.day(day))
        retrieval = time.perf_counter() - started

        with opened_trial(section, settings.registry, "bench-folder") as (trial, version):
            started = time.perf_counter()
            folder_summary = run_folder(trial, folder)
            from_folder = time.perf_counter() - started

        partitions = []
        with opened_trial(section, settings.registry, "bench-archive") as (trial, _):
            started = time.perf_counter()
            for day in days:
                begun = time.perf_counter()
                summary = run_archive_day(trial, archive, day)
                partitions.append((summary, time.perf_counter() - begun))
            from_archive = time.perf_counter() - started
            started = time.perf_counter()
            resumed = [run_archive_day(trial, archive, day) for day in days]
            again = time.perf_counter() - started
    finally:
        orthanc.stop()

    n = retrieved
    print(
        f"{platform.machine()}, {os.cpu_count()} cores; model {version.model_name} version "
        f"{version.version}; {n} images of {studies} studies ({args.rows}x{args.columns}, "
        f"12-bit CR) over {args.days} study dates"
    )
    scored = sum(s.scored for s, _ in partitions)
    refused = sum(s.refused for s, _ in partitions)
    print(f"archive trial: {scored} scored, {refused} refused; folder {folder_summary.scored}")
    print("| run | seconds | images/s | vs retrieval alone |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in (
        ("retrieval alone (QIDO-RS + WADO-RS)", retrieval),
        ("folder trial (disk, score, log)", from_folder),
        ("archive trial (retrieve, score, log)", from_archive),
        ("archive trial again (all already scored)", again),
    ):
        print(f"| {name} | {seconds:.2f} | {n / seconds:.1f} | {seconds / retrieval:.2f}x |")
    per_partition = [seconds for _, seconds in partitions]
    print(
        f"per partition ({n // args.days} images): {np.mean(per_partition):.2f} s; resumed "
        f"{sum(s.resumed for s in resumed)} of {n}"
    )


def heldout(home: Path) -> None:
    """The test split of a real-data home as an exported folder with labels, through the CLI."""
    splits = pd.read_csv(home / "splits" / "patient_splits.csv")
    test = splits[splits["split"] == "test"]
    work = Path(tempfile.mkdtemp(prefix="cxr-trial-heldout-"))
    folder = work / "export"
    labels = work / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for row in test.itertuples():
            target = folder / row.relative_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(row.path)
            writer.writerow([row.relative_path, row.label])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["CXR_HOME"] = str(home)
    site = f"heldout-{int(time.time())}"  # a fresh site: nothing resumed from an earlier run
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "cxr_platform.cli", "silent-trial", "--site", site, "--images",
         str(folder), "--labels", str(labels), "--json"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    report = json.loads(result.stdout)
    evaluation = next((home / "reports" / "evaluation").rglob("evaluation.json"))
    internal = json.loads(evaluation.read_text())["splits"]["test"]
    print(
        f"held-out test split: {len(test)} images of {test['patient_id'].nunique()} patients; "
        f"trial {seconds:.1f} s: {report['scored']} scored, refused {report['refused']}, "
        f"failed {report['failed']}; verdict {report['verdict']}"
    )
    print("| figure | silent trial | 95% CI (by file) | cxr evaluate | 95% CI (by patient) |")
    print("| --- | ---: | --- | ---: | --- |")
    for figure in report["figures"]:
        name = figure["name"]
        print(
            f"| {name} | {figure['site']:.4f} | {figure['low']:.3f}-{figure['high']:.3f} | "
            f"{internal[name]:.4f} | {internal[f'{name}_ci_low']:.3f}-"
            f"{internal[f'{name}_ci_high']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--columns", type=int, default=1700)
    parser.add_argument("--heldout-home", type=Path, default=None)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if not args.skip_throughput:
        throughput(args)
    if args.heldout_home is not None:
        heldout(args.heldout_home)


if __name__ == "__main__":
    main()

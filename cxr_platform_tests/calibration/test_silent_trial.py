"""A silent trial from a folder the site exported, with its report labels: the report, the log
rows and the site's labeled store agree; run again it adds nothing; the labels then serve
``cxr recalibrate --site``; and ``cxr predict --site`` scores with the site's own version."""

from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr_platform.calibration.recalibrated_version import write_recalibrated
from cxr_platform.calibration.report_labels import LabelsFileError, read_report_labels
from cxr_platform.calibration.site import site_labeled_records
from cxr_platform.calibration.site_report import TRIAL_REPORTER
from cxr_platform.deployment.pipeline import registry_for
from cxr_platform.inference.log import SILENT_TRIAL, InferenceLog, feedback_table
from cxr_platform.model_version.files import ONNX_FILE, read_onnx_metadata
from cxr_platform.model_version.tags import VersionTags
from cxr_platform.settings import load_settings
from cxr_platform_tests.conftest import CXR
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset

SITE = "North General"


def cxr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CXR, *args], capture_output=True, text=True, env=env, timeout=600)


def exported_folder(tiny_synthetic: Path, folder: Path) -> tuple[list[tuple[str, str]], dict]:
    """12 PNGs of each class, a child's two-image DICOM study, an adult's DICOM, a truncated
    PNG. Returns (path, label) of the PNGs and the DICOM identifiers."""
    (folder / "png").mkdir(parents=True)
    pngs = []
    for label in ("NORMAL", "PNEUMONIA"):
        for source in sorted((tiny_synthetic / label).glob("*.png"))[:12]:
            name = f"png/{label.lower()}-{source.name}"
            (folder / name).write_bytes(source.read_bytes())
            pngs.append((name, label))
    pixels = np.asarray(Image.open(folder / pngs[0][0]).convert("L"))
    child_study, adult_study = "1.2.826.0.1.3680043.10.999.1", "1.2.826.0.1.3680043.10.999.2"
    for n in (1, 2):
        child = radiograph_dataset(
            pixels, RadiographSpec(study_instance_uid=child_study, accession_number="ACC-CHILD")
        )
        child.save_as(folder / f"child-{n}.dcm", enforce_file_format=True)
    adult = radiograph_dataset(
        pixels,
        RadiographSpec(
            study_instance_uid=adult_study, accession_number="ACC-ADULT", patient_age="081Y"
        ),
    )
    adult.save_as(folder / "adult.dcm", enforce_file_format=True)
    (folder / "broken.png").write_bytes((folder / pngs[1][0]).read_bytes()[:400])
    return pngs, {"child_study": child_study, "adult_study": adult_study}


def test_a_folder_trial_with_report_labels_agrees_with_the_log_and_feeds_recalibration(
    site_home, tiny_synthetic, tmp_path
):
    settings, info, env = site_home
    folder = tmp_path / "export"
    pngs, dicom = exported_folder(tiny_synthetic, folder)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "accession_number", "study_instance_uid", "label"])
        writer.writerows([name, "", "", label] for name, label in pngs)
        writer.writerow(["", "ACC-CHILD", "", "normal"])
        writer.writerow(["png/never-exported.png", "", "", "PNEUMONIA"])  # matches nothing
        # The adult's study by two keys that disagree: left out, never guessed.
        writer.writerow(["", "", dicom["adult_study"], "NORMAL"])
        writer.writerow(["", "ACC-ADULT", "", "PNEUMONIA"])

    args = ["silent-trial", "--site", SITE, "--images", str(folder), "--labels", str(labels)]
    first = cxr(env, *args, "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)

    assert report["model_version"] == info.version
    assert report["images"] == 24 + 2 + 1 + 1 and report["scored"] == 26
    assert report["refused"] == {"outside_intended_use": 1}
    assert report["refused_by_check"] == {"patient_age": 1}
    assert report["failed"] == {"truncated": 1}
    assert report["labels"]["labelled_studies"] == 24 + 1
    assert report["labels"]["unmatched_keys"] == 1 and report["labels"]["unmatched_lines"] == [27]
    assert report["labels"]["conflicting_studies"] == 1
    assert report["labels"]["conflicting_lines"] == [28, 29]
    assert (report["positives"], report["negatives"]) == (12, 14)
    assert report["verdict"] == "more_labels"  # 12 positives cannot judge a site

    # The report's figures are the log's rows and labels, computed here another way.
    log = InferenceLog(settings.serving.inference_log_uri)
    rows = log.records(site=SITE)
    assert len(rows) == 26 and set(rows["source"]) == {SILENT_TRIAL}
    assert len(log.refusals(site=SITE)) == 1
    labelled = rows[rows["feedback_label"].notna()]
    assert len(labelled) == 26
    truth = (labelled["feedback_label"] == "PNEUMONIA").to_numpy()
    said = (labelled["label"] == "PNEUMONIA").to_numpy()
    figures = {figure["name"]: figure for figure in report["figures"]}
    assert figures["sensitivity"]["site"] == pytest.approx((said & truth).sum() / truth.sum())
    assert figures["specificity"]["site"] == pytest.approx((~said & ~truth).sum() / (~truth).sum())
    assert figures["auc"]["site"] == pytest.approx(roc_auc_score(truth, labelled["probability"]))
    assert figures["auc"]["low"] <= figures["auc"]["site"] <= figures["auc"]["high"]
    # Each PNG is in the log under the label its class folder gives.
    assert truth.sum() == 12

    # Nothing in the report names a patient, a study or a file.
    folder_text = "".join(p.read_text() for p in report_files(settings.home))
    for identifier in ("ACC-CHILD", "ACC-ADULT", dicom["child_study"], "never-exported", "normal-"):
        assert identifier not in folder_text

    # Run again: nothing is scored or labelled twice; the same report folder.
    with log.engine.connect() as connection:
        feedback_before = connection.execute(sa.select(feedback_table.c.reporter)).scalars().all()
    assert feedback_before == [TRIAL_REPORTER] * 26
    again = cxr(env, *args)
    assert again.returncode == 0, again.stderr
    assert len(log.records(site=SITE)) == 26 and len(log.refusals(site=SITE)) == 1
    with log.engine.connect() as connection:
        assert (
            connection.execute(sa.select(sa.func.count()).select_from(feedback_table)).scalar()
            == 26
        )
    assert len(report_files(settings.home)) == 3  # report.json, .md, .html, written once
    assert "Verdict: more labels." in again.stdout

    # The site's labeled store now holds them: recalibration counts them, and says how many
    # more it needs (12 positives cannot certify a sensitivity).
    assert (
        len(site_labeled_records(settings.monitoring.inference_log_uri, SITE, info.version)) == 26
    )
    recalibrated = cxr(env, "recalibrate", "--site", SITE)
    assert recalibrated.returncode == 2, recalibrated.stderr
    assert "PNEUMONIA labels" in recalibrated.stderr and "needed" in recalibrated.stderr

    # The same labels with absolute paths, a site's easy mistake: said on the command line, with
    # what the keys are matched against, and nothing is labelled.
    absolute = tmp_path / "absolute.csv"
    with absolute.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([str(folder / name), label] for name, label in pngs)
    wrong = cxr(env, *args[:-1], str(absolute))
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert f"24 of 24 labels match no study of the trial (line 2: path '{folder}/" in wrong.stderr
    assert "relative to the folder the trial scored" in wrong.stderr
    with log.engine.connect() as connection:
        assert (
            connection.execute(sa.select(sa.func.count()).select_from(feedback_table)).scalar()
            == 26
        )
    log.dispose()


def report_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "reports" / "silent_trial").rglob("report.*") if p.is_file())


def test_cxr_predict_for_a_site_uses_its_own_version(site_home, tiny_synthetic, tmp_path):
    settings, info, env = site_home
    registry = registry_for(settings.registry)
    source = registry.download(info.version)
    point = read_onnx_metadata(source / ONNX_FILE).calibration
    write_recalibrated(source, tmp_path / "site-model", replace(point, threshold=0.999), {})
    site_version = registry.register_folder(
        tmp_path / "site-model",
        run_id=str(info.run_id),
        tags=VersionTags(site=SITE, recalibrated_from=info.version),
        triggered_by="test",
    )
    registry.promote_for_site(site_version.version, SITE, triggered_by="test")
    images = sorted((tiny_synthetic / "PNEUMONIA").glob("*.png"))[:2]

    def versions(*extra: str) -> set[str]:
        out = tmp_path / f"predictions{len(extra)}.csv"
        result = cxr(env, "predict", *map(str, images), "--out", str(out), "--no-log", *extra)
        assert result.returncode == 0, result.stderr
        return set(pd.read_csv(out, dtype=str)["model_version"])

    assert versions("--site", SITE) == {site_version.version}
    assert versions() == {info.version}
    assert versions("--site", "South") == {info.version}  # no version of its own
    assert versions("--site", SITE, "--model", info.version) == {info.version}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("path,label\na.png,NORMAL\na.png,PNEUMONIA\n", "line 3: the same path as line 2"),
        ("path,label\na.png,consolidation\n", "line 2: the label must be one of NORMAL"),
        ("path,accession_number,label\na.png,A1,NORMAL\n", "give exactly one of"),
        ("file,label\na.png,NORMAL\n", "needs a 'label' column and one of"),
        ("path,label\n", "no labels in it"),
    ],
)
def test_a_labels_file_that_cannot_be_trusted_is_an_error_with_its_line(tmp_path, text, problem):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(LabelsFileError, match=problem):
        read_report_labels(path, b"salt")


def test_a_trial_is_asked_for_with_one_source(site_home, tmp_path):
    _, _, env = site_home
    both = cxr(
        env, "silent-trial", "--site", SITE, "--images", str(tmp_path), "--from", "2026-01-01"
    )
    assert both.returncode == 2 and "either --images DIR or a date range" in both.stderr
    backwards = cxr(
        env,
        "silent-trial",
        "--site",
        SITE,
        "--from",
        "2026-02-01",
        "--to",
        "2026-01-01",
        "--pacs-url",
        "http://127.0.0.1:9/dicom-web",
    )
    assert backwards.returncode == 2 and "runs backwards" in backwards.stderr
    no_archive = cxr(env, "silent-trial", "--site", SITE, "--from", "2026-01-01")
    assert no_archive.returncode == 2 and "no site archive" in no_archive.stderr


def test_a_trial_keeps_inputs_only_as_long_as_the_setting_says(tmp_path):
    """CXR_RETAIN_INPUTS_DAYS is the trial's too: 0 keeps none; otherwise what waited longer
    unlabeled is deleted when a trial starts, as the service deletes it daily."""
    import os
    import time

    from cxr_platform.calibration.site_trial import retained_inputs

    none = load_settings(home=tmp_path, retain_inputs_days=0).site_trial
    assert none.retain_inputs_days == 0 and retained_inputs(none) is None
    section = load_settings(home=tmp_path, retain_inputs_days=1).site_trial
    store = retained_inputs(section)
    assert store is not None
    pixels = np.zeros((8, 8), np.uint8)
    assert store.keep("a" * 32, pixels) and store.keep("b" * 32, pixels)
    old = store.pending / f"{'a' * 32}.npy"
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    again = retained_inputs(section)
    assert sorted(p.stem for p in again.pending.iterdir()) == ["b" * 32]

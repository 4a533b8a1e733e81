"""Subgroups: the parts of a split the data names, judged at the operating point."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr_platform.data.patients import file_name_family
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.evaluation import EvaluationReport, evaluate_predictions, evaluate_split
from cxr_platform.models.reporting import report_markdown
from cxr_platform.models.subgroups import (
    FILE_FAMILY,
    OTHER,
    PROJECTION,
    SOURCE_FOLDER,
    evaluate_subgroups,
    projection,
    source_folder,
    subgroup_columns,
)
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("person12_virus_3.jpeg", "person#-virus"),
        ("person447_virus_921_1.jpeg", "person#-virus"),
        ("person1_bacteria_1.jpeg", "person#-bacteria"),
        ("IM-0115-0001.jpeg", "IM"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL#-IM"),
        ("train/NORMAL/SYN-P0003-01.png", "SYN-P#"),
        ("12345.png", "#"),
    ],
)
def test_file_name_families_take_the_numbers_out(name: str, family: str) -> None:
    assert file_name_family(name) == family


def test_the_source_folder_is_the_folder_without_the_class_folder() -> None:
    assert source_folder("test/NORMAL/IM-1.jpeg") == "test"
    assert source_folder("site-b/2019/pneumonia/x.png") == "site-b/2019"
    assert source_folder("NORMAL/x.png") == "."


def test_projection_comes_from_dicom_headers_only(tmp_path) -> None:
    pixels = np.full((64, 64), 0.5)
    path = tmp_path / "ap.dcm"
    radiograph_dataset(pixels, RadiographSpec(view_position="AP")).save_as(
        path, enforce_file_format=True
    )
    png = tmp_path / "x.png"
    png.write_bytes(b"not read")
    assert projection(str(path)) == "AP"
    assert projection(str(png)) is None


def test_small_groups_are_pooled_and_single_group_dimensions_dropped() -> None:
    names = [f"NORMAL/IM-{i:04d}-0001.jpeg" for i in range(30)]
    names += [f"NORMAL/NORMAL2-IM-{i:04d}-0001.jpeg" for i in range(25)]
    names += [f"NORMAL/odd{i}.jpeg" for i in range(3)]
    index = pd.DataFrame({"relative_path": names, "path": [f"/d/{n}" for n in names]})
    columns = subgroup_columns(index)
    # Every image is under NORMAL/ (its label) and none is DICOM: only the family says anything.
    assert set(columns) == {FILE_FAMILY}
    assert set(columns[FILE_FAMILY]) == {"IM", "NORMAL#-IM", OTHER}
    assert SOURCE_FOLDER not in columns and PROJECTION not in columns


def _two_families(rng: np.random.Generator):
    """Normal images of family A are scored like the rest; family B's normals look like
    pneumonia to the model (the site-change failure), with three images per patient."""
    labels, logits, families, patients = [], [], [], []
    for patient in range(240):
        family = "A" if patient % 2 == 0 else "B"
        label = int(patient % 4 < 2)  # both families hold both classes
        for _ in range(3):
            if label:
                logit = rng.normal(2.0, 1.0)
            else:
                logit = rng.normal(-2.0 if family == "A" else 0.6, 1.0)
            labels.append(label)
            logits.append(logit)
            families.append(family)
            patients.append(f"p{patient}")
    return (np.array(labels), np.array(logits), np.array(families), np.array(patients))


def test_a_family_whose_normals_are_called_pneumonia_is_flagged_on_specificity() -> None:
    labels, logits, families, patients = _two_families(np.random.default_rng(3))
    point = OperatingPoint(
        threshold=0.5,
        temperature=1.0,
        rule="youden",
        target_sensitivity=None,
        val_sensitivity=0.9,
        val_specificity=0.8,
    )
    overall = evaluate_split("test", labels, logits, point, n_bootstrap=300, patients=patients)
    results = evaluate_subgroups(
        overall, labels, logits, point, {FILE_FAMILY: families}, patients, n_bootstrap=300
    )
    by_group = {result.group: result for result in results}
    assert by_group["B"].flagged == ("specificity",)
    assert by_group["B"].specificity_ci_high < overall.specificity
    assert by_group["A"].flagged == ()
    assert by_group["B"].n_patients == 120 and by_group["B"].n == 360
    # Sensitivity is the same in both families: neither is flagged for it.
    assert "sensitivity" not in by_group["A"].flagged + by_group["B"].flagged


def test_subgroups_travel_in_the_report_json_and_markdown(tmp_path) -> None:
    labels, logits, families, patients = _two_families(np.random.default_rng(4))
    half = len(labels) // 2
    report = evaluate_predictions(
        arch="baseline_cnn",
        model_name="m",
        val=(labels[:half], logits[:half]),
        test=(labels[half:], logits[half:]),
        n_bootstrap=200,
        patients={"val": patients[:half], "test": patients[half:]},
    )
    report.subgroups = evaluate_subgroups(
        report.splits["test"],
        labels[half:],
        logits[half:],
        report.operating_point,
        {FILE_FAMILY: families[half:]},
        patients[half:],
        n_bootstrap=200,
    )
    again = EvaluationReport.read_json(report.write_json(tmp_path / "evaluation.json"))
    assert again.subgroups == report.subgroups
    assert [g.group for g in again.flagged_subgroups] == ["B"]
    markdown = report_markdown(again)
    assert "## Subgroups" in markdown and "| test | file_family | B |" in markdown


def test_a_subgroup_of_one_class_has_no_interval_for_the_other() -> None:
    labels = np.array([0] * 30 + [1] * 30)
    logits = np.r_[np.linspace(-3, 1, 30), np.linspace(-1, 3, 30)]
    groups = np.array(["normals"] * 30 + ["positives"] * 30)
    point = OperatingPoint(0.5, 1.0, "youden", None, 0.9, 0.9)
    overall = evaluate_split("test", labels, logits, point, n_bootstrap=100)
    results = evaluate_subgroups(
        overall, labels, logits, point, {FILE_FAMILY: groups}, n_bootstrap=100
    )
    normals = next(result for result in results if result.group == "normals")
    assert normals.sensitivity is None and normals.sensitivity_ci_high is None
    assert normals.auc is None and normals.specificity is not None

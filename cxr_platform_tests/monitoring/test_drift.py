"""The drift rule on real image features (synthetic X-rays); probabilities are drawn here, so
each signal can be moved on its own."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxr_platform.data.imaging import read_image
from cxr_platform.data.preprocessing import PreprocessingConfig, to_square_uint8
from cxr_platform.data.shifts import apply_shift
from cxr_platform.data.sources import discover_images
from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset
from cxr_platform.deployment.reference import (
    Acquisition,
    load_reference,
    reference_frame,
    write_reference,
)
from cxr_platform.monitoring.drift import (
    DriftError,
    DriftRule,
    LungRelevanceWindow,
    acquisition_markdown,
    evaluate_window,
    save_drift_report,
    sites_markdown,
)

CONFIG = PreprocessingConfig(image_size=128)


def _inputs(root, shift="none"):
    records = discover_images(root).records
    rng = np.random.default_rng(0)
    images, sizes = [], []
    for path in records["path"]:
        pixels = apply_shift(read_image(path).pixels, shift, rng=rng)
        images.append(to_square_uint8(pixels, CONFIG))
        sizes.append(Acquisition(pixels.shape[1], pixels.shape[0], 8, "PNG"))
    labels = (records["label"] == "PNEUMONIA").to_numpy(float)
    return np.stack(images), labels, sizes


def _probabilities(labels, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return np.clip(
        np.where(labels == 1, rng.beta(6, 2, len(labels)), rng.beta(2, 6, len(labels))) - shift,
        0,
        1,
    )


def _window(root, shift="none", probability_shift=0.0, seed=1, feedback=None):
    images, labels, sizes = _inputs(root, shift)
    frame = reference_frame(
        images, _probabilities(labels, seed, probability_shift), labels, 0.5, sizes
    )
    frame["label"] = frame.pop("predicted")  # what the log calls the served label
    frame["model_version"] = "3"
    frame["feedback_label"] = feedback(labels) if feedback else None
    return frame


@pytest.fixture(scope="module")
def reference(tiny_synthetic) -> pd.DataFrame:
    images, labels, sizes = _inputs(tiny_synthetic)
    return reference_frame(images, _probabilities(labels, 0), labels, 0.5, sizes)


@pytest.fixture(scope="module")
def fresh_patients(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    return generate_synthetic_dataset(
        root / "d", SyntheticSpec(n_patients=40, seed=8), progress=False
    )


def test_fresh_patients_from_the_same_scanner_do_not_drift(reference, fresh_patients):
    result = evaluate_window(reference, _window(fresh_patients), window="w", model_version="3")
    assert not result.fired, result.summary()
    assert result.n_compared == result.n_records > 80
    assert set(result.feature_p_values) >= {
        "sharpness",
        "intensity_mean",
        "original_width [image]",
        "bit_depth [image]",
    }
    # The prevalence of the traffic, estimated from its probabilities alone (EM; its accuracy
    # on calibrated probabilities is in test_recalibration.py; these are drawn, not calibrated).
    assert result.reference_prevalence == pytest.approx(
        float((reference["label"] == "PNEUMONIA").mean())
    )
    assert 0 < result.estimated_prevalence < 1


def test_the_window_says_where_its_explanations_looked_without_firing(reference, fresh_patients):
    records = _window(fresh_patients)
    plain = evaluate_window(reference, records, window="w", model_version="3")
    assert plain.lung_relevance is None  # nothing explained with lung fields
    explained = records.copy()
    explained["relevance_in_lungs"] = np.nan
    explained.loc[explained.index[:10], "relevance_in_lungs"] = [0.1] * 4 + [0.8] * 6
    result = evaluate_window(reference, explained, window="w", model_version="3")
    assert result.lung_relevance == LungRelevanceWindow(
        n_explained=10, median=0.8, mostly_outside=0.4
    )
    assert result.fired == plain.fired  # watched, not (yet) a reason to act
    assert result.to_dict()["lung_relevance"]["n_explained"] == 10


@pytest.mark.parametrize("shift", ["exposure", "resolution", "blur"])
def test_shifted_inputs_drift(reference, fresh_patients, shift):
    result = evaluate_window(
        reference, _window(fresh_patients, shift), window="w", model_version="3"
    )
    assert result.input_drift and result.fired, result.summary()
    assert not result.prediction_drift  # the probabilities were drawn the same way


def test_prediction_drift_without_input_drift(reference, fresh_patients):
    result = evaluate_window(
        reference, _window(fresh_patients, probability_shift=0.35), window="w", model_version="3"
    )
    assert result.prediction_drift and not result.input_drift, result.summary()
    assert result.probability_p_value < 0.01
    assert result.positive_rate < result.reference_positive_rate - 0.2


def test_performance_drift_needs_enough_labels(reference, fresh_patients):
    def swapped(labels):
        return np.where(labels == 1, "NORMAL", "PNEUMONIA")

    expected = {"test_auc": 0.95, "test_sensitivity": 0.95, "test_specificity": 0.6}
    window = _window(fresh_patients, feedback=swapped)
    result = evaluate_window(
        reference, window, window="w", model_version="3", expected_metrics=expected
    )
    assert result.performance_drift and result.performance.auc < 0.5, result.summary()
    strict = DriftRule(min_labeled=len(window) + 1)
    quiet = evaluate_window(
        reference, window, window="w", model_version="3", expected_metrics=expected, rule=strict
    )
    assert not quiet.performance_drift and quiet.performance.auc is None


def test_specificity_falling_at_the_threshold_is_named_even_when_auc_holds(
    reference, fresh_patients
):
    """The other-site failure: the ranking holds (AUC), but at the version's threshold many
    more normal images are called pneumonia."""

    def truth(labels):
        return np.where(labels == 1, "PNEUMONIA", "NORMAL")

    window = _window(fresh_patients, feedback=truth)
    expected = {"test_auc": 0.5, "test_sensitivity": 0.5, "test_specificity": 0.95}
    calm = evaluate_window(
        reference, window, window="w", model_version="3", expected_metrics=expected
    )
    assert "specificity" not in calm.performance.failed, calm.summary()
    # The same images and scores; the served labels as a lower threshold would give them.
    negatives = window.index[window["feedback_label"] == "NORMAL"]
    window.loc[negatives[: len(negatives) // 2], "label"] = "PNEUMONIA"
    result = evaluate_window(
        reference, window, window="w", model_version="3", expected_metrics=expected
    )
    assert result.performance_drift and result.performance.failed == ("specificity",)
    assert result.performance.auc == pytest.approx(calm.performance.auc)
    assert any("specificity at the version's threshold" in r for r in result.reasons)
    assert list(result.to_dict()["performance"]["failed"]) == ["specificity"]


def test_a_surge_of_refused_images_fires_without_asking_for_a_fine_tune(reference, fresh_patients):
    window = _window(fresh_patients)
    n = len(window)
    quiet = evaluate_window(reference, window, window="w", model_version="3", n_refused=1)
    assert not quiet.fired and quiet.refusal_rate == pytest.approx(1 / (n + 1))
    surge = evaluate_window(reference, window, window="w", model_version="3", n_refused=n // 3)
    assert surge.refusal_drift and surge.fired and not surge.model_drift, surge.summary()
    assert any("input gate refused" in reason for reason in surge.reasons)
    assert surge.to_dict()["refusal_rate"] == pytest.approx((n // 3) / (n + n // 3))


def test_patients_outside_the_intended_use_are_counted_per_site_apart_from_the_gate(
    reference, fresh_patients
):
    """A site sending adults to a children's model is a routing finding of its own: its
    intended-use refusals are judged per site, not mixed with the input gate's."""
    window = _window(fresh_patients)
    n = len(window)
    window["site"] = np.where(np.arange(n) % 2 == 0, "adults-ward", "paediatrics")
    result = evaluate_window(
        reference,
        window,
        window="w",
        model_version="3",
        n_refused=2,
        refused_by_site={"paediatrics": 2},
        n_outside_intended_use=n // 3,
        outside_by_site={"adults-ward": n // 3},
    )
    ward, paediatrics = result.by_site["adults-ward"], result.by_site["paediatrics"]
    assert ward.intended_use_drift and ward.failed == ("intended use",), ward
    assert not paediatrics.intended_use_drift and not paediatrics.refusal_drift
    assert not ward.refusal_drift and ward.n_refused == 0  # the gate refused none of its images
    assert result.intended_use_drift and result.fired and not result.model_drift
    assert not result.refusal_drift
    assert any(
        r.startswith("site adults-ward:") and "outside the version's intended use" in r
        for r in result.reasons
    ), result.reasons
    assert "| adults-ward |" in sites_markdown(result)
    saved = result.to_dict()
    assert saved["by_site"]["adults-ward"]["outside_intended_use_rate"] == pytest.approx(
        (n // 3) / (ward.n_records + n // 3)
    )


def test_only_the_versions_rows_are_compared_and_reports_are_saved(
    reference, fresh_patients, tmp_path
):
    window = _window(fresh_patients)
    window.loc[window.index[:10], "model_version"] = "2"
    result = evaluate_window(reference, window, window="ids-1-2", model_version="3")
    assert result.n_compared == result.n_records - 10
    files = save_drift_report(result, tmp_path / "report")
    saved = json.loads(files["json"].read_text())
    assert saved["fired"] is result.fired and saved["n_compared"] == result.n_compared
    assert "<html" in files["html"].read_text()[:2000].lower()
    with pytest.raises(DriftError, match="no records scored by version 9"):
        evaluate_window(reference, window, window="w", model_version="9")


def _truth(labels):
    return np.where(labels == 1, "PNEUMONIA", "NORMAL")


def test_the_site_whose_specificity_fell_is_named_and_the_other_is_not(reference, fresh_patients):
    """Half the traffic comes from a site where the threshold no longer holds: the report
    says which site failed and on what, and that the other did not."""
    window = _window(fresh_patients, feedback=_truth)
    window["site"] = np.where(np.arange(len(window)) % 2 == 0, "west", "east")
    expected = {"test_auc": 0.5, "test_sensitivity": 0.5, "test_specificity": 0.95}
    west_negatives = window.index[
        (window["site"] == "west") & (window["feedback_label"] == "NORMAL")
    ]
    window.loc[west_negatives[1:], "label"] = "PNEUMONIA"
    result = evaluate_window(
        reference,
        window,
        window="w",
        model_version="3",
        expected_metrics=expected,
        n_refused=3,
        refused_by_site={"east": 1, "west": 2},
    )
    assert result.failed_sites == {"west": ("specificity",)}, result.summary()
    assert result.performance_drift and result.fired
    assert any(reason.startswith("site west: specificity") for reason in result.reasons)
    west, east = result.by_site["west"], result.by_site["east"]
    assert west.n_records + east.n_records == len(window)
    assert east.n_refused == 1 and west.n_refused == 2 and not west.refusal_drift
    # Two refusals from a site that sent nothing else are too few to call a surge.
    few = evaluate_window(
        reference, window, window="w", model_version="3", refused_by_site={"misrouted": 2}
    )
    assert few.by_site["misrouted"].n_refused == 2 and not few.by_site["misrouted"].refusal_drift
    assert west.performance.specificity_ci[1] < 0.95
    table = sites_markdown(result)
    assert "| west |" in table and "| specificity |" in table
    saved = result.to_dict()
    assert saved["failed_sites"] == {"west": ["specificity"]}
    assert saved["by_site"]["east"]["refusal_rate"] == pytest.approx(1 / (east.n_records + 1))


def test_a_window_without_sites_has_no_site_breakdown(reference, fresh_patients):
    result = evaluate_window(reference, _window(fresh_patients), window="w", model_version="3")
    assert result.by_site == {} and "names no sites" in sites_markdown(result)


def test_live_intervals_resample_studies_where_the_log_has_them(reference, fresh_patients):
    """Images of one study move together: with a handful of studies the interval is wider
    than the one that treats every image as independent."""
    window = _window(fresh_patients, feedback=_truth)
    expected = {"test_auc": 0.5, "test_sensitivity": 0.5, "test_specificity": 0.5}
    by_image = evaluate_window(
        reference, window, window="w", model_version="3", expected_metrics=expected
    ).performance
    truth = window["feedback_label"].to_numpy()
    # Ten studies per class, each holding images of one diagnosis, as a study does.
    window["study_uid_hash"] = [f"{label}-{i % 10}" for i, label in enumerate(truth)]
    by_study = evaluate_window(
        reference, window, window="w", model_version="3", expected_metrics=expected
    ).performance
    assert by_image.interval_unit == "image" and by_study.interval_unit == "study"
    assert by_study.n_groups == 20
    width = {
        unit: performance.auc_ci[1] - performance.auc_ci[0]
        for unit, performance in (("image", by_image), ("study", by_study))
    }
    assert by_image.auc == by_study.auc
    assert width["study"] > 0 and width["image"] > 0


def test_a_confident_models_probabilities_do_not_drift_by_the_reference_files_rounding(
    reference, fresh_patients, tmp_path
):
    """Probabilities that crowd against 1 read back from the reference file as exactly 1; the
    log keeps them as they are. The same distribution on both sides must not drift."""

    def confident(labels, seed):
        rng = np.random.default_rng(seed)
        logits = np.where(
            labels == 1, rng.normal(16, 2, len(labels)), rng.normal(-6, 2, len(labels))
        )
        return 1 / (1 + np.exp(-logits))

    stored = reference.copy()
    stored["probability"] = confident((reference["label"] == "PNEUMONIA").to_numpy(float), 0)
    stored["predicted"] = np.where(stored["probability"] >= 0.5, "PNEUMONIA", "NORMAL")
    write_reference(tmp_path, stored)
    read_back = load_reference(tmp_path)
    assert (read_back["probability"] == 1.0).sum() > 20  # the rounding this is about

    window = _window(fresh_patients)
    truth = (window["label"] == "PNEUMONIA").to_numpy(float)
    window["probability"] = confident(truth, 1)
    assert (window["probability"] < 1.0).all()
    result = evaluate_window(read_back, window, window="w", model_version="3")
    assert not result.prediction_drift, result.summary()


def _as_dicom(frame: pd.DataFrame, scale: int, photometric: str = "MONOCHROME2") -> pd.DataFrame:
    """The same images as a detector would send them: a larger matrix, 12 bits."""
    return frame.assign(
        original_width=frame["original_width"] * scale,
        original_height=frame["original_height"] * scale,
        bit_depth=12.0,
        source_format="DICOM",
        photometric_interpretation=photometric,
    )


def test_acquisition_is_compared_per_kind_of_traffic_and_per_site(reference, fresh_patients):
    """A reference that holds DICOM rows too (a model trained on a DICOM archive): DICOM traffic
    is compared with those rows only, and a site whose detector changed is named."""
    mixed = pd.concat([reference, _as_dicom(reference, 6)], ignore_index=True)
    window = _window(fresh_patients)
    half = len(window) // 2
    dicom = pd.concat(
        [
            _as_dicom(window.iloc[:half], 6).assign(site="north"),
            _as_dicom(window.iloc[half:], 6).assign(site="south"),
        ]
    )
    calm = evaluate_window(mixed, dicom, window="w", model_version="3")
    assert not calm.input_drift, calm.summary()
    assert {(g.source, g.site) for g in calm.acquisition} == {
        ("dicom", "north"),
        ("dicom", "south"),
    }
    assert all(g.n_reference == len(reference) and g.p_values for g in calm.acquisition)

    # South replaced its detector: a larger matrix read out as MONOCHROME1.
    south = dicom["site"] == "south"
    changed = pd.concat(
        [dicom[~south], _as_dicom(window.iloc[half:], 8, "MONOCHROME1").assign(site="south")]
    )
    result = evaluate_window(mixed, changed, window="w", model_version="3")
    assert result.input_drift, result.summary()
    assert "original_width [dicom @ south]" in result.drifted_features
    assert "photometric_interpretation [dicom @ south]" in result.drifted_features
    assert not any("north" in feature for feature in result.drifted_features)
    assert "| dicom @ south |" in acquisition_markdown(result)
    saved = result.to_dict()
    assert saved["acquisition"][1]["site"] == "south"

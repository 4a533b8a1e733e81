"""A version's intended use: the record (measured or declared, and what a site declared
instead), the age check, the check by pixels, and what export writes into the files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_platform.data.imaging import read_image
from cxr_platform.data.populations import KERMANY_2018, measure_population, recognise
from cxr_platform.data.preprocessing import to_square_uint8
from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset
from cxr_platform.deployment.export import load_torchscript
from cxr_platform.deployment.model_card import population_check_words
from cxr_platform.deployment.pipeline import register_exported, registry_for
from cxr_platform.deployment.population import (
    OutOfPopulationError,
    acquisition_variants,
    fit_population_check,
    intended_use_for,
)
from cxr_platform.deployment.quantize import add_int8_variant
from cxr_platform.model_version.files import read_onnx_metadata
from cxr_platform.model_version.intended_use import (
    DECLARED,
    MEASURED,
    PATIENT_AGE,
    Basis,
    IntendedUse,
    IntendedUseError,
)
from cxr_platform.model_version.population_check import PopulationCheck, PopulationCheckError
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.settings import load_settings
from cxr_platform_tests.conftest import other_population_images
from cxr_platform_tests.deployment.conftest import export_for_registry
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset

CHILDREN = IntendedUse(
    population="children aged one to five years",
    age_years=(1, 5),
    age_basis=Basis(DECLARED, "the dataset's documentation"),
    projections=("AP",),
    projections_basis=Basis(DECLARED, "the dataset's documentation"),
)


def test_ages_are_inside_in_completed_years_and_a_refusal_says_why_in_words():
    for inside in (1.0, 3.2, 5.0, 5.99):
        assert CHILDREN.age_verdict(inside) is None
    assert CHILDREN.age_verdict(None) is None  # unknown is no refusal by itself
    for outside in (0.5, 6.0, 17.0, 81.0):
        verdict = CHILDREN.age_verdict(outside, "PatientAge")
        assert verdict is not None and not verdict.accepted and verdict.reason == PATIENT_AGE
    words = CHILDREN.age_verdict(81.3, "PatientAge").detail
    assert (
        words == "patient age 81 years (PatientAge) is outside this model's intended use: 1-5 years"
    )
    assert "6 months" in CHILDREN.age_verdict(0.5).detail


def test_a_record_round_trips_and_a_declared_range_keeps_the_one_it_replaced():
    assert IntendedUse.from_dict(json.loads(json.dumps(CHILDREN.to_dict()))) == CHILDREN
    with pytest.raises(IntendedUseError, match="reason"):
        CHILDREN.with_declared_ages((1, 17), "  ")
    widened = CHILDREN.with_declared_ages((1, 17), "local validation on 400 adolescents")
    assert widened.age_years == (1, 17) and widened.widened_from == (1, 5)
    assert widened.age_basis.source == DECLARED and "400 adolescents" in widened.age_basis.detail
    assert widened.age_verdict(16.0) is None and widened.age_verdict(18.0) is not None
    assert widened.summary()["widened_from"] == [1, 5]
    with pytest.raises(IntendedUseError):
        IntendedUse.from_dict({"age_years": [1, 5]})  # no population


def test_the_check_refuses_the_other_population_and_keeps_validations_99_5th_percentile():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(8, 64))

    def features(n: int, shift: float = 0.0) -> np.ndarray:
        latent = rng.normal(size=(n, 8))
        latent[:, :2] += shift  # another population: other values of two underlying factors
        return latent @ mixing + rng.normal(scale=0.1, size=(n, 64))

    train, val = features(600), features(400)
    outside = features(60, shift=4.0)
    groups = [f"patient{index // 2}" for index in range(len(outside))]
    check = fit_population_check(train, val, outside, groups, collections=["others"] * len(outside))
    # Thresholded at validation's 99.5th percentile: of the same population, newly drawn, about
    # that share is refused (validation itself is refused 2 of 400 by that very definition).
    assert (check.refused(features(4000))).mean() < 0.015
    assert check.refused(features(300, shift=4.0)).mean() > 0.95
    held_out = check.fitted_on["out_of_population"]
    assert held_out["n_patients"] == 30 and held_out["cv_folds"] == 5
    assert held_out["cv_refused_rate"] > 0.9 and held_out["folder"] == "others"
    restored = PopulationCheck.from_dict(json.loads(json.dumps(check.to_dict())))
    assert np.allclose(restored.scores(outside), check.scores(outside), rtol=1e-5, atol=1e-5)
    with pytest.raises(PopulationCheckError):
        check.scores(np.zeros((2, 3)))
    with pytest.raises(OutOfPopulationError, match="one patient"):
        fit_population_check(train, val, outside, ["same"] * len(outside))


def _population_features(rng, mixing, n, shift=None):
    latent = rng.normal(size=(n, mixing.shape[0]))
    if shift is not None:
        latent += shift
    return latent @ mixing + rng.normal(scale=0.1, size=(n, mixing.shape[1]))


def test_leaving_a_collection_out_says_what_cross_validation_inside_the_collections_hides():
    """Two collections of the other population, each set apart from the model's own by factors
    of its own (its hospitals, its pipeline) as much as by the patients: cross-validated by
    patient, the check refuses nearly all of them, because every fold has seen both collections;
    fitted on one collection and judged on the other, it does not. The figure to expect of
    patients from elsewhere is the second."""
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(8, 64))
    train, val = _population_features(rng, mixing, 600), _population_features(rng, mixing, 400)
    shared, first, second = np.zeros(8), np.zeros(8), np.zeros(8)
    shared[0] = 1.5  # what the two populations share, and only a little
    first[1:3], second[3:5] = 5.0, 5.0  # what each collection alone has
    outside = np.concatenate(
        [
            _population_features(rng, mixing, 40, shared + first),
            _population_features(rng, mixing, 40, shared + second),
        ]
    )
    names = ["first"] * 40 + ["second"] * 40
    groups = [f"{name}/p{index // 2}" for index, name in enumerate(names)]
    check = fit_population_check(train, val, outside, groups, collections=names)
    record = check.fitted_on["out_of_population"]
    assert record["cv_refused_rate"] > 0.9
    assert record["left_out_refused_rate"] < record["cv_refused_rate"] - 0.3
    by_name = {entry["name"]: entry for entry in record["collections"]}
    assert set(by_name) == {"first", "second"} and by_name["first"]["n_patients"] == 20
    for entry in by_name.values():
        assert entry["refused_when_left_out"] < 0.7 and entry["n_images"] == 40
    assert record["folder"] == "first + second"
    # The card quotes the figure from elsewhere, and each collection's.
    words = population_check_words(json.loads(json.dumps(check.summary())))
    left_out = record["left_out_refused_rate"]
    assert f"**{left_out:.0%} with each of its 2 collections left out in turn" in words
    assert f"first {by_name['first']['refused_when_left_out']:.0%} of 40" in words
    assert "80 images of 40 patients" in words
    # One collection: no figure for a collection left out, rather than a made-up one.
    alone = fit_population_check(train, val, outside[:40], groups[:40], collections=names[:40])
    assert "left_out_refused_rate" not in alone.fitted_on["out_of_population"]
    assert "not measured" in population_check_words(alone.summary())
    # `cxr models` gives both figures in its intended-use column.
    from cxr_platform.cli.registry import _intended_use_text
    from cxr_platform.model_version.tags import VersionTags

    column = _intended_use_text(
        VersionTags(intended_use=CHILDREN.summary(), population_check=check.summary())
    )
    cv = record["cv_refused_rate"]
    assert column.endswith(f"pixels: {cv:.0%} held out, {left_out:.0%} from elsewhere")
    with pytest.raises(OutOfPopulationError, match="patient and collection"):
        fit_population_check(train, val, outside, groups, collections=names[:10])


def test_the_threshold_keeps_the_validation_split_under_acquisition_shifts():
    """A noisier detector spreads the model's own population's scores: thresholded on the
    split alone, its copy is refused far more than one in two hundred; with the copy given, the
    threshold is no lower than its own 99.5th percentile."""
    rng = np.random.default_rng(2)
    mixing = rng.normal(size=(8, 64))
    train, val = _population_features(rng, mixing, 600), _population_features(rng, mixing, 800)
    outside_shift, noisier = np.zeros(8), np.zeros(8)
    outside_shift[:2], noisier[1:3] = 4.0, 1.5
    # The same children's pictures from a noisier detector: moved partly the adults' way.
    shifted = _population_features(rng, mixing, 800, noisier)
    outside = _population_features(rng, mixing, 60, outside_shift)
    groups = [f"p{index // 2}" for index in range(60)]
    plain = fit_population_check(train, val, outside, groups)
    assert plain.refused(shifted).mean() > 0.02
    kept = fit_population_check(train, val, outside, groups, shifted_val=shifted)
    assert kept.threshold >= plain.threshold
    assert kept.refused(shifted).mean() <= 0.005 and kept.refused(val).mean() <= 0.005
    assert kept.fitted_on["n_shifted_val"] == 800
    assert kept.fitted_on["shifted_val_refused"] == int(kept.refused(shifted).sum())
    assert kept.refused(outside).mean() > 0.8


def _png(path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(48, 48), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_collections_are_read_with_their_own_patient_ids(tmp_path):
    from cxr_platform.data.preprocessing import PreprocessingConfig
    from cxr_platform.deployment.population import (
        collection_folders,
        out_of_population_collections,
    )

    preprocessing = PreprocessingConfig(image_size=32)
    adults = tmp_path / "adults"
    # Laid out as the shared ieee8023 subset: a metadata.csv whose rows name each file.
    case_reports = adults / "case-reports"
    for index in range(6):
        _png(case_reports / "images" / f"fig{index}.png", index)
    (case_reports / "metadata.csv").write_text(
        "Patientid,age,filename\n" + "".join(f"{i // 3},60,fig{i}.png\n" for i in range(6))
    )
    # As the Figure 1 set: ids that are the images' names, one patient's images told apart by a
    # letter, latin-1 text; and one file no row names.
    figure = adults / "figure"
    for name in ("COVID-00001", "COVID-00003a", "COVID-00003b", "COVID-00010", "other"):
        _png(figure / "images" / f"{name}.jpg", len(name))
    (figure / "images" / "broken.png").write_bytes(b"not an image")
    (figure / "metadata.csv").write_bytes(
        "patientid,notes\nCOVID-00001,fi\u00e8vre\nCOVID-00003a,x\nCOVID-00003b,x\n"
        "COVID-00010,x\n".encode("latin-1")
    )
    # A folder of collections is its subfolders; a collection given by its images folder
    # keeps its own name and the metadata beside it.
    assert collection_folders([adults]) == [case_reports, figure]
    read = out_of_population_collections([adults], preprocessing)
    assert [c.name for c in read] == ["case-reports", "figure"]
    assert read[0].patients == ("0", "0", "0", "1", "1", "1")
    assert read[0].images.shape == (6, 32, 32) and read[0].n_patients == 2
    assert read[1].patients == (
        "COVID-00001",
        "COVID-00003",
        "COVID-00003",
        "COVID-00010",
        "image:other.jpg",
    )
    (alone,) = out_of_population_collections([figure / "images", case_reports], preprocessing)[:1]
    assert alone.name == "figure" and len(alone.images) == 5  # the unreadable file left out
    with pytest.raises(OutOfPopulationError, match="not a folder"):
        collection_folders([tmp_path / "missing"])
    with pytest.raises(OutOfPopulationError, match="two collections called figure"):
        collection_folders([figure, figure / "images"])
    with pytest.raises(OutOfPopulationError, match="at least 10"):
        out_of_population_collections([figure], preprocessing)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "images" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(OutOfPopulationError, match="no readable image"):
        out_of_population_collections([empty, case_reports], preprocessing)


def test_the_two_shared_adult_collections_are_read_patient_by_patient(
    adults_dir, case_report_adults_dir
):
    """As their READMEs count them: 117 case-report images of 78 patients by `Patientid`; the
    Figure 1 set's 55 images, COVID-00003a and -00003b one patient's."""
    from cxr_platform.data.preprocessing import PreprocessingConfig
    from cxr_platform.deployment.population import out_of_population_collections

    figure, case_reports = out_of_population_collections(
        [adults_dir / "images", case_report_adults_dir], PreprocessingConfig(image_size=64)
    )
    assert figure.name == "adult-cxr-figure1" and len(figure.images) == 55
    assert figure.patients[figure.paths.index(adults_dir / "images" / "COVID-00003a.jpg")] == (
        "COVID-00003"
    )
    assert figure.n_patients < 55
    assert case_reports.name == "adult-cxr-ieee8023-subset"
    assert (len(case_reports.images), case_reports.n_patients) == (117, 78)


def test_several_folders_are_one_setting_listed_as_path_lists_them(tmp_path):
    import os

    first, second = tmp_path / "first", tmp_path / "second"
    settings = load_settings(home=tmp_path, out_of_population_dir=f"{first}{os.pathsep}{second}")
    assert settings.registry.out_of_population_dir == (first, second)
    assert load_settings(home=tmp_path).registry.out_of_population_dir == ()
    assert load_settings(home=tmp_path, out_of_population_dir=first).out_of_population_dir == (
        first,
    )


def test_the_kaggle_files_are_recognised_by_their_names_and_declare_their_population(tmp_path):
    names = ["person12_virus_3.jpeg", "person3_bacteria_10.jpeg", "IM-0115-0001.jpeg"]
    names += ["NORMAL2-IM-1427-0001.jpeg"]
    measured = measure_population([tmp_path / n for n in names], [f"NORMAL/{n}" for n in names])
    assert measured.n_dicom == 0 and measured.age_range is None
    assert recognise(measured.file_families) is KERMANY_2018
    assert recognise({"IM", "my-hospital"}) is None  # one foreign file: not the documented set
    assert KERMANY_2018.age_years == (1, 5)


def _dicom_folder(root, ages: list[int], view: str, modality: str = "DX"):
    paths = []
    pixels = (np.indices((96, 96)).sum(axis=0) % 255).astype(np.uint8)
    for index, age in enumerate(ages):
        spec = RadiographSpec(
            modality=modality,
            view_position=view,
            patient_id=f"P{index}",
            patient_age=f"{age:03d}Y",
        )
        path = root / f"img{index}.dcm"
        radiograph_dataset(pixels, spec).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_ages_projections_and_modalities_are_measured_from_dicom_headers(tmp_path):
    ages = [30 + (i % 40) for i in range(40)] + [2]  # a mistyped birth date among adults
    paths = _dicom_folder(tmp_path, ages, "PA")
    measured = measure_population(paths)
    assert measured.n_dicom == len(ages) and len(measured.ages) == len(ages)
    assert measured.age_range == (30, 68)  # the extreme one at each end left out
    assert measured.named(measured.projections) == ("PA",)
    assert measured.named(measured.modalities) == ("DX",)
    assert measure_population(paths[:10]).age_range is None  # too few ages to measure a range


def test_export_writes_the_intended_use_and_the_check_into_every_model_file(
    trained_checkpoint, learnable_cache, other_population, tmp_path
):
    """As a release exports: the synthetic set declares the paediatric population it stands in
    for; the fp32 and INT8 graphs, the TorchScript file, metadata.json and the registry tags all
    say so, and the ONNX graph gives the check its features."""
    settings = load_settings(home=tmp_path / "home")
    exported = export_for_registry(
        settings, trained_checkpoint, learnable_cache, tmp_path / "export", "cxr", other_population
    )
    folder = exported.directory
    add_int8_variant(
        folder,
        learnable_cache.images("val", mmap=False),
        learnable_cache.labels("val"),
        max_auc_drop=1.0,  # kept whatever it costs: this test reads its metadata
    )
    expected = IntendedUse.from_dict(
        json.loads((folder / "metadata.json").read_text())["intended_use"]
    )
    assert expected.age_years == (1, 5) and expected.age_basis.source == DECLARED
    for name in ("model.onnx", "model.int8.onnx"):
        assert read_onnx_metadata(folder / name).use == expected, name
    _, torchscript_metadata = load_torchscript(folder / "model.torchscript.pt")
    assert torchscript_metadata.use == expected
    for precision in ("fp32", "int8"):
        predictor = Predictor(folder, precision=precision)
        assert predictor.population is not None and predictor.intended_use == expected
        square = learnable_cache.images("test", mmap=False)[:2]
        _, features = predictor.run(square)
        assert features.shape == (2, predictor.population.dimensions)
    # The check keeps the model's own population and refuses the other one, of patients (a
    # synthetic seed) it was never fitted on.
    predictor = Predictor(folder)
    test_images = learnable_cache.images("test", mmap=False)
    _, own = predictor.run(test_images)
    assert predictor.population.refused(own).mean() <= 0.03
    # Fitted with an acquisition-shifted copy of each training image beside it (a noisier or
    # blurred detector is not another kind of patient): so is the test split under the shifts.
    fitted = predictor.population.fitted_on
    assert fitted["n_shifted_copies"] > 0 and fitted["n_train"] == 2 * fitted["n_shifted_copies"]
    _, shifted = predictor.run(acquisition_variants(test_images, predictor.preprocessing))
    assert predictor.population.refused(shifted).mean() <= 0.05
    source = generate_synthetic_dataset(
        tmp_path / "unseen", SyntheticSpec(n_patients=12, seed=29), progress=False
    )
    unseen = other_population_images(source, tmp_path / "unseen-other")
    squares = np.stack(
        [
            to_square_uint8(read_image(p).pixels, predictor.preprocessing)
            for p in sorted(unseen.iterdir())
        ]
    )
    _, others = predictor.run(squares)
    assert predictor.population.refused(others).mean() >= 0.8
    info = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
    tags = registry_for(settings.registry).get(info.version).release
    assert tags.intended_use["age_years"] == [1, 5]
    assert tags.population_check["n_val"] == len(learnable_cache.labels("val"))


def test_a_deployment_declares_another_range_only_with_its_reason(learnable_cache, tmp_path):
    with pytest.raises(ValueError, match="reason"):
        load_settings(home=tmp_path, intended_age_years="1-17")
    with pytest.raises(ValueError, match="1-17"):
        load_settings(home=tmp_path, intended_age_years="adults", intended_age_reason="x")
    settings = load_settings(
        home=tmp_path, intended_age_years="1-17", intended_age_reason="local study, 400 labels"
    )
    use = intended_use_for(learnable_cache, settings.registry, None)
    assert use.age_years == (1, 17) and use.widened_from == (1, 5)
    plain = intended_use_for(learnable_cache, load_settings(home=tmp_path).registry, None)
    assert plain.age_years == (1, 5) and plain.widened_from is None
    assert plain.age_basis.source == DECLARED and "synthetic" in plain.age_basis.detail
    assert plain.age_basis.source != MEASURED


def test_model_files_name_no_folder_file_or_institution_of_the_training_data(tmp_path):
    """A site that names its folders and files after patients, and whose headers name the
    hospital: the intended-use record, which travels inside every model file, keeps digests of
    those names (the same for the same name), never the names."""
    from cxr_platform.data.cache import build_cache
    from cxr_platform.data.preprocessing import PreprocessingConfig
    from cxr_platform.data.profile import profile_dataset
    from cxr_platform.data.sources import discover_images
    from cxr_platform.data.splits import make_manifest

    root = tmp_path / "DOE-JANE-cohort"
    pixels = (np.indices((96, 96)).sum(axis=0) % 255).astype(np.uint8)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for index in range(12):
            spec = RadiographSpec(patient_id=f"P{label}{index}", patient_age="004Y")
            dataset = radiograph_dataset(pixels, spec)
            dataset.InstitutionName = "ST ELSEWHERE CHILDRENS"
            name = f"ROE-RICHARD-{label}-{index:02d}.dcm"
            dataset.save_as(root / label / name, enforce_file_format=True)
    _, inspected = profile_dataset(discover_images(root), workers=1, progress=False)
    manifest = make_manifest(inspected, ratios=(0.6, 0.2, 0.2), seed=3)
    cache = build_cache(
        manifest, tmp_path / "cache", PreprocessingConfig(image_size=64), workers=1, progress=False
    )
    settings = load_settings(home=tmp_path / "home")
    use = intended_use_for(cache, settings.registry, str(root))
    written = json.dumps(use.to_dict())
    for name in ("DOE", "JANE", "ROE", "RICHARD", "ELSEWHERE", "CHILDRENS"):
        assert name not in written.upper(), name
    source = use.training_source
    assert source["data_folder"].startswith("sha256:") and source["dataset"] is None
    assert all(key.startswith("sha256:") for key in source["sites"])
    assert sum(source["sites"].values()) == source["n_dicom"] > 0
    assert "1 site named in their headers" in use.population
    # The same folder trained on again says so: the same digest.
    assert intended_use_for(cache, settings.registry, str(root)).training_source == source

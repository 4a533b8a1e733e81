"""Who a version is for, decided at export from the data it was trained on: the intended-use
record (measured from DICOM headers or declared by the dataset's documentation, and what a
deployment declared instead) and the check by pixels, fitted on the model's own features."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.imaging import read_image
from cxr_platform.data.patients import patient_from_filename
from cxr_platform.data.populations import (
    SYNTHETIC_DEMO,
    DocumentedPopulation,
    MeasuredPopulation,
    measure_population,
    recognise,
    withheld,
)
from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8, to_square_uint8
from cxr_platform.data.shifts import apply_shift
from cxr_platform.errors import CxrError, ImageReadError
from cxr_platform.model_version.intended_use import DECLARED, MEASURED, Basis, IntendedUse
from cxr_platform.model_version.population_check import (
    PopulationCheck,
    standardisation,
    thresholded,
)
from cxr_platform.model_version.predictor import SYNTHETIC_DEMO_SET
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.robustness import ROBUSTNESS_SHIFTS
from cxr_platform.models.zoo import WithFeatures
from cxr_platform.sections import RegistrySection

log = logging.getLogger(__name__)

# Enough images for a 16-component PCA many times over; more only costs export time (ResNet18
# reads about 25 images a second on two CPU cores).
MAX_FIT_IMAGES = 2000
FEATURE_BATCH = 64
OUTSIDE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
METADATA = "metadata.csv"
# How the public collections name their columns (Patientid, patientid, patient_id; filename).
PATIENT_COLUMNS = ("patientid", "patient_id", "patient id", "patient")
FILE_COLUMNS = ("filename", "file_name", "file", "image", "path")
_IMAGE_LETTER = re.compile(r"^(.*\d)[a-z]$")
MIN_OUTSIDE_IMAGES = 10
# An L2 penalty for a few dozen examples against thousands of training images in 700 to 5,600
# dimensions; chosen by nested cross-validation on the real data (benchmarks/population_check.py).
DISCRIMINANT_C = 0.1
CV_FOLDS = 5


class OutOfPopulationError(CxrError):
    """The out-of-population examples cannot be used."""


def model_features(
    model: WithFeatures, images: np.ndarray, preprocessing: PreprocessingConfig
) -> np.ndarray:
    """(N, S, S) uint8 model inputs -> (N, D) penultimate features, a batch at a time."""
    chunks = []
    model = model.eval().cpu()
    with torch.no_grad():
        for start in range(0, len(images), FEATURE_BATCH):
            chunk = np.asarray(images[start : start + FEATURE_BATCH])
            _, features = model(torch.from_numpy(normalize_uint8(chunk, preprocessing))[:, None])
            chunks.append(features.numpy().astype(np.float32))
    return np.concatenate(chunks)


def _subsample(images: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(images) <= limit:
        return np.asarray(images)
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))
    return np.asarray(images[chosen])


def acquisition_variants(
    squares: np.ndarray, preprocessing: PreprocessingConfig, *, seed: int = 0
) -> np.ndarray:
    """One copy of each model input under an acquisition shift (contrast, noise, blur,
    resolution, exposure in turn, at the robustness benchmark's severities). Fitted as the
    model's own population, they keep the check from taking a noisier detector for another
    kind of patient: without them, noise alone was refused 7% of the time on the real data."""
    rng = np.random.default_rng(seed)
    names = list(ROBUSTNESS_SHIFTS)
    shifted = []
    for index, square in enumerate(squares):
        name = names[index % len(names)]
        pixels = apply_shift(
            square.astype(np.float32) / 255.0, name, severity=ROBUSTNESS_SHIFTS[name], rng=rng
        )
        shifted.append(to_square_uint8(pixels, preprocessing))
    return np.stack(shifted)


@dataclass(frozen=True, eq=False)
class OutsideCollection:
    """One collection of images of patients a version is not for, as model inputs, with each
    image's patient (so cross-validation keeps a patient's images together)."""

    name: str
    images: np.ndarray  # (N, S, S) uint8
    patients: tuple[str, ...]
    paths: tuple[Path, ...]

    @property
    def n_patients(self) -> int:
        return len(set(self.patients))


@dataclass(frozen=True, eq=False)
class PopulationFeatures:
    """What the check is fitted on, as the network sees it: the training sample and its
    acquisition-shifted copies (``own``, the copies last), the validation split and its shifted
    copy, and the other population's images with each one's patient and collection."""

    own: np.ndarray
    shifted_copies: int
    val: np.ndarray
    shifted_val: np.ndarray
    outside: np.ndarray
    groups: tuple[str, ...]
    collections: tuple[str, ...]

    def fit(self, *, seed: int = 0, c: float = DISCRIMINANT_C) -> PopulationCheck:
        return fit_population_check(
            self.own,
            self.val,
            self.outside,
            self.groups,
            collections=self.collections,
            shifted_val=self.shifted_val,
            seed=seed,
            c=c,
            shifted_copies=self.shifted_copies,
        )


def fit_sample(cache: PreprocessedCache, seed: int) -> np.ndarray:
    """The training images the check is fitted on (at most :data:`MAX_FIT_IMAGES`), in the
    order :func:`population_features` gives their features."""
    return _subsample(cache.images("train"), MAX_FIT_IMAGES, seed)


def population_features(
    model: WithFeatures,
    cache: PreprocessedCache,
    collections: Sequence[OutsideCollection],
    *,
    seed: int = 0,
) -> PopulationFeatures:
    """The training split (at most :data:`MAX_FIT_IMAGES` of it, and an acquisition-shifted
    copy of each), the whole validation split and a shifted copy of it, and every collection;
    test is never read."""
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    fit_on = fit_sample(cache, seed)
    val_images = cache.images("val", mmap=False)
    return PopulationFeatures(
        own=np.concatenate(
            [
                model_features(model, fit_on, preprocessing),
                model_features(
                    model, acquisition_variants(fit_on, preprocessing, seed=seed), preprocessing
                ),
            ]
        ),
        shifted_copies=len(fit_on),
        val=model_features(model, val_images, preprocessing),
        shifted_val=model_features(
            model, acquisition_variants(val_images, preprocessing, seed=seed + 1), preprocessing
        ),
        outside=model_features(
            model, np.concatenate([c.images for c in collections]), preprocessing
        ),
        # A patient id is a collection's own: two collections may both have a patient "2".
        groups=tuple(f"{c.name}/{patient}" for c in collections for patient in c.patients),
        collections=tuple(c.name for c in collections for _ in c.patients),
    )


def population_check_for(
    checkpoint: Checkpoint,
    cache: PreprocessedCache,
    out_of_population_dirs: Sequence[Path],
    *,
    seed: int = 0,
) -> PopulationCheck | None:
    """The check export ships: fitted on :func:`population_features` of every collection in
    ``out_of_population_dirs``. None without such images: no check by pixels."""
    if not out_of_population_dirs:
        return None
    model = WithFeatures(checkpoint.bare_model(), checkpoint.arch, flip=checkpoint.flip_averaged)
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    collections = out_of_population_collections(out_of_population_dirs, preprocessing)
    check = population_features(model, cache, collections, seed=seed).fit(seed=seed)
    log.info("population check: %s", check.summary())
    return check


def collection_folders(folders: Sequence[Path]) -> list[Path]:
    """The collections named by ``CXR_OUT_OF_POPULATION_DIR``: each folder is one, except a
    folder that holds no image and no ``metadata.csv`` of its own but several subfolders with
    images, whose subfolders are the collections."""
    found: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise OutOfPopulationError(f"CXR_OUT_OF_POPULATION_DIR: {folder} is not a folder")
        subfolders = [sub for sub in sorted(folder.iterdir()) if sub.is_dir() and _images_in(sub)]
        own = (folder / METADATA).is_file() or any(_is_image(path) for path in folder.iterdir())
        found += subfolders if not own and len(subfolders) > 1 else [folder]
    names = [_collection_name(folder) for folder in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise OutOfPopulationError(
            f"CXR_OUT_OF_POPULATION_DIR names two collections called {', '.join(repeated)}; "
            "give each collection a folder of its own name"
        )
    return found


def out_of_population_collections(
    folders: Sequence[Path], preprocessing: PreprocessingConfig
) -> list[OutsideCollection]:
    collections = [_read_collection(each, preprocessing) for each in collection_folders(folders)]
    total = sum(len(c.images) for c in collections)
    if total < MIN_OUTSIDE_IMAGES:
        raise OutOfPopulationError(
            f"CXR_OUT_OF_POPULATION_DIR holds {total} readable images; the check needs at least "
            f"{MIN_OUTSIDE_IMAGES} of the patients the version is not for"
        )
    return collections


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in OUTSIDE_SUFFIXES


def _images_in(folder: Path) -> list[Path]:
    return [path for path in sorted(folder.rglob("*")) if _is_image(path)]


def _metadata_file(folder: Path) -> Path | None:
    # A collection given by its images folder (adult-cxr-figure1/images) keeps the metadata
    # beside that folder.
    for candidate in (folder / METADATA, folder.parent / METADATA):
        if candidate.is_file():
            return candidate
    return None


def _collection_name(folder: Path) -> str:
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name == "images" and _metadata_file(folder) else folder.name


def collection_patients(folder: Path, paths: Sequence[Path]) -> list[str]:
    """Each image's patient: the collection's own patient id where its ``metadata.csv`` gives
    one (by a ``filename`` column, else by an id that the file's name starts with), else the
    platform's rule for file names (one patient per image when the name says nothing). Ids that
    differ only by a letter after their number (COVID-00003a, COVID-00003b) are one patient's
    images, as the collections here use them."""
    by_file, ids = _metadata_patients(metadata_rows(folder))
    patients = []
    for path in paths:
        patient = by_file.get(path.name)
        if patient is None:
            stem = path.name.split(".", 1)[0]
            patient = next((known for known in ids if _names_image(known, stem)), None)
        if patient is None:
            patient = patient_from_filename(path.name).patient_id
        patients.append(_IMAGE_LETTER.sub(r"\1", patient))
    return patients


def _names_image(patient: str, stem: str) -> bool:
    """The id is the file's name, or its start before a letter or a separator (COVID-00003 for
    COVID-00003a or COVID-00003_pa), never a shorter number (COVID-0001 is not COVID-00010's)."""
    rest = stem[len(patient) :] if stem.startswith(patient) else None
    return rest is not None and (rest == "" or re.fullmatch(r"[a-z]|[-_ .].*", rest) is not None)


def metadata_rows(folder: Path) -> list[dict[str, str]]:
    """The rows of the ``metadata.csv`` of the collection ``folder`` belongs to, each column's
    name lower-cased and every value stripped; none without such a file."""
    metadata = _metadata_file(Path(folder))
    if metadata is None:
        return []
    raw = metadata.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # adult-cxr-figure1's metadata.csv is latin-1
    return [
        {key.strip().lower(): (value or "").strip() for key, value in row.items() if key}
        for row in csv.DictReader(io.StringIO(text))
    ]


def _metadata_patients(rows: list[dict[str, str]]) -> tuple[dict[str, str], list[str]]:
    if not rows:
        return {}, []
    patient_column = next((c for c in PATIENT_COLUMNS if c in rows[0]), None)
    if patient_column is None:
        return {}, []
    file_column = next((c for c in FILE_COLUMNS if c in rows[0]), None)
    by_file, ids = {}, set()
    for row in rows:
        patient = row.get(patient_column, "")
        if not patient:
            continue
        ids.add(patient)
        if file_column and row.get(file_column):
            by_file[Path(row[file_column]).name] = patient
    return by_file, sorted(ids)


def _read_collection(folder: Path, preprocessing: PreprocessingConfig) -> OutsideCollection:
    """Every image under ``folder`` (any layout), decoded by the platform's one decoder.
    Unreadable files are left out and counted in the log."""
    if not folder.is_dir():
        raise OutOfPopulationError(f"CXR_OUT_OF_POPULATION_DIR: {folder} is not a folder")
    squares, paths, unreadable = [], [], 0
    for path in _images_in(folder):
        try:
            decoded = read_image(path)
        except ImageReadError:
            unreadable += 1
            continue
        squares.append(to_square_uint8(decoded.pixels, preprocessing))
        paths.append(path)
    if unreadable:
        log.warning("%d files in %s could not be read; left out", unreadable, folder)
    if not squares:
        raise OutOfPopulationError(f"CXR_OUT_OF_POPULATION_DIR: {folder} holds no readable image")
    return OutsideCollection(
        name=_collection_name(folder),
        images=np.stack(squares),
        patients=tuple(collection_patients(folder, paths)),
        paths=tuple(paths),
    )


def _fit(
    train: np.ndarray,
    val: np.ndarray,
    outside: np.ndarray,
    seed: int,
    c: float,
    shifted_val: np.ndarray | None,
) -> PopulationCheck:
    from sklearn.linear_model import LogisticRegression

    mean, scale = standardisation(train)
    features = np.concatenate([(train - mean) / scale, (outside - mean) / scale])
    labels = np.r_[np.zeros(len(train)), np.ones(len(outside))]
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed).fit(
        features, labels
    )
    return thresholded(
        mean, scale, model.coef_[0], float(model.intercept_[0]), val, shifted_val=shifted_val
    )


@dataclass(frozen=True)
class HeldOutRefusals:
    """Per image of the other population, whether a check fitted without it refused it."""

    patient_held_out: np.ndarray  # (N,) bool: fitted without that patient's images
    folds: int
    collection_left_out: np.ndarray | None  # fitted without its whole collection; one: None


def held_out_refusals(
    train: np.ndarray,
    val: np.ndarray,
    outside: np.ndarray,
    groups: Sequence[str],
    collections: Sequence[str],
    *,
    shifted_val: np.ndarray | None = None,
    seed: int = 0,
    c: float = DISCRIMINANT_C,
) -> HeldOutRefusals:
    from sklearn.model_selection import GroupKFold

    if len(groups) != len(outside) or len(collections) != len(outside):
        raise OutOfPopulationError("each out-of-population image needs its patient and collection")
    folds = min(CV_FOLDS, len(set(groups)))
    if folds < 2:
        raise OutOfPopulationError("the out-of-population images are of one patient only")
    by_patient = np.zeros(len(outside), dtype=bool)
    for fit_index, held_index in GroupKFold(n_splits=folds).split(outside, groups=list(groups)):
        fold = _fit(train, val, outside[fit_index], seed, c, shifted_val)
        by_patient[held_index] = fold.refused(outside[held_index])
    names = np.asarray(collections)
    by_collection = None
    if len(set(collections)) > 1:
        by_collection = np.zeros(len(outside), dtype=bool)
        for name in dict.fromkeys(collections):
            inside = names == name
            fold = _fit(train, val, outside[~inside], seed, c, shifted_val)
            by_collection[inside] = fold.refused(outside[inside])
    return HeldOutRefusals(by_patient, folds, by_collection)


def fit_population_check(
    train: np.ndarray,
    val: np.ndarray,
    outside: np.ndarray,
    groups: Sequence[str],
    *,
    collections: Sequence[str] | None = None,
    shifted_val: np.ndarray | None = None,
    seed: int = 0,
    c: float = DISCRIMINANT_C,
    shifted_copies: int = 0,
) -> PopulationCheck:
    """A linear score separating the training split's features (``train``: the last
    ``shifted_copies`` of them acquisition-shifted copies) from ``outside`` (the features of
    patients the version is not for, each image's patient in ``groups`` and its collection in
    ``collections``), thresholded on validation (and ``shifted_val``, its acquisition-shifted
    copy, where given: each refused at most the quantile's share).

    What it refuses of such patients is estimated two ways, each fit judged only on images it
    was fitted without: cross-validation with a patient's images held out together, and, where
    there are several collections, each whole collection left out in turn. The second is what
    to expect of patients from elsewhere: a check fitted on one collection partly learns that
    collection (its hospitals, detectors and image pipeline) rather than the patients."""
    groups = list(groups)
    names = list(collections) if collections is not None else ["examples"] * len(outside)
    held_out = held_out_refusals(
        train, val, outside, groups, names, shifted_val=shifted_val, seed=seed, c=c
    )
    described = []
    for name in dict.fromkeys(names):
        inside = np.asarray(names) == name
        entry: dict[str, Any] = {
            "name": name,
            "n_images": int(inside.sum()),
            "n_patients": len({g for g, kept in zip(groups, inside, strict=True) if kept}),
        }
        if held_out.collection_left_out is not None:
            entry["refused_when_left_out"] = float(held_out.collection_left_out[inside].mean())
        described.append(entry)
    check = _fit(train, val, outside, seed, c, shifted_val)
    record: dict[str, Any] = {
        "folder": " + ".join(entry["name"] for entry in described),
        "n_images": int(len(outside)),
        "n_patients": len(set(groups)),
        "cv_folds": held_out.folds,
        "cv_refused_rate": float(held_out.patient_held_out.mean()),
        "collections": described,
    }
    if held_out.collection_left_out is not None:
        record["left_out_refused_rate"] = float(held_out.collection_left_out.mean())
    return replace(
        check,
        fitted_on={
            **check.fitted_on,
            "n_train": int(len(train)),
            "n_shifted_copies": int(shifted_copies),
            "out_of_population": record,
        },
    )


def _population_words(documented: DocumentedPopulation | None, measured: MeasuredPopulation) -> str:
    if documented is not None:
        return documented.population
    # Neither the folder's nor the institutions' names: model files travel, and a site's own
    # names for them may name patients.
    sites = len(measured.sites)
    named = (
        f"{sites} site{'' if sites == 1 else 's'} named in their headers"
        if sites
        else ("sites not named in the headers")
    )
    return f"the patients of the training images ({measured.n_images} images; {named})"


def intended_use_for(
    cache: PreprocessedCache, registry: RegistrySection, data_dir: str | None
) -> IntendedUse:
    """What the training split's headers measure, else what the recognised dataset's
    documentation declares, else nothing; then the deployment's own declared range, if set."""
    train = cache.index("train")
    measured = measure_population(
        train["path"].astype(str).tolist(), train["relative_path"].astype(str).tolist()
    )
    documented = SYNTHETIC_DEMO if data_dir is None else recognise(measured.file_families)
    declared_by = (
        f"the documentation of {documented.name}: {documented.documentation}"
        if (documented)
        else ""
    )

    age_years, age_basis = None, None
    if measured.age_range is not None:
        age_years = measured.age_range
        age_basis = Basis(
            MEASURED,
            f"the ages in the DICOM headers of {len(measured.ages)} of {measured.n_images} "
            "training images, the extreme 1% at each end left out",
        )
    elif documented is not None and documented.age_years is not None:
        age_years, age_basis = documented.age_years, Basis(DECLARED, declared_by)

    def field(
        counts: dict[str, int], documented_values: tuple[str, ...], keyword: str
    ) -> tuple[tuple[str, ...], Basis | None]:
        named = measured.named(counts)
        if named:
            seen = sum(counts.values())
            return named, Basis(MEASURED, f"{keyword} of {seen} DICOM training images")
        if documented_values:
            return documented_values, Basis(DECLARED, declared_by)
        return (), None

    projections, projections_basis = field(
        measured.projections, documented.projections if documented else (), "ViewPosition"
    )
    modalities, modalities_basis = field(
        measured.modalities, documented.modalities if documented else (), "Modality"
    )
    use = IntendedUse(
        population=_population_words(documented, measured),
        age_years=age_years,
        age_basis=age_basis,
        projections=projections,
        projections_basis=projections_basis,
        modalities=modalities,
        modalities_basis=modalities_basis,
        training_source={
            **measured.source(documented),
            "dataset": documented.name if documented else None,
            # The folder's own name is a site's word for it: the dataset's name where it is
            # recognised, else a digest (the synthetic demo set is named, so a served version
            # says it knows no real radiograph).
            "data_folder": SYNTHETIC_DEMO_SET
            if data_dir is None
            else documented.name
            if documented is not None
            else withheld(Path(data_dir).name),
        },
    )
    declared = registry.declared_age_range
    if declared is not None:
        use = use.with_declared_ages(declared, registry.intended_age_reason or "")
    return use

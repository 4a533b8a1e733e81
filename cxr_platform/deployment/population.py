"""Who a version is for, decided at export from the data it was trained on: the intended-use
record (measured from DICOM headers or declared by the dataset's documentation, and what a
deployment declared instead) and the check by pixels, fitted on the model's own features."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

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


def population_check_for(
    checkpoint: Checkpoint,
    cache: PreprocessedCache,
    out_of_population_dir: Path | None,
    *,
    seed: int = 0,
) -> PopulationCheck | None:
    """Fitted on the training split's features (at most :data:`MAX_FIT_IMAGES` of them, and an
    acquisition-shifted copy of each) against the images in ``out_of_population_dir``, the
    threshold set on the whole validation split; test is never read. None without such images:
    no check by pixels."""
    if out_of_population_dir is None:
        return None
    model = WithFeatures(checkpoint.bare_model(), checkpoint.arch, flip=checkpoint.flip_averaged)
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    images, groups = out_of_population_images(out_of_population_dir, preprocessing)
    fit_on = _subsample(cache.images("train"), MAX_FIT_IMAGES, seed)
    own = np.concatenate(
        [
            model_features(model, fit_on, preprocessing),
            model_features(
                model, acquisition_variants(fit_on, preprocessing, seed=seed), preprocessing
            ),
        ]
    )
    val = model_features(model, cache.images("val", mmap=False), preprocessing)
    outside = model_features(model, images, preprocessing)
    check = fit_population_check(
        own,
        val,
        outside,
        groups,
        seed=seed,
        source=Path(out_of_population_dir).name,
        shifted_copies=len(fit_on),
    )
    log.info("population check: %s", check.summary())
    return check


def out_of_population_images(
    folder: Path, preprocessing: PreprocessingConfig
) -> tuple[np.ndarray, list[str]]:
    """Every image under ``folder`` (any layout) as model inputs, decoded by the platform's one
    decoder, with each one's patient (from its name: cross-validation keeps a patient's images
    together). Unreadable files are left out and counted in the log."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OutOfPopulationError(f"CXR_OUT_OF_POPULATION_DIR {folder} is not a folder")
    squares, groups, unreadable = [], [], 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in OUTSIDE_SUFFIXES:
            continue
        try:
            decoded = read_image(path)
        except ImageReadError:
            unreadable += 1
            continue
        squares.append(to_square_uint8(decoded.pixels, preprocessing))
        groups.append(patient_from_filename(path.name).patient_id)
    if unreadable:
        log.warning("%d out-of-population files could not be read; left out", unreadable)
    if len(squares) < MIN_OUTSIDE_IMAGES:
        raise OutOfPopulationError(
            f"{folder} holds {len(squares)} readable images; the check needs at least "
            f"{MIN_OUTSIDE_IMAGES} of the patients the version is not for"
        )
    return np.stack(squares), groups


def _fit(
    train: np.ndarray, val: np.ndarray, outside: np.ndarray, seed: int, c: float
) -> PopulationCheck:
    from sklearn.linear_model import LogisticRegression

    mean, scale = standardisation(train)
    features = np.concatenate([(train - mean) / scale, (outside - mean) / scale])
    labels = np.r_[np.zeros(len(train)), np.ones(len(outside))]
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed).fit(
        features, labels
    )
    return thresholded(mean, scale, model.coef_[0], float(model.intercept_[0]), val)


def fit_population_check(
    train: np.ndarray,
    val: np.ndarray,
    outside: np.ndarray,
    groups: list[str],
    *,
    seed: int = 0,
    source: str = "",
    c: float = DISCRIMINANT_C,
    shifted_copies: int = 0,
) -> PopulationCheck:
    """A linear score separating the training split's features (``train``: the last
    ``shifted_copies`` of them acquisition-shifted copies) from ``outside`` (the features of
    patients the version is not for), thresholded on validation. What it refuses of such
    patients is estimated by cross-validation, patients held out together: each fold is fitted
    without them, thresholded on validation, and judged on them."""
    from sklearn.model_selection import GroupKFold

    folds = min(CV_FOLDS, len(set(groups)))
    if folds < 2:
        raise OutOfPopulationError("the out-of-population images are of one patient only")
    held_out_refused: list[bool] = []
    for fit_index, held_index in GroupKFold(n_splits=folds).split(outside, groups=groups):
        fold = _fit(train, val, outside[fit_index], seed, c)
        held_out_refused += list(fold.refused(outside[held_index]))
    check = _fit(train, val, outside, seed, c)
    return replace(
        check,
        fitted_on={
            **check.fitted_on,
            "n_train": int(len(train)),
            "n_shifted_copies": int(shifted_copies),
            "out_of_population": {
                "folder": source,
                "n_images": int(len(outside)),
                "n_patients": len(set(groups)),
                "cv_folds": folds,
                "cv_refused_rate": float(np.mean(held_out_refused)),
            },
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

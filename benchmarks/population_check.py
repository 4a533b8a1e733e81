"""The check by pixels on real data: adults' chest radiographs against the paediatric model.

For a trained real-data model (the production version of a home, or --checkpoint), on the
shared Kaggle training folder split by patient as the platform splits it:

  - three ways to judge an image by the network's features, each thresholded on validation
    as export does (its 99.5th percentile), never on test:
      distance    a PCA of the training features (Hotelling's T^2 and the residual, per degree
                  of freedom): needs no examples of the other population;
      penultimate a linear score on the classifier's own penultimate features, fitted against
                  the adults;
      stages      a linear score on every stage's channel means and spreads (what export uses);
  - adults refused, cross-validated by patient (5 folds: each fold's score is fitted without
    that fold's patients, thresholded on validation, and judged on them); the penalty C is
    chosen inside each fold by the same cross-validation on the other folds (nested), so no
    adult judges the choice that judges it;
  - the paediatric validation and test splits refused (target <= 1% of test), the test split
    under the acquisition shifts the robustness benchmark uses, and the input gate's negatives
    refused by the gate alone and by the gate and the check together.

    .venv/bin/python benchmarks/population_check.py --home HOME [--adults DIR] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from cxr_platform.data.imaging import read_image
from cxr_platform.data.negatives import negative_suite
from cxr_platform.data.pipeline import prepare
from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8, to_square_uint8
from cxr_platform.data.shifts import apply_shift
from cxr_platform.deployment.population import (
    DISCRIMINANT_C,
    MAX_FIT_IMAGES,
    acquisition_variants,
    fit_population_check,
    model_features,
)
from cxr_platform.deployment.registry import registry_for
from cxr_platform.model_version.files import ModelMetadata
from cxr_platform.model_version.input_gate import fit_input_gate
from cxr_platform.model_version.population_check import standardisation, validation_threshold
from cxr_platform.models.robustness import ROBUSTNESS_SHIFTS
from cxr_platform.models.zoo import WithFeatures, build_model
from cxr_platform.settings import load_settings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
FOLDS = 5


def production_model(home: Path) -> tuple[torch.nn.Module, ModelMetadata, Path]:
    settings = load_settings(home=home)
    registry = registry_for(settings.registry)
    info = registry.get("production")
    folder = registry.download(info.version)
    metadata = ModelMetadata.from_json((folder / "metadata.json").read_text())
    model = build_model(metadata.arch, pretrained="none").model
    model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval(), metadata, folder


def penultimate_features(model, arch: str, images: np.ndarray, preprocessing) -> np.ndarray:
    """The classifier's own penultimate features (the input of its head)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    # The node whose output the head reads: the baseline's pooling, torchvision's flatten.
    node = "pool" if arch == "baseline_cnn" else "flatten"
    extractor = create_feature_extractor(model, return_nodes={node: "features"})
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            batch = normalize_uint8(np.asarray(images[start : start + 64]), preprocessing)
            out = extractor(torch.from_numpy(batch)[:, None])["features"]
            chunks.append(torch.flatten(out, 1).numpy())
    return np.concatenate(chunks)


def distance_refusals(train: np.ndarray, val: np.ndarray, judged: dict[str, np.ndarray]) -> dict:
    """The PCA distance (no examples of the other population), thresholded on validation."""
    mean, scale = standardisation(train)
    standard = (train - mean) / scale
    k = 16
    _, singular, axes = np.linalg.svd(standard, full_matrices=False)
    components, variances = axes[:k], singular[:k] ** 2 / (len(train) - 1)
    residual = standard - standard @ components.T @ components
    residual_variance = (residual**2).sum() / (len(train) * (train.shape[1] - k))

    def distance(x):
        z = (x - mean) / scale
        coefficients = z @ components.T
        inside = (coefficients**2 / variances).sum(1) / k
        out = ((z - coefficients @ components) ** 2).sum(1) / (
            residual_variance * (train.shape[1] - k)
        )
        return np.maximum(inside, out)

    threshold = validation_threshold(distance(val))
    return {name: float((distance(x) > threshold).mean()) for name, x in judged.items()}


def fit_score(train, outside, c):
    mean, scale = standardisation(train)
    features = np.concatenate([(train - mean) / scale, (outside - mean) / scale])
    labels = np.r_[np.zeros(len(train)), np.ones(len(outside))]
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(features, labels)
    weights, bias = model.coef_[0], model.intercept_[0]
    return lambda x: ((x - mean) / scale) @ weights + bias


def held_out_refusal(train, val, adults, groups, c, folds=FOLDS) -> tuple[float, list]:
    refused, tests = [], []
    for fit, held in GroupKFold(n_splits=folds).split(adults, groups=groups):
        score = fit_score(train, adults[fit], c)
        threshold = validation_threshold(score(val))
        refused += list(score(adults[held]) > threshold)
        tests.append((score, threshold))
    return float(np.mean(refused)), tests


def nested(train, val, test, adults, groups) -> dict:
    """Outer folds judge; inner folds (on the outer fold's other patients) choose C."""
    refused, test_refused, chosen = [], [], []
    for fit, held in GroupKFold(n_splits=FOLDS).split(adults, groups=groups):
        inner_groups = [groups[i] for i in fit]
        inner = {
            c: held_out_refusal(train, val, adults[fit], inner_groups, c, folds=4)[0]
            for c in C_GRID
        }
        best = max(C_GRID, key=lambda c: (round(inner[c], 6), -c))  # ties: the stronger penalty
        chosen.append(best)
        score = fit_score(train, adults[fit], best)
        threshold = validation_threshold(score(val))
        refused += list(score(adults[held]) > threshold)
        test_refused.append(float((score(test) > threshold).mean()))
    return {
        "adults_refused": float(np.mean(refused)),
        "test_refused_mean": float(np.mean(test_refused)),
        "chosen_c": chosen,
    }


def adult_images(folder: Path, preprocessing) -> tuple[np.ndarray, list[str], list[int | None]]:
    ages, patients = {}, {}
    with (folder / "metadata.csv").open(encoding="latin-1") as handle:
        for row in csv.DictReader(handle):
            # COVID-00003a and -00003b are one patient (the notes say so): strip the letter.
            patients[row["patientid"]] = re.sub(r"[a-z]$", "", row["patientid"])
            digits = re.match(r"\d+", row.get("age") or "")
            ages[row["patientid"]] = int(digits.group()) if digits else None
    paths = sorted((folder / "images").iterdir())
    squares = [to_square_uint8(read_image(path).pixels, preprocessing) for path in paths]
    stems = [path.stem for path in paths]
    return (
        np.stack(squares),
        [patients.get(stem, stem) for stem in stems],
        [ages.get(stem) for stem in stems],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="a home with a production model")
    parser.add_argument("--data-dir", type=Path, default=SHARED / "kaggle-chest-xray-224")
    parser.add_argument("--adults", type=Path, default=SHARED / "adult-cxr-figure1")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    model, metadata, _ = production_model(args.home)
    settings = load_settings(home=args.home, data_dir=args.data_dir)
    _, cache = prepare(settings.data, progress=False)
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    rng = np.random.default_rng(settings.data.seed)
    train_images = cache.images("train", mmap=False)
    fit_on = train_images[np.sort(rng.choice(len(train_images), MAX_FIT_IMAGES, replace=False))]
    val_images, test_images = cache.images("val", mmap=False), cache.images("test", mmap=False)
    adults, groups, ages = adult_images(args.adults, preprocessing)

    stages_model = WithFeatures(
        model, metadata.arch, flip=metadata.test_time_augmentation == "flip"
    )
    variants = acquisition_variants(fit_on, preprocessing, seed=settings.data.seed)
    judged = {
        "train": fit_on,
        "variants": variants,
        "val": val_images,
        "test": test_images,
        "adults": adults,
    }
    plain = {name: model_features(stages_model, x, preprocessing) for name, x in judged.items()}
    penultimate = {
        name: penultimate_features(model, metadata.arch, x, preprocessing)
        for name, x in judged.items()
    }

    def with_variants(chosen: dict) -> dict:
        return {**chosen, "train": np.concatenate([chosen["train"], chosen["variants"]])}

    features = with_variants(plain)

    results: dict = {"n": {k: int(len(v)) for k, v in plain.items()}}
    results["n"]["adult_patients"] = len(set(groups))
    results["distance"] = distance_refusals(
        plain["train"],
        plain["val"],
        {"val": plain["val"], "test": plain["test"], "adults": plain["adults"]},
    )
    for name, chosen in (
        ("penultimate", with_variants(penultimate)),
        ("stages without variants", plain),
        ("stages", features),
    ):
        results[name] = {
            "nested": nested(
                chosen["train"], chosen["val"], chosen["test"], chosen["adults"], groups
            ),
            "by_c": {
                str(c): held_out_refusal(
                    chosen["train"], chosen["val"], chosen["adults"], groups, c
                )[0]
                for c in C_GRID
            },
        }

    # The check as export fits it, by the function export calls (deployment/population.py:
    # the training sample and an acquisition-shifted copy of each against all adults, C as
    # shipped, thresholded on validation), on everything paediatric; and the same function
    # without the copies, for comparison.
    shipped_check = fit_population_check(
        features["train"],
        features["val"],
        features["adults"],
        groups,
        seed=settings.data.seed,
        shifted_copies=len(variants),
    )
    bare_check = fit_population_check(
        plain["train"], plain["val"], plain["adults"], groups, seed=settings.data.seed
    )
    shipped = {
        "val": float(shipped_check.refused(features["val"]).mean()),
        "test": float(shipped_check.refused(features["test"]).mean()),
        "cv_adults_refused": shipped_check.fitted_on["out_of_population"]["cv_refused_rate"],
        "cv_adults_refused_without": bare_check.fitted_on["out_of_population"]["cv_refused_rate"],
        "shifts": {},
    }
    shift_rng = np.random.default_rng(0)
    originals = [square.astype(np.float32) / 255.0 for square in test_images]
    for shift, severity in ROBUSTNESS_SHIFTS.items():
        shifted = np.stack(
            [
                to_square_uint8(
                    apply_shift(o, shift, severity=severity, rng=shift_rng), preprocessing
                )
                for o in originals
            ]
        )
        shifted_features = model_features(stages_model, shifted, preprocessing)
        shipped["shifts"][f"{shift} {severity}"] = {
            "with variants": float(shipped_check.refused(shifted_features).mean()),
            "without": float(bare_check.refused(shifted_features).mean()),
        }
    gate = fit_input_gate(fit_on, val_images)
    negatives = negative_suite(test_images[:200], seed=0)
    squares = np.stack([to_square_uint8(n.pixels, preprocessing) for n in negatives])
    by_gate = np.array(
        [not v.accepted for v in gate.judge_many([n.pixels for n in negatives], squares)]
    )
    by_check = shipped_check.refused(model_features(stages_model, squares, preprocessing))
    shipped["negatives"] = {
        "n": len(negatives),
        "gate": float(by_gate.mean()),
        "gate_and_check": float((by_gate | by_check).mean()),
    }
    results["shipped"] = shipped
    results["seconds"] = round(time.perf_counter() - started, 1)
    report(results, metadata, ages)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict, metadata: ModelMetadata, ages: list) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    known = [age for age in ages if age is not None]
    n = results["n"]
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, commit {commit}; model "
        f"{metadata.model_name} ({metadata.arch}); kaggle-chest-xray-224: {n['train']} train "
        f"(fit sample, and as many shifted copies) / {n['val']} val / {n['test']} test; "
        f"adults: {n['adults']} images of "
        f"{n['adult_patients']} patients, ages {min(known)}-{max(known)}; "
        f"{results['seconds']} s"
    )
    print(
        "\n| features (linear ones fitted against the adults) | adults refused (held out) "
        "| test refused | C chosen per fold |"
    )
    print("| --- | ---: | ---: | --- |")
    distance = results["distance"]
    print(f"| distance (PCA, no adults) | {distance['adults']:.1%} | {distance['test']:.2%} | - |")
    for name in ("penultimate", "stages without variants", "stages"):
        nested = results[name]["nested"]
        print(
            f"| {name} (nested CV) | {nested['adults_refused']:.1%} | "
            f"{nested['test_refused_mean']:.2%} | {', '.join(map(str, nested['chosen_c']))} |"
        )
    print("\nadults refused by C (5-fold by patient), penultimate / stages:")
    for c in C_GRID:
        print(
            f"  C={c}: {results['penultimate']['by_c'][str(c)]:.1%} / "
            f"{results['stages']['by_c'][str(c)]:.1%}"
        )
    shipped = results["shipped"]
    print(
        f"\nas export fits it (deployment.population.fit_population_check: stages and shifted "
        f"copies, C={DISCRIMINANT_C}, all adults):"
    )
    print(f"  validation refused {shipped['val']:.2%}, test refused {shipped['test']:.2%}")
    print(
        f"  adults refused, cross-validated by patient as export records it: "
        f"{shipped['cv_adults_refused']:.1%} (without the copies "
        f"{shipped['cv_adults_refused_without']:.1%})"
    )
    for shift, share in shipped["shifts"].items():
        print(
            f"  test under {shift}: {share['with variants']:.2%} refused "
            f"(fitted without the variants: {share['without']:.2%})"
        )
    negatives = shipped["negatives"]
    print(
        f"  input gate negatives ({negatives['n']}): {negatives['gate']:.1%} refused by the gate, "
        f"{negatives['gate_and_check']:.1%} by the gate and the check"
    )


if __name__ == "__main__":
    sys.exit(main())
